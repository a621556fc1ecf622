//! Sequence-slot bookkeeping for a batching scheduler, kept free of llama.cpp so it can be
//! unit-tested: which slot a new request gets, how much of its prompt is already in the KV
//! cache (its own slot's, or another slot's that it can copy), and which cache is evicted when
//! every free slot holds one.
//!
//! A system prompt shared by six bots is computed once: later requests copy its KV from
//! whichever sequence holds it (cheap next to recomputing it) instead of running the model.

use std::time::Instant;

use super::TokenId;

/// One sequence of the shared context: its id in the KV cache and the tokens its cache holds.
#[derive(Debug)]
pub struct Slot {
    /// llama.cpp sequence id.
    pub seq: i32,
    /// Tokens whose KV is in this sequence, in position order.
    pub cached: Vec<TokenId>,
    /// Whether a request is using the slot.
    pub busy: bool,
    /// When the slot's cache was last used (given out, released, or copied from): the least
    /// recently used idle cache is the one evicted.
    pub last_used: Instant,
}

/// Where a request's reusable prefix comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Nothing reusable: the slot's cache is dropped and the prompt computed in full.
    None,
    /// The slot's own cache starts with `len` prompt tokens; drop its cache past them.
    Own { len: usize },
    /// Another slot's cache starts with `len` prompt tokens: drop this slot's cache and copy
    /// positions `0..len` from `from`.
    Copy { from: usize, len: usize },
}

/// The slot chosen for a request and how its prompt's prefix is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub slot: usize,
    pub reuse: Reuse,
}

impl Assignment {
    /// Prompt tokens whose KV is reused; at least one prompt token is always recomputed so
    /// the request has fresh logits to sample from.
    pub fn reused(&self) -> usize {
        match self.reuse {
            Reuse::None => 0,
            Reuse::Own { len } | Reuse::Copy { len, .. } => len,
        }
    }
}

/// All slots of one model.
#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
    /// Whether new requests may reuse cached prefixes. Off in batch-invariant mode: a reused
    /// prefix was computed in other chunk sizes than a cold prompt, so its last bits differ.
    reuse: bool,
    /// The cache the last assignment cut short or dropped, with its slot: the disk tier may
    /// keep it before the slot's KV is overwritten.
    dropped: Option<(usize, Vec<TokenId>)>,
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[TokenId], b: &[TokenId]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SlotTable {
    /// `n` empty slots, sequence ids `0..n`.
    pub fn new(n: usize) -> Self {
        let now = Instant::now();
        Self {
            slots: (0..n)
                .map(|i| Slot {
                    seq: i as i32,
                    cached: Vec::new(),
                    busy: false,
                    last_used: now,
                })
                .collect(),
            reuse: true,
            dropped: None,
        }
    }

    /// The same table, but every request computes its whole prompt (batch-invariant mode).
    pub fn without_prefix_reuse(mut self) -> Self {
        self.reuse = false;
        self
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no slots at all.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots in use.
    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Slot by index.
    pub fn get(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// Mutable slot by index.
    pub fn get_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.slots[i]
    }

    /// Picks a free slot for `prompt` and the longest prefix of it already in the cache.
    ///
    /// The slot: a free one whose whole cache is a prefix of the prompt (a conversation's next
    /// turn: nothing is lost by extending it), the longest such; otherwise the least recently
    /// used free slot, whose cache is evicted. The prefix: the longest match in any slot, busy
    /// or free, copied over when it is not the chosen slot's own. Marks the slot busy and sets
    /// its bookkeeping to the reused prefix; the caller must apply the same change to the KV
    /// cache (see [`Reuse`]).
    pub fn assign(&mut self, prompt: &[TokenId]) -> Option<Assignment> {
        let cap = prompt.len().saturating_sub(1);
        let free = || self.slots.iter().enumerate().filter(|(_, s)| !s.busy);
        let extendable = free()
            .filter(|(_, s)| {
                !s.cached.is_empty() && common_prefix(&s.cached, prompt) == s.cached.len()
            })
            .max_by_key(|(_, s)| s.cached.len())
            .map(|(i, _)| i);
        let slot = match extendable {
            Some(i) if self.reuse => i,
            _ => free().min_by_key(|(_, s)| s.last_used).map(|(i, _)| i)?,
        };
        let cap = if self.reuse { cap } else { 0 };
        let own = common_prefix(&self.slots[slot].cached, prompt).min(cap);
        let (donor, donor_len) = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != slot)
            .map(|(i, s)| (i, common_prefix(&s.cached, prompt).min(cap)))
            .max_by_key(|&(_, len)| len)
            .unwrap_or((slot, 0));

        let now = Instant::now();
        let reuse = if donor_len > own {
            self.slots[donor].last_used = now;
            Reuse::Copy {
                from: donor,
                len: donor_len,
            }
        } else if own > 0 {
            Reuse::Own { len: own }
        } else {
            Reuse::None
        };
        let s = &mut self.slots[slot];
        let kept = Assignment { slot, reuse }.reused();
        let old = std::mem::take(&mut s.cached);
        self.dropped = (old.len() > kept || matches!(reuse, Reuse::Copy { .. }) && !old.is_empty())
            .then_some((slot, old));
        let s = &mut self.slots[slot];
        s.cached.extend_from_slice(&prompt[..kept]);
        s.busy = true;
        s.last_used = now;
        Some(Assignment { slot, reuse })
    }

    /// The cache the last [`Self::assign`] cut short or replaced (its slot and full token
    /// list), once: the slot's KV still holds it until the caller applies the reuse.
    pub fn take_dropped(&mut self) -> Option<(usize, Vec<TokenId>)> {
        self.dropped.take()
    }

    /// Frees a slot; its cache stays for later prefix reuse.
    pub fn release(&mut self, i: usize) {
        self.slots[i].busy = false;
        self.slots[i].last_used = Instant::now();
    }

    /// Forgets a slot's cache (after a failed decode, or when its KV was cleared).
    pub fn forget(&mut self, i: usize) {
        self.slots[i].cached.clear();
    }
}

/// Runs `group` through `run` (one batched decode and its sampling); when the batch fails,
/// runs each member alone so that one bad sequence fails by itself and the others go on.
/// Returns the members that failed even alone, with their errors.
pub fn isolate_failures<E>(
    group: &[u64],
    run: &mut dyn FnMut(&[u64]) -> Result<(), E>,
) -> Vec<(u64, E)> {
    match run(group) {
        Ok(()) => Vec::new(),
        Err(e) if group.len() == 1 => vec![(group[0], e)],
        Err(_) => group
            .iter()
            .flat_map(|&id| isolate_failures(&[id], run))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_batch_is_retried_member_by_member() {
        // Sequence 7 poisons any batch it is in; the others succeed once run without it.
        let mut calls: Vec<Vec<u64>> = Vec::new();
        let mut run = |ids: &[u64]| {
            calls.push(ids.to_vec());
            if ids.contains(&7) {
                Err(format!("bad {ids:?}"))
            } else {
                Ok(())
            }
        };
        let failed = isolate_failures(&[3, 7, 9], &mut run);
        assert_eq!(failed, [(7, "bad [7]".to_string())]);
        assert_eq!(calls, [vec![3, 7, 9], vec![3], vec![7], vec![9]]);
        let mut ok = |_: &[u64]| Ok::<(), String>(());
        assert!(isolate_failures(&[1, 2], &mut ok).is_empty());
    }

    #[test]
    fn without_prefix_reuse_every_prompt_is_computed_whole() {
        let mut t = SlotTable::new(2).without_prefix_reuse();
        t.get_mut(0).cached = vec![1, 2, 3];
        t.get_mut(1).cached = vec![1, 2, 3, 4];
        let a = t.assign(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(a.reuse, Reuse::None);
        assert!(t.get(a.slot).cached.is_empty());
    }

    #[test]
    fn the_cache_an_assignment_drops_is_handed_over_once() {
        let mut t = SlotTable::new(1);
        t.get_mut(0).cached = vec![1, 2, 3, 4, 5, 6];
        // Extending the whole cache drops nothing.
        let a = t.assign(&[1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(a.reuse, Reuse::Own { len: 6 });
        assert_eq!(t.take_dropped(), None);
        t.release(0);
        // A prompt that shares only part of it cuts the rest: the full old list is handed over.
        let a = t.assign(&[1, 2, 9, 9]).unwrap();
        assert_eq!(a.reuse, Reuse::Own { len: 2 });
        assert_eq!(t.take_dropped(), Some((0, vec![1, 2, 3, 4, 5, 6])));
        assert_eq!(t.take_dropped(), None);
    }

    /// Idle slots holding a cache, least recently used first: the eviction order.
    fn lru_order(t: &SlotTable) -> Vec<usize> {
        let mut idle: Vec<usize> = (0..t.len())
            .filter(|&i| !t.get(i).busy && !t.get(i).cached.is_empty())
            .collect();
        idle.sort_by_key(|&i| t.get(i).last_used);
        idle
    }

    /// Releases with a visible gap so `last_used` orders are unambiguous.
    fn release_later(t: &mut SlotTable, i: usize) {
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.release(i);
    }

    #[test]
    fn next_turn_extends_its_own_slot() {
        let mut t = SlotTable::new(3);
        t.get_mut(0).cached = vec![1, 2, 3];
        t.get_mut(1).cached = vec![1, 2, 3, 4, 5];
        t.get_mut(2).cached = vec![9];
        let a = t.assign(&[1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(
            a,
            Assignment {
                slot: 1,
                reuse: Reuse::Own { len: 5 }
            }
        );
        assert_eq!(t.get(1).cached, [1, 2, 3, 4, 5]);
        assert!(t.get(1).busy);
        assert_eq!(t.busy(), 1);
    }

    #[test]
    fn identical_prompt_still_recomputes_last_token() {
        let mut t = SlotTable::new(1);
        t.get_mut(0).cached = vec![5, 6, 7];
        let a = t.assign(&[5, 6, 7]).unwrap();
        assert_eq!(a.reuse, Reuse::Own { len: 2 });
        assert_eq!(a.reused(), 2);
        assert_eq!(t.get(0).cached, [5, 6]);
    }

    #[test]
    fn shared_prefix_is_copied_from_a_busy_slot() {
        let mut t = SlotTable::new(2);
        // Bot A is generating after a system prompt [1, 2, 3, 4].
        let a = t.assign(&[1, 2, 3, 4, 10]).unwrap();
        t.get_mut(a.slot).cached = vec![1, 2, 3, 4, 10, 11, 12];
        // Bot B sends the same system prompt with its own question.
        let b = t.assign(&[1, 2, 3, 4, 20, 21]).unwrap();
        assert_ne!(b.slot, a.slot);
        assert_eq!(
            b.reuse,
            Reuse::Copy {
                from: a.slot,
                len: 4
            }
        );
        assert_eq!(t.get(b.slot).cached, [1, 2, 3, 4]);
        // The donor keeps its whole cache.
        assert_eq!(t.get(a.slot).cached, [1, 2, 3, 4, 10, 11, 12]);
    }

    #[test]
    fn a_divergent_idle_cache_is_copied_not_truncated() {
        let mut t = SlotTable::new(2);
        t.get_mut(0).cached = vec![1, 2, 3, 4, 10, 11];
        release_later(&mut t, 0);
        // Slot 1 is older and empty; slot 0 holds a conversation another bot shares a prefix
        // with. The conversation survives: the prefix is copied into slot 1.
        let a = t.assign(&[1, 2, 3, 4, 20]).unwrap();
        assert_eq!(
            a,
            Assignment {
                slot: 1,
                reuse: Reuse::Copy { from: 0, len: 4 }
            }
        );
        assert_eq!(t.get(0).cached, [1, 2, 3, 4, 10, 11]);
    }

    #[test]
    fn full_table_refuses_and_release_frees() {
        let mut t = SlotTable::new(2);
        assert!(t.assign(&[1]).is_some());
        assert!(t.assign(&[1]).is_some());
        assert!(t.assign(&[1]).is_none());
        t.release(0);
        assert_eq!(t.assign(&[2]).unwrap().slot, 0);
    }

    #[test]
    fn without_a_match_the_least_recently_used_cache_is_evicted() {
        let mut t = SlotTable::new(3);
        for (i, toks) in [[1, 1], [2, 2], [3, 3]].iter().enumerate() {
            let a = t.assign(toks).unwrap();
            assert_eq!(a.slot, i);
            t.get_mut(i).cached = toks.to_vec();
        }
        release_later(&mut t, 1);
        release_later(&mut t, 0);
        release_later(&mut t, 2);
        assert_eq!(lru_order(&t), [1, 0, 2]);
        let a = t.assign(&[7, 7]).unwrap();
        assert_eq!(
            a,
            Assignment {
                slot: 1,
                reuse: Reuse::None
            }
        );
        assert!(t.get(1).cached.is_empty());
        assert_eq!(t.get(0).cached, [1, 1]);
        assert_eq!(t.get(2).cached, [3, 3]);
        t.get_mut(1).cached = vec![7, 7];
        release_later(&mut t, 1);
        assert_eq!(lru_order(&t), [0, 2, 1]);
        // Copying from an idle cache counts as using it: [3, 3] now outlives [7, 7].
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = t.assign(&[3, 9]).unwrap();
        assert_eq!(
            b,
            Assignment {
                slot: 0,
                reuse: Reuse::Copy { from: 2, len: 1 }
            }
        );
        assert_eq!(lru_order(&t), [1, 2]);
        t.forget(2);
        assert!(t.get(2).cached.is_empty());
        assert_eq!(lru_order(&t), [1]);
    }

    #[test]
    fn own_prefix_beats_an_equal_donor() {
        let mut t = SlotTable::new(2);
        t.get_mut(0).cached = vec![1, 2, 3];
        t.get_mut(1).cached = vec![1, 2, 3, 4, 5];
        release_later(&mut t, 0);
        // Slot 0's cache is a prefix of the prompt; slot 1 matches no further (cap is 3).
        let a = t.assign(&[1, 2, 3, 4]).unwrap();
        assert_eq!(a.slot, 0);
        assert_eq!(a.reuse, Reuse::Own { len: 3 });
    }
}
