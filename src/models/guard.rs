//! The memory guard's decision, kept free of I/O so every branch is unit-tested: given what a
//! load needs, the room under the threshold and the loaded models, either load, drop the
//! models' cached prefixes (cheaper to lose than a model), evict the least recently used idle
//! unpinned model and look again, or refuse with the numbers.

use std::time::Instant;

use crate::engine::MemoryEstimate;

/// Memory that may still be taken without crossing the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    /// RAM bytes left under the threshold.
    pub ram_headroom: u64,
    /// GPU bytes left under the threshold; `None` without a GPU.
    pub gpu_headroom: Option<u64>,
    /// RAM in the machine and in use now, for the refusal message.
    pub ram_total: u64,
    pub ram_used: u64,
}

/// A loaded model as the guard sees it.
#[derive(Debug, Clone)]
pub struct Resident {
    pub id: String,
    pub last_used: Instant,
    pub estimate: MemoryEstimate,
    pub pinned: bool,
    /// Requests running, queued, or between routing and the queue.
    pub busy: bool,
    /// Memory its cached prefixes hold beyond the estimate, which can be dropped even while
    /// it is busy or pinned.
    pub prefix_cache_bytes: u64,
}

/// Why nothing may be evicted for a load.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Even with every evictable model gone the load would cross the threshold.
    Memory {
        /// `RAM` or `GPU memory`.
        resource: &'static str,
        needed: u64,
        /// Headroom now plus what dropping cached prefixes and evicting every evictable
        /// model would free.
        obtainable: u64,
        /// Models that hold memory but may not be evicted, with the reason.
        held: Vec<String>,
    },
    /// `max_loaded_models` is reached and no loaded model may be evicted.
    Count { max: u32, held: Vec<String> },
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Load,
    /// Drop every model's cached prefixes, then measure again.
    DropPrefixes,
    /// Unload this model, then measure again.
    Evict {
        id: String,
        reason: &'static str,
    },
    Refuse(Refusal),
}

/// Decides the next step for a load needing `need`.
pub fn next_step(
    need: &MemoryEstimate,
    room: Room,
    resident: &[Resident],
    max_loaded: Option<u32>,
) -> Step {
    let evictable: Vec<&Resident> = resident.iter().filter(|r| !r.pinned && !r.busy).collect();
    let held: Vec<String> = resident
        .iter()
        .filter(|r| r.pinned || r.busy)
        .map(|r| format!("{} ({})", r.id, if r.pinned { "pinned" } else { "busy" }))
        .collect();

    let ram_ok = need.ram_bytes <= room.ram_headroom;
    let gpu_ok = need.gpu_bytes == 0 || room.gpu_headroom.is_none_or(|h| need.gpu_bytes <= h);
    let count_ok = max_loaded.is_none_or(|m| (resident.len() as u64) < u64::from(m));
    if ram_ok && gpu_ok && count_ok {
        return Step::Load;
    }

    // Every refusal is decided before anything is dropped: a load refused anyway must not
    // cost the other models their cached prefixes.
    let prefixes: u64 = resident.iter().map(|r| r.prefix_cache_bytes).sum();
    let free_ram: u64 = evictable.iter().map(|r| r.estimate.ram_bytes).sum();
    if need.ram_bytes > room.ram_headroom + free_ram + prefixes {
        return Step::Refuse(Refusal::Memory {
            resource: "RAM",
            needed: need.ram_bytes,
            obtainable: room.ram_headroom + free_ram + prefixes,
            held,
        });
    }
    if let Some(h) = room.gpu_headroom.filter(|_| need.gpu_bytes > 0) {
        let free_gpu: u64 = evictable.iter().map(|r| r.estimate.gpu_bytes).sum();
        if need.gpu_bytes > h + free_gpu {
            return Step::Refuse(Refusal::Memory {
                resource: "GPU memory",
                needed: need.gpu_bytes,
                obtainable: h + free_gpu,
                held,
            });
        }
    }
    if let Some(m) = max_loaded.filter(|_| !count_ok) {
        if resident.len() - evictable.len() >= m as usize {
            return Step::Refuse(Refusal::Count { max: m, held });
        }
    }
    // Prefixes are cheaper to lose than a model: they go first when memory is short.
    if !(ram_ok && gpu_ok) && prefixes > 0 {
        return Step::DropPrefixes;
    }
    let lru = evictable
        .iter()
        .min_by_key(|r| r.last_used)
        .expect("an evictable model exists when the load does not fit but could");
    Step::Evict {
        id: lru.id.clone(),
        reason: if count_ok {
            "memory"
        } else {
            "max_loaded_models"
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn need(ram: u64) -> MemoryEstimate {
        MemoryEstimate {
            total_bytes: ram,
            ram_bytes: ram,
            ..Default::default()
        }
    }

    #[test]
    fn prefixes_go_before_models_and_only_for_memory() {
        let mut held = resident("a", 10, 500, true, true);
        held.prefix_cache_bytes = 300;
        let idle = resident("b", 20, 500, false, false);
        // Short of memory: prefixes first, even a busy pinned model's.
        assert_eq!(
            next_step(&need(400), room(200), &[held.clone(), idle.clone()], None),
            Step::DropPrefixes
        );
        // Once they are gone (the registry reads 0), the idle model goes.
        held.prefix_cache_bytes = 0;
        assert!(matches!(
            next_step(&need(400), room(200), &[held.clone(), idle.clone()], None),
            Step::Evict { ref id, .. } if id == "b"
        ));
        // A count limit is not helped by dropping prefixes.
        held.prefix_cache_bytes = 300;
        assert!(matches!(
            next_step(&need(10), room(1000), &[held.clone(), idle.clone()], Some(2)),
            Step::Evict { ref id, reason: "max_loaded_models" } if id == "b"
        ));
        // A load refused anyway keeps everyone's prefixes: more than headroom, prefixes and
        // the idle model together is refused at once, with the prefixes counted as obtainable.
        assert!(matches!(
            next_step(&need(1001), room(200), &[held.clone(), idle.clone()], None),
            Step::Refuse(Refusal::Memory {
                obtainable: 1000,
                ..
            })
        ));
        // And so is one the count limit refuses (nothing may be evicted).
        let mut busy = idle;
        busy.busy = true;
        assert!(matches!(
            next_step(&need(400), room(200), &[held, busy], Some(2)),
            Step::Refuse(Refusal::Count { .. })
        ));
    }

    fn resident(id: &str, age_s: u64, ram: u64, pinned: bool, busy: bool) -> Resident {
        Resident {
            id: id.into(),
            last_used: Instant::now() - Duration::from_secs(age_s),
            estimate: need(ram),
            pinned,
            busy,
            prefix_cache_bytes: 0,
        }
    }

    fn room(ram: u64) -> Room {
        Room {
            ram_headroom: ram,
            gpu_headroom: None,
            ram_total: 0,
            ram_used: 0,
        }
    }

    #[test]
    fn loads_when_it_fits() {
        assert_eq!(next_step(&need(10), room(10), &[], None), Step::Load);
    }

    #[test]
    fn evicts_least_recently_used_idle_unpinned() {
        let r = [
            resident("old-pinned", 100, 50, true, false),
            resident("old-busy", 90, 50, false, true),
            resident("older", 60, 50, false, false),
            resident("newer", 5, 50, false, false),
        ];
        assert_eq!(
            next_step(&need(40), room(10), &r, None),
            Step::Evict {
                id: "older".into(),
                reason: "memory"
            }
        );
    }

    #[test]
    fn refuses_without_evicting_when_eviction_cannot_make_room() {
        let r = [
            resident("pinned", 10, 500, true, false),
            resident("idle", 5, 20, false, false),
        ];
        match next_step(&need(100), room(10), &r, None) {
            Step::Refuse(Refusal::Memory {
                resource,
                needed,
                obtainable,
                held,
            }) => {
                assert_eq!((resource, needed, obtainable), ("RAM", 100, 30));
                assert_eq!(held, ["pinned (pinned)"]);
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn max_loaded_models_evicts_or_refuses() {
        let r = [
            resident("a", 50, 1, false, false),
            resident("b", 10, 1, false, false),
        ];
        assert_eq!(
            next_step(&need(1), room(100), &r, Some(2)),
            Step::Evict {
                id: "a".into(),
                reason: "max_loaded_models"
            }
        );
        let r = [resident("a", 50, 1, false, true)];
        assert_eq!(
            next_step(&need(1), room(100), &r, Some(1)),
            Step::Refuse(Refusal::Count {
                max: 1,
                held: vec!["a (busy)".into()]
            })
        );
    }

    #[test]
    fn gpu_memory_is_checked_separately() {
        let mut n = need(10);
        n.gpu_bytes = 80;
        let room = Room {
            gpu_headroom: Some(50),
            ..room(1000)
        };
        let mut a = resident("a", 5, 10, false, false);
        a.estimate.gpu_bytes = 40;
        assert!(matches!(
            next_step(&n, room, std::slice::from_ref(&a), None),
            Step::Evict { .. }
        ));
        a.pinned = true;
        assert!(matches!(
            next_step(&n, room, &[a], None),
            Step::Refuse(Refusal::Memory {
                resource: "GPU memory",
                ..
            })
        ));
    }
}
