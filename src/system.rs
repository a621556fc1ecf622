//! Machine memory, read fresh for every decision so the guardrail sees what other
//! programs are using right now, not what was free at start.

use serde::Serialize;

/// One reading of system memory, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, utoipa::ToSchema)]
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

    /// `threshold_percent` of total: what used memory may grow to.
    pub fn limit_bytes(&self, threshold_percent: f64) -> u64 {
        (self.total_bytes as f64 * threshold_percent / 100.0) as u64
    }

    /// Bytes that may still be taken before used memory crosses `threshold_percent` of total.
    pub fn headroom_bytes(&self, threshold_percent: f64) -> u64 {
        self.limit_bytes(threshold_percent)
            .saturating_sub(self.used_bytes)
    }
}

/// Hands memory the allocator keeps after a model is unloaded back to the system. glibc keeps
/// freed heap in its arenas (a model's load and its requests free hundreds of MB across
/// several threads' arenas), so the process stayed 0.2-1.6 GB above its start after every
/// model was gone, and the memory guard, which reads what the system says is used, counted
/// it against the next load. Elsewhere the allocator returns memory by itself.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident memory of this process, for the idle-footprint target and `/admin/status`.
pub fn process_rss_bytes() -> u64 {
    sysinfo::get_current_pid().map_or(0, rss_of)
}

/// Resident memory of process `pid` as sysinfo reads it (0 if it is gone).
fn rss_of(pid: sysinfo::Pid) -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), false);
    sys.process(pid).map(|p| p.memory()).unwrap_or(0)
}

/// This process's anonymous (heap) resident memory: the part of its footprint that the OS
/// counts as used. On Linux it comes from `/proc/self/status`; elsewhere the whole RSS.
pub fn process_anon_bytes() -> u64 {
    anon_from_proc("self").unwrap_or_else(process_rss_bytes)
}

/// A child process's anonymous resident memory (an MLX worker's arrays), measured the same
/// way, so the memory guard can tell the server's own workers from other programs.
pub fn worker_anon_bytes(pid: u32) -> u64 {
    anon_from_proc(&pid.to_string()).unwrap_or_else(|| rss_of(sysinfo::Pid::from_u32(pid)))
}

fn anon_from_proc(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
}

/// GPU memory llama.cpp can see, summed over its GPU devices; `None` without a GPU.
pub fn gpu_memory() -> Option<(u64, u64)> {
    use llama_cpp_2::LlamaBackendDeviceType as T;
    let gpus: Vec<_> = llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| matches!(d.device_type, T::Gpu | T::IntegratedGpu))
        .collect();
    (!gpus.is_empty()).then(|| {
        let total = gpus.iter().map(|d| d.memory_total as u64).sum();
        let free = gpus.iter().map(|d| d.memory_free as u64).sum();
        (total, free)
    })
}

/// Raises the soft open-files limit to the hard one (often 1,024 against 500,000+), so the
/// connection cap, not the descriptor table, decides how many clients fit. Returns the limit.
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a stack value of the right type.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// CPU threads a model decodes with when no setting names a number: the physical cores, less
/// one left to everything else (the HTTP side, tokenizing, the other processes of a shared
/// machine), and at least one. Measured with `bench/threads.sh` (Qwen2.5-Coder 0.5B, 2-core
/// machine): llama.cpp's threads spin at every barrier, so a thread that loses its core stalls
/// all of them; 2 threads decode 23.0 tokens/s alone but 5.9 beside one busy process (the
/// OpenClaw run saw 0.6), where 1 thread decodes 12.7 and 11.8. Hyperthread siblings share a
/// core's units and are not counted.
pub fn default_threads() -> u32 {
    let logical = std::thread::available_parallelism().map_or(2, |n| n.get());
    let physical = sysinfo::System::physical_core_count().unwrap_or(logical);
    physical.min(logical.saturating_sub(1)).max(1) as u32
}

/// What this machine is, for `/admin/device`, discovery and the CLI's status lines.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Hardware {
    pub hostname: String,
    /// The CPU's brand string (or the Apple chip's name).
    pub chip_name: Option<String>,
    /// Physical cores; `logical_cores` counts hyperthreads too.
    pub cpu_cores: u32,
    pub logical_cores: u32,
    pub memory_bytes: u64,
    pub memory_gb: f64,
    /// `x86_64`, `aarch64`, ...
    pub architecture: String,
    pub os: String,
    /// llama.cpp GPU backends built in (`cuda`, `metal`, `vulkan`), and what they found.
    pub gpu_backends: Vec<&'static str>,
    pub gpu_memory_bytes: Option<u64>,
    /// Metal built in and usable (an Apple GPU).
    pub metal_available: bool,
}

impl Hardware {
    /// Reads it now (cheap: no CPU usage sampling).
    pub fn read() -> Self {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let mut sys = sysinfo::System::new_with_specifics(
            sysinfo::RefreshKind::nothing().with_cpu(sysinfo::CpuRefreshKind::nothing()),
        );
        sys.refresh_memory();
        let chip_name = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|b| !b.is_empty());
        let gpu_backends: Vec<&'static str> = [
            ("cuda", cfg!(feature = "cuda")),
            ("metal", cfg!(feature = "metal")),
            ("vulkan", cfg!(feature = "vulkan")),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        let gpu = gpu_memory();
        Self {
            hostname: sysinfo::System::host_name().unwrap_or_else(|| "unknown".into()),
            chip_name,
            cpu_cores: sysinfo::System::physical_core_count().map_or(logical, |n| n as u32),
            logical_cores: logical,
            memory_bytes: sys.total_memory(),
            memory_gb: sys.total_memory() as f64 / 1e9,
            architecture: std::env::consts::ARCH.to_string(),
            os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
            metal_available: cfg!(feature = "metal") && gpu.is_some(),
            gpu_memory_bytes: gpu.map(|(total, _)| total),
            gpu_backends,
        }
    }
}

/// Seconds since the Unix epoch with their fraction, as the admin API reports times
/// (events, jobs, outcomes, load times); 0 for a clock before 1970.
pub fn unix_time(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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
        let anon = process_anon_bytes();
        assert!(anon > 0 && anon <= process_rss_bytes());
    }

    #[test]
    fn the_default_threads_leave_a_core_to_the_rest_of_the_machine() {
        let logical = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
        let t = default_threads();
        assert!(t >= 1);
        if logical >= 2 {
            assert!(t < logical, "{t} threads on {logical} cores");
        }
    }
}
