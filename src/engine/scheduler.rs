//! Sequence-slot bookkeeping for a batching scheduler, kept free of llama.cpp so it can be
//! unit-tested: which slot a new request gets, how much of its prompt is already in that slot's
//! KV cache, and which tokens each slot's cache holds.

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
    /// When the slot was last given out, for least-recently-used choice.
    pub last_used: Instant,
}

/// The slot chosen for a request and how many prompt tokens it can skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub slot: usize,
    /// Prompt tokens whose KV is reused; at least one prompt token is always recomputed so
    /// the request has fresh logits to sample from.
    pub reuse: usize,
}

/// All slots of one model.
#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
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
        }
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

    /// Picks a free slot for `prompt`: the one whose cache shares the longest prefix with it,
    /// else the least recently used, so caches that others might reuse survive longest.
    /// Marks it busy and truncates its cache bookkeeping to the reused prefix; the caller must
    /// drop the same range from the KV cache.
    pub fn assign(&mut self, prompt: &[TokenId]) -> Option<Assignment> {
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .max_by(|(_, a), (_, b)| {
                let pa = common_prefix(&a.cached, prompt);
                let pb = common_prefix(&b.cached, prompt);
                pa.cmp(&pb).then(b.last_used.cmp(&a.last_used))
            })
            .map(|(i, _)| i)?;
        let slot = &mut self.slots[best];
        let reuse = common_prefix(&slot.cached, prompt).min(prompt.len().saturating_sub(1));
        slot.cached.truncate(reuse);
        slot.busy = true;
        slot.last_used = Instant::now();
        Some(Assignment { slot: best, reuse })
    }

    /// Frees a slot; its cache stays for later prefix reuse.
    pub fn release(&mut self, i: usize) {
        self.slots[i].busy = false;
    }

    /// Forgets a slot's cache (after a failed decode, or when its KV was cleared).
    pub fn forget(&mut self, i: usize) {
        self.slots[i].cached.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_longest_shared_prefix() {
        let mut t = SlotTable::new(3);
        t.get_mut(0).cached = vec![1, 2, 3];
        t.get_mut(1).cached = vec![1, 2, 3, 4, 5];
        t.get_mut(2).cached = vec![9];
        let a = t.assign(&[1, 2, 3, 4, 7, 8]).unwrap();
        assert_eq!(a, Assignment { slot: 1, reuse: 4 });
        assert_eq!(t.get(1).cached, [1, 2, 3, 4]);
        assert!(t.get(1).busy);
        assert_eq!(t.busy(), 1);
    }

    #[test]
    fn identical_prompt_still_recomputes_last_token() {
        let mut t = SlotTable::new(1);
        t.get_mut(0).cached = vec![5, 6, 7];
        let a = t.assign(&[5, 6, 7]).unwrap();
        assert_eq!(a.reuse, 2);
        assert_eq!(t.get(0).cached, [5, 6]);
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
    fn without_a_match_the_least_recently_used_slot_is_evicted() {
        let mut t = SlotTable::new(2);
        let first = t.assign(&[1, 1]).unwrap().slot;
        t.get_mut(first).cached = vec![1, 1];
        t.release(first);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = t.assign(&[2, 2]).unwrap().slot;
        assert_ne!(first, second);
        t.get_mut(second).cached = vec![2, 2];
        t.release(second);
        // A prompt sharing nothing evicts the older cache, keeping [2, 2].
        let third = t.assign(&[3]).unwrap();
        assert_eq!(
            third,
            Assignment {
                slot: first,
                reuse: 0
            }
        );
        assert!(t.get(first).cached.is_empty());
        assert_eq!(t.get(second).cached, [2, 2]);
        t.forget(second);
        assert!(t.get(second).cached.is_empty());
    }
}
