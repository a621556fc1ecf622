//! Machine memory, read fresh for every decision so the guardrail sees what other
//! programs are using right now, not what was free at start.

use serde::Serialize;

/// One reading of system memory, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MemorySnapshot {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub used_percent: f64,
}

impl MemorySnapshot {
    /// Reads RAM now. `available` (not `free`) is what a load can take without swapping.
    pub fn read() -> Self {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        Self::from_parts(sys.total_memory(), sys.available_memory())
    }

    /// Derives used figures from total and available, so every reading is self-consistent.
    pub fn from_parts(total_bytes: u64, available_bytes: u64) -> Self {
        let available_bytes = available_bytes.min(total_bytes);
        let used_bytes = total_bytes - available_bytes;
        let used_percent = if total_bytes == 0 {
            0.0
        } else {
            used_bytes as f64 * 100.0 / total_bytes as f64
        };
        Self {
            total_bytes,
            available_bytes,
            used_bytes,
            used_percent,
        }
    }

    /// Bytes that may still be taken before used memory crosses `threshold_percent` of total.
    pub fn headroom_bytes(&self, threshold_percent: f64) -> u64 {
        let limit = (self.total_bytes as f64 * threshold_percent / 100.0) as u64;
        limit.saturating_sub(self.used_bytes)
    }
}

/// Resident memory of this process, for the idle-footprint target and `/admin/status`.
pub fn process_rss_bytes() -> u64 {
    let pid = match sysinfo::get_current_pid() {
        Ok(p) => p,
        Err(_) => return 0,
    };
    let mut sys = sysinfo::System::new();
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), false);
    sys.process(pid).map(|p| p.memory()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_respects_threshold() {
        let m = MemorySnapshot::from_parts(100, 40);
        assert_eq!(m.used_bytes, 60);
        assert!((m.used_percent - 60.0).abs() < 1e-9);
        assert_eq!(m.headroom_bytes(90.0), 30);
        assert_eq!(m.headroom_bytes(50.0), 0);
    }

    #[test]
    fn reads_real_memory() {
        let m = MemorySnapshot::read();
        assert!(m.total_bytes > 0);
        assert!(m.available_bytes <= m.total_bytes);
        assert!(process_rss_bytes() > 0);
    }
}
