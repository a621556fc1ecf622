//! Quantisation jobs (`/admin/quantize`): a model on disk made into a smaller one beside it, as
//! a background job with progress, a verified result and a cancel. A GGUF file goes through
//! llama.cpp's quantizer, an MLX folder through `mlx_lm convert`; both in a child process, so
//! a cancel is a kill and a crash cannot take the server with it. One job runs at a time (each
//! uses every core it is given); the rest wait in order.
//!
//! Nothing half-made is ever listed: the child writes under the models directory's hidden
//! `.quantize/` folder, and only a result that reads back as the asked-for quantisation is
//! moved to its place. The disk is checked before a job is accepted, counting what the jobs
//! already accepted will write.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;

use super::downloads::DISK_MARGIN;
use super::registry::Registry;
use super::store::DiskModel;
use crate::engine::llama::quantize::{self as gguf_quant, GgufType};

/// Finished jobs remembered for `GET /admin/quantize`.
const KEEP_FINISHED: usize = 50;

/// Lines of the child's output kept for a failure's message.
const TAIL_LINES: usize = 12;

/// `POST /admin/quantize` body: the first Opta-LMX's fields, plus `quantization` to name a
/// GGUF type exactly.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuantizeRequest {
    /// Id of a model on disk (GGUF file or MLX folder).
    #[serde(alias = "model_id", alias = "model")]
    pub source_model: String,
    /// Where the result goes, inside the models directory (relative to it, or absolute
    /// under it); default beside the source, named for the new quantisation.
    pub output_path: Option<String>,
    /// 2, 3, 4, 5, 6 or 8 (GGUF: the K-quant medium mix of that size; MLX: bits per weight).
    pub bits: Option<u32>,
    /// MLX group size (32, 64 or 128; default 64).
    pub group_size: Option<u32>,
    /// MLX quantisation mode (`affine`, default; `mxfp4`, `nvfp4`, `mxfp8`).
    pub mode: Option<String>,
    /// A GGUF type by name (`Q4_0`, `Q3_K_M`, `Q8_0`, ...); wins over `bits`.
    #[serde(alias = "type")]
    pub quantization: Option<String>,
}

/// Why a job was not accepted; the API maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("{param}: {message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("model `{0}` is not on disk")]
    NotFound(String),
    #[error("{0} exists already; name another output_path or delete it first")]
    Exists(String),
    #[error("not enough disk for `{model}` as {quantization}: the result needs about {needed_mb} MB (plus a {margin_mb} MB margin) but {available_mb} MB are free in {dir} ({reserved_mb} MB of it promised to jobs already accepted)")]
    InsufficientDisk {
        model: String,
        quantization: String,
        dir: String,
        needed_mb: u64,
        available_mb: u64,
        reserved_mb: u64,
        margin_mb: u64,
    },
    #[error("quantize job `{0}` does not exist")]
    NoSuchJob(String),
    #[error("quantize job `{0}` has ended ({1}); there is nothing to cancel")]
    Ended(String, &'static str),
    #[error("{0}")]
    Io(String),
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    fn ended(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A job as `GET /admin/quantize/{job}` shows it (the coding CLI's `LmxQuantizeJobResult`
/// fields, plus progress and the result's hash).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub job_id: String,
    pub source_model: String,
    /// `gguf` or `mlx`.
    pub format: &'static str,
    pub output_path: String,
    /// The id the result loads under, once it is in place.
    pub output_model_id: Option<String>,
    /// `Q4_K_M`, `4bit`, ...
    pub quantization: String,
    pub bits: u32,
    pub group_size: Option<u32>,
    pub mode: String,
    pub status: JobStatus,
    /// Jobs ahead of this one while it waits.
    pub queue_position: Option<u32>,
    pub progress_percent: f64,
    /// GGUF: tensors written so far and in all.
    pub tensors_done: u32,
    pub tensors_total: u32,
    pub source_size_bytes: u64,
    /// What the disk check counted on.
    pub estimated_size_bytes: u64,
    /// Unix seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub completed_at: Option<f64>,
    pub duration_sec: Option<f64>,
    pub output_size_bytes: Option<u64>,
    pub output_size_gb: Option<f64>,
    /// SHA-256 of the resulting GGUF file, as written and verified.
    pub sha256: Option<String>,
    pub error: Option<String>,
    pub cancel_requested: bool,
}

/// What a job makes.
#[derive(Debug, Clone)]
enum Target {
    Gguf(GgufType),
    Mlx {
        bits: u32,
        group_size: u32,
        mode: String,
    },
}

struct Job {
    view: Mutex<JobView>,
    source: DiskModel,
    target: Target,
    output: PathBuf,
    cancel: AtomicBool,
    cancelled: Notify,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut JobView)) {
        f(&mut self.view.lock().expect("job lock"));
    }
    fn snapshot(&self) -> JobView {
        self.view.lock().expect("job lock").clone()
    }
}

/// The job table and the one-at-a-time runner.
pub struct Quantizer {
    registry: Arc<Registry>,
    /// This server's binary, which runs the GGUF quantizer as `quantize-worker`.
    exe: PathBuf,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    /// Woken whenever a job ends, so the next in line can check whether it is its turn.
    turn: Notify,
}

fn unix_now() -> f64 {
    crate::system::unix_time(std::time::SystemTime::now())
}

impl Quantizer {
    /// A quantizer over `registry`'s models directory, running GGUF work through `exe`.
    /// What a job of an earlier run left in `.quantize/` (a crash, a kill) is removed.
    pub fn new(registry: Arc<Registry>, exe: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(registry.store().root().join(".quantize"));
        Self {
            registry,
            exe,
            jobs: Mutex::default(),
            turn: Notify::new(),
        }
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<JobView> {
        let jobs = self.jobs.lock().expect("jobs lock");
        let mut ahead = 0;
        jobs.iter()
            .map(|j| {
                let mut v = j.snapshot();
                if v.status == JobStatus::Queued {
                    v.queue_position = Some(ahead);
                }
                if !v.status.ended() {
                    ahead += 1;
                }
                v
            })
            .collect()
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<JobView> {
        self.list().into_iter().find(|j| j.job_id == id)
    }

    /// Asks a job to stop: a waiting one never starts, a running one's child is killed and its
    /// partial output removed.
    pub fn cancel(&self, id: &str) -> Result<JobView, QuantizeError> {
        let job = self
            .jobs
            .lock()
            .expect("jobs lock")
            .iter()
            .find(|j| j.view.lock().expect("job lock").job_id == id)
            .cloned()
            .ok_or_else(|| QuantizeError::NoSuchJob(id.to_string()))?;
        let status = job.snapshot().status;
        if status.ended() {
            return Err(QuantizeError::Ended(id.to_string(), status.as_str()));
        }
        job.cancel.store(true, Ordering::SeqCst);
        job.update(|v| v.cancel_requested = true);
        job.cancelled.notify_one();
        Ok(job.snapshot())
    }

    /// Checks a request, reserves its disk and starts it in the background.
    /// Blocking: reads the source's header and scans the disk.
    pub fn start(self: &Arc<Self>, req: &QuantizeRequest) -> Result<JobView, QuantizeError> {
        let config = self.registry.config();
        let name = config.resolve_alias(&req.source_model).to_string();
        let source = self
            .registry
            .store()
            .find(&name)
            .map_err(|e| QuantizeError::Invalid {
                param: "source_model",
                message: e.to_string(),
            })?
            .ok_or_else(|| QuantizeError::NotFound(req.source_model.clone()))?;
        let facts = self
            .registry
            .facts(&source)
            .map_err(|e| QuantizeError::Invalid {
                param: "source_model",
                message: format!("cannot read `{}`: {e}", source.id),
            })?;
        let declared = facts.file_type.clone().unwrap_or_default();
        let (target, quantization, source_bits, target_bits) = if source.format == "mlx" {
            mlx_target(req, &declared)?
        } else {
            gguf_target(req, &declared)?
        };
        let output = self.output_path(&source, req.output_path.as_deref(), &quantization)?;
        if output.exists() {
            return Err(QuantizeError::Exists(output.display().to_string()));
        }
        // Scaled by bits per weight, with a tenth more for what stays unquantized (norms,
        // some embeddings) and the metadata: an over-estimate for the disk check.
        let estimate =
            (source.size_bytes as f64 * target_bits / source_bits * 1.1) as u64 + (16 << 20);
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if jobs
            .iter()
            .any(|j| j.output == output && !j.snapshot().status.ended())
        {
            return Err(QuantizeError::Exists(format!(
                "{} (another job is writing it)",
                output.display()
            )));
        }
        let reserved: u64 = jobs
            .iter()
            .map(|j| j.snapshot())
            .filter(|v| !v.status.ended())
            .map(|v| v.estimated_size_bytes)
            .sum();
        let root = self.registry.store().root().to_path_buf();
        let free = fs4::available_space(&root).map_err(|e| QuantizeError::Io(e.to_string()))?;
        let available = free.saturating_sub(reserved);
        if estimate + DISK_MARGIN > available {
            return Err(QuantizeError::InsufficientDisk {
                model: source.id.clone(),
                quantization,
                dir: root.display().to_string(),
                needed_mb: estimate.div_ceil(1_000_000),
                available_mb: available / 1_000_000,
                reserved_mb: reserved.div_ceil(1_000_000),
                margin_mb: DISK_MARGIN / 1_000_000,
            });
        }
        let (bits, group_size, mode) = match &target {
            Target::Gguf(t) => (gguf_quant::nominal_bits(t.name), None, "llama.cpp".into()),
            Target::Mlx {
                bits,
                group_size,
                mode,
            } => (*bits, Some(*group_size), mode.clone()),
        };
        let view = JobView {
            job_id: format!("quant-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            source_model: source.id.clone(),
            format: source.format,
            output_path: output.display().to_string(),
            output_model_id: None,
            quantization,
            bits,
            group_size,
            mode,
            status: JobStatus::Queued,
            queue_position: None,
            progress_percent: 0.0,
            tensors_done: 0,
            tensors_total: 0,
            source_size_bytes: source.size_bytes,
            estimated_size_bytes: estimate,
            created_at: unix_now(),
            started_at: None,
            completed_at: None,
            duration_sec: None,
            output_size_bytes: None,
            output_size_gb: None,
            sha256: None,
            error: None,
            cancel_requested: false,
        };
        let job = Arc::new(Job {
            view: Mutex::new(view),
            source,
            target,
            output,
            cancel: AtomicBool::new(false),
            cancelled: Notify::new(),
        });
        jobs.push_back(Arc::clone(&job));
        while jobs.len() > KEEP_FINISHED
            && jobs.front().is_some_and(|j| j.snapshot().status.ended())
        {
            jobs.pop_front();
        }
        drop(jobs);
        let this = Arc::clone(self);
        let spawned = Arc::clone(&job);
        tokio::spawn(async move { this.run(spawned).await });
        let view = self
            .get(&job.snapshot().job_id)
            .unwrap_or_else(|| job.snapshot());
        self.emit("quantize_started", &view);
        Ok(view)
    }

    /// The result's path: the asked-for one (inside the models directory, no `..`), or the
    /// source's name with the new quantisation in place of its old one, beside it.
    fn output_path(
        &self,
        source: &DiskModel,
        asked: Option<&str>,
        quantization: &str,
    ) -> Result<PathBuf, QuantizeError> {
        let root = self.registry.store().root();
        let gguf = source.format == "gguf";
        let Some(asked) = asked.filter(|a| !a.trim().is_empty()) else {
            let parent = source.path.parent().unwrap_or(root);
            let name = source
                .path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let stem = name.strip_suffix(".gguf").unwrap_or(&name);
            let base = strip_quantization(stem);
            return Ok(if gguf {
                parent.join(format!("{base}-{quantization}.gguf"))
            } else {
                source
                    .path
                    .with_file_name(format!("{base}-{}", quantization.to_ascii_lowercase()))
            });
        };
        let bad = |message: String| QuantizeError::Invalid {
            param: "output_path",
            message,
        };
        let p = Path::new(asked);
        if p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || asked.chars().any(char::is_control)
        {
            return Err(bad(format!("`{asked}` may not contain `.` or `..` parts")));
        }
        let path = if p.is_absolute() {
            p.strip_prefix(root)
                .map_err(|_| {
                    bad(format!(
                        "`{asked}` is outside the models directory {}",
                        root.display()
                    ))
                })
                .map(|rel| root.join(rel))?
        } else {
            root.join(p)
        };
        // A link inside the models directory may point out of it.
        if !self
            .registry
            .store()
            .resolves_inside(&path)
            .map_err(|e| QuantizeError::Io(e.to_string()))?
        {
            return Err(bad(format!(
                "`{asked}` leads out of the models directory {}",
                root.display()
            )));
        }
        let hidden = path.strip_prefix(root).ok().is_some_and(|rel| {
            rel.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        });
        if hidden || path == root {
            return Err(bad(format!("`{asked}` must name a visible file or folder")));
        }
        Ok(if gguf && path.extension().is_none_or(|e| e != "gguf") {
            let mut s = path.into_os_string();
            s.push(".gguf");
            PathBuf::from(s)
        } else {
            path
        })
    }

    fn emit(&self, event: &'static str, v: &JobView) {
        self.registry.metrics().events().emit(
            event,
            json!({"job_id": v.job_id, "source_model": v.source_model,
                   "quantization": v.quantization, "status": v.status,
                   "progress_percent": v.progress_percent, "output_path": v.output_path,
                   "output_model_id": v.output_model_id, "error": v.error}),
        );
    }

    /// Whether `job` is the oldest job that has not ended (jobs run in the order they were
    /// accepted, whichever task the runtime happens to poll first).
    fn is_next(&self, job: &Arc<Job>) -> bool {
        self.jobs
            .lock()
            .expect("jobs lock")
            .iter()
            .find(|j| !j.snapshot().status.ended())
            .is_some_and(|j| Arc::ptr_eq(j, job))
    }

    async fn run(self: Arc<Self>, job: Arc<Job>) {
        loop {
            // Registered before the check, so a job ending in between still wakes this one.
            let turn = self.turn.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            if job.cancel.load(Ordering::SeqCst) {
                return self.finish(&job, JobStatus::Cancelled, None);
            }
            if self.is_next(&job) {
                break;
            }
            tokio::select! {
                _ = turn => {}
                _ = job.cancelled.notified() => {}
            }
        }
        let started = Instant::now();
        job.update(|v| {
            v.status = JobStatus::Running;
            v.started_at = Some(unix_now());
        });
        let work = self.registry.store().root().join(".quantize");
        let temp = work.join(job.snapshot().job_id);
        let outcome = self.produce(&job, &work, &temp).await;
        let outcome = match outcome {
            Ok(()) => self.place(&job, &temp).await,
            Err(e) => Err(e),
        };
        // Whatever is left of the work is never a model.
        let _ = tokio::fs::remove_file(&temp).await;
        let _ = tokio::fs::remove_dir_all(&temp).await;
        job.update(|v| v.duration_sec = Some(started.elapsed().as_secs_f64()));
        match outcome {
            Ok(()) => self.finish(&job, JobStatus::Completed, None),
            Err(_) if job.cancel.load(Ordering::SeqCst) => {
                self.finish(&job, JobStatus::Cancelled, None)
            }
            Err(e) => self.finish(&job, JobStatus::Failed, Some(e)),
        }
    }

    fn finish(&self, job: &Job, status: JobStatus, error: Option<String>) {
        job.update(|v| {
            v.status = status;
            v.completed_at = Some(unix_now());
            v.error = error.clone();
            if status == JobStatus::Completed {
                v.progress_percent = 100.0;
            }
        });
        self.turn.notify_waiters();
        let v = job.snapshot();
        tracing::info!(event = "quantize_finished", job = %v.job_id, model = %v.source_model, quantization = %v.quantization, status = v.status.as_str(), output = %v.output_path, bytes = ?v.output_size_bytes, seconds = ?v.duration_sec, error = ?v.error);
        self.emit(
            match status {
                JobStatus::Completed => "quantize_completed",
                JobStatus::Cancelled => "quantize_cancelled",
                _ => "quantize_failed",
            },
            &v,
        );
    }

    /// Runs the child until it ends or the job is cancelled, following its progress.
    async fn produce(&self, job: &Arc<Job>, work: &Path, temp: &Path) -> Result<(), String> {
        tokio::fs::create_dir_all(work)
            .await
            .map_err(|e| format!("{}: {e}", work.display()))?;
        // The threads a load of the source would compute with (`--threads`, the config,
        // else physical cores less one): the core left free keeps serving.
        let threads = self
            .registry
            .config()
            .settings_for(&job.source.id)
            .threads
            .unwrap_or_else(crate::system::default_threads);
        let mut cmd = match &job.target {
            Target::Gguf(t) => {
                let mut c = tokio::process::Command::new(&self.exe);
                c.arg("quantize-worker")
                    .arg("--input")
                    .arg(&job.source.path)
                    .arg("--output")
                    .arg(temp)
                    .arg("--ftype")
                    .arg(t.ftype.to_string())
                    .arg("--threads")
                    .arg(threads.to_string());
                c
            }
            Target::Mlx {
                bits,
                group_size,
                mode,
            } => {
                let mut c = tokio::process::Command::new(&self.registry.config().models.mlx.python);
                c.args(["-m", "mlx_lm", "convert", "--hf-path"])
                    .arg(&job.source.path)
                    .arg("--mlx-path")
                    .arg(temp)
                    .args(["-q", "--q-bits", &bits.to_string()])
                    .args(["--q-group-size", &group_size.to_string()])
                    .args(["--q-mode", mode]);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if job.cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the quantizer: {e}"))?;
        let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
        let mut readers = Vec::new();
        let outputs: [Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>; 2] = [
            child.stdout.take().map(|o| Box::new(o) as _),
            child.stderr.take().map(|e| Box::new(e) as _),
        ];
        for out in outputs.into_iter().flatten() {
            let (tail, job) = (Arc::clone(&tail), Arc::clone(job));
            readers.push(tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some((done, total)) = gguf_quant::progress_of(&line) {
                        job.update(|v| {
                            v.tensors_done = done;
                            v.tensors_total = total;
                            // The last percent is the check and the move.
                            v.progress_percent =
                                (f64::from(done) / f64::from(total.max(1)) * 99.0).min(99.0);
                        });
                        continue;
                    }
                    let mut t = tail.lock().expect("tail lock");
                    t.push_back(line);
                    if t.len() > TAIL_LINES {
                        t.pop_front();
                    }
                }
            }));
        }
        // mlx-lm says nothing per tensor: its progress is the bytes written so far.
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut last_event = Instant::now();
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = job.cancelled.notified() => {
                    let _ = child.kill().await;
                    return Err("cancelled".into());
                }
                _ = tick.tick() => {
                    if matches!(job.target, Target::Mlx { .. }) {
                        let written = super::store::folder_bytes(temp);
                        job.update(|v| {
                            v.progress_percent = (written as f64
                                / v.estimated_size_bytes.max(1) as f64 * 99.0).min(99.0);
                        });
                    }
                    if last_event.elapsed().as_secs() >= 2 {
                        last_event = Instant::now();
                        self.emit("quantize_progress", &job.snapshot());
                    }
                }
            }
        }
        .map_err(|e| format!("quantizer: {e}"))?;
        for r in readers {
            let _ = r.await;
        }
        if status.success() {
            Ok(())
        } else {
            let said = tail
                .lock()
                .expect("tail lock")
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            Err(format!("the quantizer exited with {status}: {said}"))
        }
    }

    /// Reads the result back as the asked-for quantisation of the same model, hashes it, and
    /// moves it to its place; then notes the id it loads under.
    async fn place(&self, job: &Arc<Job>, temp: &Path) -> Result<(), String> {
        let registry = Arc::clone(&self.registry);
        let (job2, temp) = (Arc::clone(job), temp.to_path_buf());
        let (size, sha256, id) = tokio::task::spawn_blocking(move || {
            let job = job2;
            let view = job.snapshot();
            let source = registry.facts(&job.source)?;
            let (made, size, sha256) = match &job.target {
                Target::Gguf(_) => {
                    let made = crate::engine::llama::gguf::read(&temp)?;
                    let size = std::fs::metadata(&temp).map_err(|e| e.to_string())?.len();
                    (made, size, Some(sha256_of(&temp)?))
                }
                Target::Mlx { .. } => {
                    let made = crate::engine::mlx::config::read(&temp)?;
                    if !crate::engine::mlx::config::is_model_dir(&temp) {
                        return Err("mlx-lm wrote no weights or tokenizer".to_string());
                    }
                    (made, super::store::folder_bytes(&temp), None)
                }
            };
            let declared = made.file_type.clone().unwrap_or_default();
            if !declared.eq_ignore_ascii_case(&view.quantization)
                || made.architecture != source.architecture
                || made.layers != source.layers
            {
                return Err(format!(
                    "the result does not read back as asked: {} {} with {} layers, {} wanted as {} with {} layers",
                    made.architecture, declared, made.layers, source.architecture, view.quantization, source.layers
                ));
            }
            if job.output.exists() {
                return Err(format!("{} appeared while the job ran; the result was not moved there", job.output.display()));
            }
            if let Some(parent) = job.output.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            std::fs::rename(&temp, &job.output)
                .map_err(|e| format!("moving the result to {}: {e}", job.output.display()))?;
            let id = registry
                .store()
                .scan()
                .ok()
                .and_then(|all| all.into_iter().find(|d| d.path == job.output))
                .map(|d| d.id);
            Ok((size, sha256, id))
        })
        .await
        .map_err(|e| format!("checking the result: {e}"))??;
        job.update(|v| {
            v.output_size_bytes = Some(size);
            v.output_size_gb = Some((size as f64 / 1e9 * 1000.0).round() / 1000.0);
            v.sha256 = sha256;
            v.output_model_id = id;
        });
        Ok(())
    }
}

/// SHA-256 of a file, hex.
fn sha256_of(path: &Path) -> Result<String, String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// The stem without a trailing quantisation (`gemma-3-270m-q4_k_m` → `gemma-3-270m`), so the
/// new one can take its place in the name.
fn strip_quantization(stem: &str) -> &str {
    for sep in ['-', '.', '_'] {
        if let Some((base, last)) = stem.rsplit_once(sep) {
            let last_lower = last.to_ascii_lowercase();
            let known = gguf_quant::type_named(last).is_some()
                || [
                    "f32", "fp16", "bf16", "fp32", "4bit", "8bit", "3bit", "6bit",
                ]
                .contains(&last_lower.as_str());
            if known && !base.is_empty() {
                return base;
            }
        }
    }
    stem
}

/// The GGUF type a request asks for, and its name, with the bits per weight of the source's
/// type and the target's.
fn gguf_target(
    req: &QuantizeRequest,
    declared: &str,
) -> Result<(Target, String, f64, f64), QuantizeError> {
    let names = || {
        gguf_quant::TYPES
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let t = match (&req.quantization, req.bits) {
        (Some(q), _) => gguf_quant::type_named(q).ok_or_else(|| QuantizeError::Invalid {
            param: "quantization",
            message: format!("`{q}` is not a GGUF type offered here ({})", names()),
        })?,
        (None, Some(b)) => gguf_quant::type_for_bits(b).ok_or_else(|| QuantizeError::Invalid {
            param: "bits",
            message: format!("bits is {b}; GGUF offers 2, 3, 4, 5, 6, 8 or 16 (or name a type in `quantization`: {})", names()),
        })?,
        (None, None) => gguf_quant::type_for_bits(4).expect("Q4_K_M is offered"),
    };
    if req.group_size.is_some() {
        return Err(QuantizeError::Invalid {
            param: "group_size",
            message: "group_size applies to MLX models; a GGUF type fixes its own blocks".into(),
        });
    }
    if t.name.eq_ignore_ascii_case(declared) {
        return Err(QuantizeError::Invalid {
            param: "quantization",
            message: format!("the model is {declared} already"),
        });
    }
    // An unknown source type: assume it is no larger per weight than the result, which
    // over-estimates the result rather than under.
    let source_bits = gguf_quant::bits_of(declared).unwrap_or(t.bits_per_weight);
    Ok((
        Target::Gguf(t),
        t.name.to_string(),
        source_bits,
        t.bits_per_weight,
    ))
}

/// The MLX quantisation a request asks for (mlx-lm quantizes full-precision weights only).
fn mlx_target(
    req: &QuantizeRequest,
    declared: &str,
) -> Result<(Target, String, f64, f64), QuantizeError> {
    let bad = |param: &'static str, message: String| QuantizeError::Invalid { param, message };
    if req.quantization.is_some() {
        return Err(bad(
            "quantization",
            "GGUF types apply to GGUF models; an MLX model takes `bits`".into(),
        ));
    }
    let bits = req.bits.unwrap_or(4);
    if ![2, 3, 4, 5, 6, 8].contains(&bits) {
        return Err(bad(
            "bits",
            format!("bits is {bits}; MLX offers 2, 3, 4, 5, 6 or 8"),
        ));
    }
    let group_size = req.group_size.unwrap_or(64);
    if ![32, 64, 128].contains(&group_size) {
        return Err(bad(
            "group_size",
            format!("group_size is {group_size}; MLX offers 32, 64 or 128"),
        ));
    }
    let mode = req.mode.clone().unwrap_or_else(|| "affine".into());
    if !["affine", "mxfp4", "nvfp4", "mxfp8"].contains(&mode.as_str()) {
        return Err(bad(
            "mode",
            format!("mode is `{mode}`; mlx-lm offers affine, mxfp4, nvfp4, mxfp8"),
        ));
    }
    let source_bits = match declared {
        "float32" => 32.0,
        "float16" | "bfloat16" => 16.0,
        q if q.ends_with("bit") => {
            return Err(bad(
                "source_model",
                format!(
                    "the model is quantized already ({q}); quantize its full-precision original"
                ),
            ))
        }
        // Unknown: as if half precision, the common case.
        _ => 16.0,
    };
    // Each group keeps a scale and a bias in half precision.
    let target_bits = f64::from(bits) + 32.0 / f64::from(group_size);
    Ok((
        Target::Mlx {
            bits,
            group_size,
            mode,
        },
        format!("{bits}bit"),
        source_bits,
        target_bits,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_their_old_quantization() {
        assert_eq!(strip_quantization("gemma-3-270m-q4_k_m"), "gemma-3-270m");
        assert_eq!(strip_quantization("Llama-3-Q8_0"), "Llama-3");
        assert_eq!(strip_quantization("model.F16"), "model");
        assert_eq!(strip_quantization("qwen-mlx"), "qwen-mlx");
        assert_eq!(strip_quantization("plain"), "plain");
    }

    fn req(q: Option<&str>, bits: Option<u32>) -> QuantizeRequest {
        QuantizeRequest {
            source_model: "m".into(),
            output_path: None,
            bits,
            group_size: None,
            mode: None,
            quantization: q.map(String::from),
        }
    }

    #[test]
    fn targets_are_checked_against_the_source() {
        let (_, name, from, to) = gguf_target(&req(Some("q4_0"), None), "Q4_K_M").unwrap();
        assert_eq!((name.as_str(), from, to), ("Q4_0", 4.9, 4.55));
        assert_eq!(gguf_target(&req(None, Some(8)), "F32").unwrap().1, "Q8_0");
        assert!(gguf_target(&req(None, Some(4)), "Q4_K_M").is_err());
        assert!(gguf_target(&req(Some("IQ2_XS"), None), "F16").is_err());
        assert!(gguf_target(&req(None, Some(7)), "F16").is_err());
        let (_, name, from, to) = mlx_target(&req(None, Some(4)), "float32").unwrap();
        assert_eq!((name.as_str(), from, to), ("4bit", 32.0, 4.5));
        assert!(mlx_target(&req(None, Some(4)), "4bit").is_err());
        let mut r = req(None, Some(4));
        r.mode = Some("symmetric".into());
        assert!(mlx_target(&r, "float16").is_err());
    }
}
