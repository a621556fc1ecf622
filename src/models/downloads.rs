//! Download jobs: files from the Hub go to a hidden folder of the job
//! (`<models>/.downloads/<job>/`), are hashed while they stream, and move into
//! `<models>/<org>/<repo>/` only when every file of the job has verified. The store never lists
//! hidden folders, so nothing half-made or unverified can be loaded. Each job's record is kept
//! beside its files, so a restart finds unfinished jobs (as `interrupted`) and resumes them
//! from the bytes already on disk with `Range` requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::hub::{valid_repo_id, HubClient, HubError, RepoFile};
use super::store::{shard_of, ModelStore};
use crate::audit::{Audit, AuditEvent};
use crate::metrics::Metrics;

/// Attempts per file before a job fails (each resumes where the last one stopped).
const ATTEMPTS: u32 = 5;
/// Free disk kept beyond what a download (or a quantize job's result) needs.
pub(crate) const DISK_MARGIN: u64 = 64 << 20;
/// Beside each unfinished job's record: bytes written ahead, deleted when the disk is full so
/// the record can still be rewritten (with the job's error) instead of being left stale.
const RESERVE_FILE: &str = "job.json.reserve";
/// Size of [`RESERVE_FILE`] at least (twice the record's size when that is more).
const RESERVE_BYTES: usize = 64 << 10;
/// Records of finished jobs kept (newest first); older ones are deleted with their folders,
/// so a client that starts and cancels downloads in a loop cannot grow the list for good.
const FINISHED_KEPT: usize = 100;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Downloading,
    /// Every file verified and moved into the models directory.
    Ready,
    /// A file's bytes did not match the Hub's hash; nothing of the job was kept.
    VerificationFailed,
    /// The Hub or the disk failed; what verified so far is kept for a resume.
    Error,
    Cancelled,
    /// The server stopped while it ran; resume it to continue.
    Interrupted,
}

impl JobState {
    /// Whether the job has stopped (for good or until resumed).
    pub fn finished(self) -> bool {
        matches!(
            self,
            Self::Ready | Self::VerificationFailed | Self::Cancelled
        )
    }
}

/// One file of a job.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileRecord {
    pub path: String,
    pub size_bytes: u64,
    /// The Hub's LFS SHA-256, the check for weights.
    pub sha256: Option<String>,
    /// The Hub's git blob id, the check for small non-LFS files.
    pub git_oid: String,
    pub verified: bool,
    #[serde(default)]
    pub bytes_done: u64,
}

/// A hash that did not match.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Mismatch {
    pub file: String,
    /// `sha256` or `git-sha1`.
    pub algorithm: String,
    pub expected: String,
    pub actual: String,
}

/// A job as stored in `job.json` and shown by the API.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub job_id: String,
    /// The repository, `org/name`.
    pub repo: String,
    pub revision: String,
    /// The commit the revision pointed at when the job started; every file comes from it.
    pub commit: String,
    pub state: JobState,
    pub files: Vec<FileRecord>,
    pub error: Option<String>,
    pub verification: Option<Mismatch>,
    /// Model ids that became loadable.
    pub models: Vec<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// A job with its live progress figures.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub record: JobRecord,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub progress: f64,
    pub rate_bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    /// The job id, state and repository again under the first Opta-LMX's names, which the
    /// coding CLI reads.
    pub download_id: String,
    pub status: JobState,
    pub repo_id: String,
}

/// Why a download could not start or be changed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("not enough disk space in {dir}: the download needs {needed_mb} MB (plus {margin_mb} MB kept free) but {available_mb} MB are available ({reserved_mb} MB of the free space is held for downloads already running)")]
    InsufficientDisk {
        dir: String,
        needed_mb: u64,
        available_mb: u64,
        reserved_mb: u64,
        margin_mb: u64,
    },
    #[error("no download job `{0}`")]
    NoSuchJob(String),
    #[error("download job `{0}` is already {1}")]
    Finished(String, &'static str),
    #[error("models directory: {0}")]
    Io(#[from] std::io::Error),
}

/// `POST /admin/model/download` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadRequest {
    /// `org/repo`, `org/repo:QUANT` or `org/repo/path/file.gguf`.
    #[serde(alias = "model", alias = "repo", alias = "repo_id")]
    pub model_id: String,
    pub revision: Option<String>,
    /// Exact file paths in the repository.
    pub files: Option<Vec<String>>,
    /// A glob over file paths, such as `*Q4_K_M*.gguf`.
    #[serde(alias = "glob")]
    pub pattern: Option<String>,
    /// `huggingface_hub`'s selection, as the first Opta-LMX took it: files matching any of
    /// these globs (in place of the one-model default).
    pub allow_patterns: Option<Vec<String>>,
    /// Files matching any of these globs are left out of whatever was selected.
    pub ignore_patterns: Option<Vec<String>>,
}

/// How often a running download tells `/admin/events` how far it got.
const PROGRESS_EVENT_EVERY: Duration = Duration::from_secs(1);

struct Job {
    record: Mutex<JobRecord>,
    cancel: AtomicBool,
    running: AtomicBool,
    rate: Mutex<Rate>,
}

/// Smoothed transfer rate.
#[derive(Default)]
struct Rate {
    last: Option<(Instant, u64)>,
    bytes_per_second: f64,
}

impl Rate {
    fn sample(&mut self, done: u64) {
        let now = Instant::now();
        match self.last {
            None => self.last = Some((now, done)),
            Some((t, d)) if now.duration_since(t) >= Duration::from_millis(500) => {
                let r = done.saturating_sub(d) as f64 / now.duration_since(t).as_secs_f64();
                self.bytes_per_second = if self.bytes_per_second == 0.0 {
                    r
                } else {
                    0.7 * self.bytes_per_second + 0.3 * r
                };
                self.last = Some((now, done));
            }
            Some(_) => {}
        }
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl JobRecord {
    fn bytes_done(&self) -> u64 {
        self.files.iter().map(|f| f.bytes_done).sum()
    }
}

impl Job {
    fn new(record: JobRecord) -> Arc<Self> {
        Arc::new(Self {
            record: Mutex::new(record),
            cancel: AtomicBool::new(false),
            running: AtomicBool::new(false),
            rate: Mutex::new(Rate::default()),
        })
    }

    /// Records a file's progress; gives the job's bytes done.
    fn set_file_done(&self, index: usize, bytes: u64) -> u64 {
        let mut r = self.record.lock().expect("job lock");
        r.files[index].bytes_done = bytes;
        r.bytes_done()
    }

    fn view(&self) -> JobView {
        let record = self.record.lock().expect("job lock").clone();
        let total: u64 = record.files.iter().map(|f| f.size_bytes).sum();
        let done = if record.state == JobState::Ready {
            total
        } else {
            record.bytes_done().min(total)
        };
        let running = record.state == JobState::Downloading;
        let rate = if running {
            self.rate.lock().expect("rate lock").bytes_per_second
        } else {
            0.0
        };
        JobView {
            bytes_done: done,
            bytes_total: total,
            progress: if total == 0 {
                1.0
            } else {
                done as f64 / total as f64
            },
            rate_bytes_per_second: rate,
            eta_seconds: (running && rate > 0.0).then(|| (total - done) as f64 / rate),
            download_id: record.job_id.clone(),
            status: record.state,
            repo_id: record.repo.clone(),
            record,
        }
    }

    fn id(&self) -> String {
        self.record.lock().expect("job lock").job_id.clone()
    }
}

/// Every download job of this models directory.
pub struct Downloads {
    store: ModelStore,
    hub: HubClient,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// One start at a time, so two identical requests cannot both create a job.
    start_lock: tokio::sync::Mutex<()>,
    /// Held from a job's disk check until it is marked running, so two jobs (a start and a
    /// resume) cannot both count the same free bytes.
    admit: Mutex<()>,
    /// Bytes, verification failures and job outcomes are counted here.
    metrics: Metrics,
    /// Each job's end is an audited action.
    audit: Arc<Audit>,
}

/// How one file's transfer ended, short of success.
enum FileFailure {
    Cancelled,
    Mismatch(Mismatch),
    Failed(String),
}

impl Downloads {
    /// The jobs of `store`, with unfinished ones from before a restart marked `interrupted`.
    pub fn new(
        store: ModelStore,
        hub: HubClient,
        metrics: Metrics,
        audit: Arc<Audit>,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            store,
            hub,
            jobs: Mutex::new(BTreeMap::new()),
            start_lock: tokio::sync::Mutex::new(()),
            admit: Mutex::new(()),
            metrics,
            audit,
        });
        me.restore();
        me.prune_finished();
        me
    }

    fn staging_root(&self) -> PathBuf {
        self.store.root().join(".downloads")
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.staging_root().join(id)
    }

    fn restore(&self) {
        let Ok(entries) = std::fs::read_dir(self.staging_root()) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path().join("job.json");
            let Some(mut rec) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<JobRecord>(&b).ok())
            else {
                continue;
            };
            if rec.job_id != e.file_name().to_string_lossy() {
                continue;
            }
            let dir = e.path();
            if !rec.state.finished() && has_old_layout(&dir) {
                // Staged by a version that kept `<path>.part` beside `<path>`, where two
                // repository names could meet: start those files over rather than guess.
                tracing::info!(event = "download_restaged", job = %rec.job_id, "an unfinished download from an older version starts its files over");
                clear_staged_data(&dir);
                for f in &mut rec.files {
                    f.verified = false;
                }
            }
            for f in &mut rec.files {
                f.bytes_done = if f.verified {
                    f.size_bytes
                } else {
                    std::fs::metadata(partial_path(&dir, &f.path)).map_or(0, |m| m.len())
                };
            }
            let interrupted = rec.state == JobState::Downloading;
            if interrupted {
                rec.state = JobState::Interrupted;
                tracing::info!(event = "download_interrupted", job = %rec.job_id, repo = %rec.repo, "found an unfinished download from before the restart");
            }
            let job = Job::new(rec);
            if interrupted {
                self.persist(&job);
            }
            self.jobs.lock().expect("jobs lock").insert(job.id(), job);
        }
    }

    /// Writes the job's record beside its files (atomically, so a crash leaves the old one).
    /// When the disk is full, the job's reserve is given up for it, so the record that says
    /// why the job stopped is written even then; no half-written file is left behind.
    fn persist(&self, job: &Job) {
        let rec = job.record.lock().expect("job lock").clone();
        let dir = self.job_dir(&rec.job_id);
        let text = serde_json::to_vec_pretty(&rec).unwrap_or_default();
        let tmp = dir.join("job.json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_data()?;
            std::fs::rename(&tmp, dir.join("job.json"))
        };
        let mut outcome = write();
        // (`write` truncates a temporary file a failed try left, so the retry has its room.)
        if outcome.is_err() && std::fs::remove_file(dir.join(RESERVE_FILE)).is_ok() {
            outcome = write();
        }
        if outcome.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        match outcome {
            Err(e) => {
                tracing::warn!(job = %rec.job_id, error = %e, "could not save download job record")
            }
            Ok(()) if rec.state.finished() => {
                let _ = std::fs::remove_file(dir.join(RESERVE_FILE));
            }
            Ok(()) => reserve(&dir, RESERVE_BYTES.max(2 * text.len())),
        }
    }

    /// Deletes the oldest finished jobs' records past [`FINISHED_KEPT`].
    fn prune_finished(&self) {
        let mut finished: Vec<(String, String)> = self
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .filter_map(|j| {
                let r = j.record.lock().expect("job lock");
                r.state
                    .finished()
                    .then(|| (r.created_at.clone(), r.job_id.clone()))
            })
            .collect();
        if finished.len() <= FINISHED_KEPT {
            return;
        }
        finished.sort();
        let excess = finished.len() - FINISHED_KEPT;
        for (_, id) in finished.into_iter().take(excess) {
            self.jobs.lock().expect("jobs lock").remove(&id);
            let _ = std::fs::remove_dir_all(self.job_dir(&id));
        }
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobView> {
        let mut v: Vec<JobView> = self
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .map(|j| j.view())
            .collect();
        v.sort_by(|a, b| b.record.created_at.cmp(&a.record.created_at));
        v
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<JobView> {
        self.jobs
            .lock()
            .expect("jobs lock")
            .get(id)
            .map(|j| j.view())
    }

    /// Lists the repository, picks the files, checks the disk and starts a job. A request
    /// for the same files as an unfinished job resumes that job instead. Returns the job and
    /// whether it is new.
    pub async fn start(
        self: &Arc<Self>,
        req: DownloadRequest,
    ) -> Result<(JobView, bool), DownloadError> {
        let (repo, implied) = parse_model_id(&req.model_id)?;
        let revision = req.revision.clone().unwrap_or_else(|| "main".into());
        if revision.is_empty() || revision.contains("..") || revision.chars().any(char::is_control)
        {
            return Err(DownloadError::Invalid {
                param: "revision",
                message: format!("`{revision}` is not a valid revision"),
            });
        }
        let _one_at_a_time = self.start_lock.lock().await;
        let listing = self.hub.list(&repo, &revision).await?;
        let files = select(&listing.files, &req, implied.as_ref())?;

        let mut wanted: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        wanted.sort_unstable();
        let existing = self
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .find(|j| {
                let r = j.record.lock().expect("job lock");
                let mut paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
                paths.sort_unstable();
                r.repo == repo
                    && r.commit == listing.commit
                    && paths == wanted
                    && !r.state.finished()
            })
            .cloned();
        if let Some(job) = existing {
            self.relaunch(&job)?;
            return Ok((job.view(), false));
        }

        let record = JobRecord {
            job_id: format!("dl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            repo: repo.clone(),
            revision,
            commit: listing.commit,
            state: JobState::Downloading,
            files: files
                .into_iter()
                .map(|f| FileRecord {
                    path: f.path,
                    size_bytes: f.size,
                    sha256: f.sha256,
                    git_oid: f.git_oid,
                    verified: false,
                    bytes_done: 0,
                })
                .collect(),
            error: None,
            verification: None,
            models: Vec::new(),
            created_at: now_rfc3339(),
            finished_at: None,
        };
        let job = Job::new(record);
        let admit = self.admit.lock().expect("admission lock");
        self.check_disk(&job)?;
        self.persist(&job);
        self.jobs
            .lock()
            .expect("jobs lock")
            .insert(job.id(), Arc::clone(&job));
        self.launch(&job);
        drop(admit);
        Ok((job.view(), true))
    }

    /// What a download of `model_id` would fetch (the repository's commit and the files the
    /// default selection picks), without fetching: for a probe of a model not on disk.
    pub async fn preview(&self, model_id: &str) -> Result<(String, Vec<RepoFile>), DownloadError> {
        let (repo, implied) = parse_model_id(model_id)?;
        let listing = self.hub.list(&repo, "main").await?;
        let req = DownloadRequest {
            model_id: model_id.to_string(),
            revision: None,
            files: None,
            pattern: None,
            allow_patterns: None,
            ignore_patterns: None,
        };
        Ok((
            listing.commit,
            select(&listing.files, &req, implied.as_ref())?,
        ))
    }

    /// Resumes an interrupted or failed job from what is on disk.
    pub fn resume(self: &Arc<Self>, id: &str) -> Result<JobView, DownloadError> {
        let job = self.job(id)?;
        let state = job.record.lock().expect("job lock").state;
        if state.finished() {
            return Err(DownloadError::Finished(id.into(), state_name(state)));
        }
        self.relaunch(&job)?;
        Ok(job.view())
    }

    /// Starts an unfinished job again unless it is running.
    fn relaunch(self: &Arc<Self>, job: &Arc<Job>) -> Result<(), DownloadError> {
        let _admit = self.admit.lock().expect("admission lock");
        if !job.running.load(Ordering::SeqCst) {
            self.check_disk(job)?;
            self.launch(job);
        }
        Ok(())
    }

    /// Cancels a job and deletes its partial files.
    pub fn cancel(&self, id: &str) -> Result<JobView, DownloadError> {
        let job = self.job(id)?;
        let state = job.record.lock().expect("job lock").state;
        if state.finished() {
            return Err(DownloadError::Finished(id.into(), state_name(state)));
        }
        job.cancel.store(true, Ordering::SeqCst);
        if !job.running.load(Ordering::SeqCst) {
            self.finish_cancelled(&job);
        }
        Ok(job.view())
    }

    fn job(&self, id: &str) -> Result<Arc<Job>, DownloadError> {
        self.jobs
            .lock()
            .expect("jobs lock")
            .get(id)
            .cloned()
            .ok_or_else(|| DownloadError::NoSuchJob(id.into()))
    }

    /// Whether the disk has room for the rest of `job` beside what every running job still
    /// has to write (free space alone let two jobs count the same bytes). Called with
    /// [`Self::admit`] held.
    fn check_disk(&self, job: &Arc<Job>) -> Result<(), DownloadError> {
        let remaining = |j: &Job| -> u64 {
            let r = j.record.lock().expect("job lock");
            r.files
                .iter()
                .map(|f| f.size_bytes - f.bytes_done.min(f.size_bytes))
                .sum()
        };
        let needed = remaining(job);
        let reserved: u64 = self
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .filter(|j| !Arc::ptr_eq(j, job) && j.running.load(Ordering::SeqCst))
            .map(|j| remaining(j))
            .sum();
        std::fs::create_dir_all(self.store.root())?;
        let free = fs4::available_space(self.store.root())?;
        let available = free.saturating_sub(reserved);
        if needed.saturating_add(DISK_MARGIN) > available {
            return Err(DownloadError::InsufficientDisk {
                dir: self.store.root().display().to_string(),
                needed_mb: needed.div_ceil(1_000_000),
                available_mb: available / 1_000_000,
                reserved_mb: reserved.div_ceil(1_000_000),
                margin_mb: DISK_MARGIN / 1_000_000,
            });
        }
        Ok(())
    }

    fn launch(self: &Arc<Self>, job: &Arc<Job>) {
        if job.running.swap(true, Ordering::SeqCst) {
            return;
        }
        job.cancel.store(false, Ordering::SeqCst);
        {
            let mut r = job.record.lock().expect("job lock");
            let resumed = r.state != JobState::Downloading || r.bytes_done() > 0;
            r.state = JobState::Downloading;
            r.error = None;
            tracing::info!(
                event = if resumed { "download_resumed" } else { "download_started" },
                job = %r.job_id,
                repo = %r.repo,
                commit = %r.commit,
                files = r.files.len(),
                bytes_done = r.bytes_done(),
            );
        }
        self.persist(job);
        let (me, job) = (Arc::clone(self), Arc::clone(job));
        tokio::spawn(async move {
            me.run(&job).await;
            job.running.store(false, Ordering::SeqCst);
            me.ended(&job);
        });
    }

    async fn run(&self, job: &Arc<Job>) {
        let (id, repo, commit, files) = {
            let r = job.record.lock().expect("job lock");
            (
                r.job_id.clone(),
                r.repo.clone(),
                r.commit.clone(),
                r.files.clone(),
            )
        };
        let dir = self.job_dir(&id);
        for (i, f) in files.iter().enumerate() {
            if f.verified {
                continue;
            }
            match self.fetch_file(job, i, f, &dir, &repo, &commit).await {
                Ok(()) => {
                    job.record.lock().expect("job lock").files[i].verified = true;
                    tracing::info!(event = "download_file_verified", job = %id, file = %f.path, bytes = f.size_bytes);
                    self.persist(job);
                }
                Err(FileFailure::Cancelled) => return self.finish_cancelled(job),
                Err(FileFailure::Mismatch(m)) => {
                    self.metrics.prometheus().record_verification_failure();
                    tracing::warn!(event = "download_verification_failed", job = %id, file = %m.file, expected = %m.expected, actual = %m.actual);
                    {
                        let mut r = job.record.lock().expect("job lock");
                        r.error = Some(format!(
                            "`{}` does not match the Hub's {}: expected {}, got {}; the download was deleted",
                            m.file, m.algorithm, m.expected, m.actual
                        ));
                        r.verification = Some(m);
                    }
                    return self.discard(job, JobState::VerificationFailed);
                }
                Err(FileFailure::Failed(msg)) => {
                    tracing::warn!(event = "download_failed", job = %id, file = %f.path, error = %msg);
                    let mut r = job.record.lock().expect("job lock");
                    r.state = JobState::Error;
                    r.error = Some(msg);
                    drop(r);
                    return self.persist(job);
                }
            }
        }
        match self.install(job, &dir, &repo).await {
            Ok(models) => {
                let mut r = job.record.lock().expect("job lock");
                r.state = JobState::Ready;
                r.models = models;
                r.finished_at = Some(now_rfc3339());
                tracing::info!(event = "download_completed", job = %id, repo = %repo, models = ?r.models);
            }
            Err(e) => {
                let mut r = job.record.lock().expect("job lock");
                r.state = JobState::Error;
                r.error = Some(format!("could not move the verified files into place: {e}"));
                tracing::warn!(event = "download_failed", job = %id, error = %e);
            }
        }
        self.persist(job);
    }

    /// The repository a job downloads, for the audit of calls that name only the job.
    pub fn repo_of(&self, job_id: &str) -> Option<String> {
        let jobs = self.jobs.lock().expect("jobs lock");
        let job = jobs.get(job_id)?;
        let repo = job.record.lock().expect("job lock").repo.clone();
        Some(repo)
    }

    /// Counts and audits how a job's run ended.
    fn ended(&self, job: &Job) {
        let (state, repo) = {
            let r = job.record.lock().expect("job lock");
            (state_name(r.state), r.repo.clone())
        };
        self.metrics.prometheus().record_download(state);
        let view = job.view();
        self.metrics.events().emit(
            match view.record.state {
                JobState::Ready => "download_completed",
                JobState::Cancelled => "download_cancelled",
                _ => "download_failed",
            },
            serde_json::json!({
                "download_id": view.record.job_id,
                "repo_id": view.record.repo,
                "status": state,
                "error": view.record.error,
                "models": view.record.models,
                "downloaded_bytes": view.bytes_done,
                "total_bytes": view.bytes_total,
            }),
        );
        let mut e = AuditEvent::now("download_finish", state);
        e.model = Some(repo);
        self.audit.record(&e);
        self.prune_finished();
    }

    fn finish_cancelled(&self, job: &Job) {
        tracing::info!(event = "download_cancelled", job = %job.id());
        self.discard(job, JobState::Cancelled);
    }

    /// Ends a job in `state` with none of its data kept (only its record).
    fn discard(&self, job: &Job, state: JobState) {
        clear_staged_data(&self.job_dir(&job.id()));
        {
            let mut r = job.record.lock().expect("job lock");
            r.state = state;
            r.finished_at = Some(now_rfc3339());
            for f in &mut r.files {
                f.verified = false;
                f.bytes_done = 0;
            }
        }
        self.persist(job);
    }

    /// Moves a verified set into `<models>/<repo>/` and returns the model ids it added.
    async fn install(&self, job: &Job, dir: &Path, repo: &str) -> std::io::Result<Vec<String>> {
        let files = job.record.lock().expect("job lock").files.clone();
        let dest_root = self.store.root().join(repo);
        // A folder link inside the models directory must not carry files out of it.
        if !self.store.resolves_inside(&dest_root)? {
            return Err(std::io::Error::other(format!(
                "`{repo}` resolves outside the models directory (a linked folder); not installing there"
            )));
        }
        let mut placed = Vec::new();
        // An MLX model is a folder: it is assembled under a hidden name (never scanned) and
        // renamed into place whole, so it is never seen half there.
        let is_mlx_folder = files.iter().any(|f| f.path == "config.json")
            && files.iter().any(|f| f.path.ends_with(".safetensors"));
        if is_mlx_folder && !dest_root.exists() {
            let name = dest_root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let building = dest_root.with_file_name(format!(".{name}.installing"));
            let _ = tokio::fs::remove_dir_all(&building).await;
            tokio::fs::create_dir_all(&building).await?;
            for f in &files {
                move_file(&verified_path(dir, &f.path), &building.join(&f.path)).await?;
            }
            tokio::fs::rename(&building, &dest_root).await?;
            placed.push(dest_root.clone());
        }
        let one_by_one = if placed.is_empty() { &files[..] } else { &[] };
        for f in one_by_one {
            let dest = dest_root.join(&f.path);
            if let Some(p) = dest.parent() {
                tokio::fs::create_dir_all(p).await?;
            }
            move_file(&verified_path(dir, &f.path), &dest).await?;
            placed.push(dest);
        }
        clear_staged_data(dir);
        let models = self
            .store
            .scan()?
            .into_iter()
            .filter(|m| placed.contains(&m.path))
            .map(|m| m.id)
            .collect();
        Ok(models)
    }

    /// Transfers one file into `<job>/partial/<path>` (resuming from its length), verifies it
    /// and renames it to `<job>/verified/<path>`.
    async fn fetch_file(
        &self,
        job: &Job,
        index: usize,
        f: &FileRecord,
        dir: &Path,
        repo: &str,
        commit: &str,
    ) -> Result<(), FileFailure> {
        let io = |e: std::io::Error| FileFailure::Failed(format!("writing `{}`: {e}", f.path));
        let part = partial_path(dir, &f.path);
        if let Some(p) = part.parent() {
            tokio::fs::create_dir_all(p).await.map_err(io)?;
        }
        let mut offset = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
        if offset > f.size_bytes {
            offset = 0;
        }
        let mut hasher = FileHasher::new(f);
        if offset > 0 {
            hasher = hash_prefix(hasher, &part, offset).await.map_err(io)?;
        }
        let out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&part)
            .await
            .map_err(io)?;
        out.set_len(offset).await.map_err(io)?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, out);
        tokio::io::AsyncSeekExt::seek(&mut out, std::io::SeekFrom::Start(offset))
            .await
            .map_err(io)?;
        job.set_file_done(index, offset);

        let mut failures = 0u32;
        while offset < f.size_bytes {
            if job.cancel.load(Ordering::SeqCst) {
                return Err(FileFailure::Cancelled);
            }
            let outcome = self
                .transfer(
                    job,
                    f,
                    repo,
                    commit,
                    &mut offset,
                    &mut hasher,
                    &mut out,
                    index,
                )
                .await;
            match outcome {
                Ok(()) => {}
                Err(Transfer::Cancelled) => return Err(FileFailure::Cancelled),
                Err(Transfer::Fatal(msg)) => return Err(FileFailure::Failed(msg)),
                Err(Transfer::Retry(msg)) => {
                    failures += 1;
                    tracing::info!(event = "download_retry", file = %f.path, attempt = failures, offset, reason = %msg);
                    if failures >= ATTEMPTS {
                        out.flush().await.map_err(io)?;
                        return Err(FileFailure::Failed(format!(
                            "`{}` failed {ATTEMPTS} times, last: {msg}; resume the job to continue from byte {offset}",
                            f.path
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(250 << failures.min(4))).await;
                }
            }
        }
        out.flush().await.map_err(io)?;
        drop(out);

        let (algorithm, expected, actual) = hasher.finish(f);
        if actual != expected {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(FileFailure::Mismatch(Mismatch {
                file: f.path.clone(),
                algorithm: algorithm.into(),
                expected,
                actual,
            }));
        }
        let done = verified_path(dir, &f.path);
        if let Some(p) = done.parent() {
            tokio::fs::create_dir_all(p).await.map_err(io)?;
        }
        tokio::fs::rename(&part, done).await.map_err(io)?;
        Ok(())
    }

    /// One request for the rest of a file. Network trouble is `Retry` (the bytes so far are
    /// kept); a Hub refusal or an impossible answer is `Fatal`.
    #[allow(clippy::too_many_arguments)]
    async fn transfer(
        &self,
        job: &Job,
        f: &FileRecord,
        repo: &str,
        commit: &str,
        offset: &mut u64,
        hasher: &mut FileHasher,
        out: &mut tokio::io::BufWriter<tokio::fs::File>,
        index: usize,
    ) -> Result<(), Transfer> {
        let resp = match self.hub.fetch(repo, commit, &f.path, *offset).await {
            Ok(r) => r,
            Err(e @ HubError::Unreachable { .. }) => return Err(Transfer::Retry(e.to_string())),
            Err(e) => return Err(Transfer::Fatal(e.to_string())),
        };
        let io = |e: std::io::Error| Transfer::Fatal(format!("writing `{}`: {e}", f.path));
        match resp.status().as_u16() {
            206 => {
                let start = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(*offset) {
                    return Err(Transfer::Fatal(format!(
                        "the Hub answered a range request for `{}` from byte {} with another range",
                        f.path, offset
                    )));
                }
            }
            200 => {
                if *offset > 0 {
                    // No range support: start over.
                    *offset = 0;
                    *hasher = FileHasher::new(f);
                    out.flush().await.map_err(io)?;
                    out.get_mut().set_len(0).await.map_err(io)?;
                    tokio::io::AsyncSeekExt::seek(out, std::io::SeekFrom::Start(0))
                        .await
                        .map_err(io)?;
                    job.set_file_done(index, 0);
                }
            }
            416 if *offset == f.size_bytes => return Ok(()),
            s => {
                return Err(Transfer::Fatal(format!(
                    "the Hub answered HTTP {s} for `{}`",
                    f.path
                )))
            }
        }
        let mut stream = resp.bytes_stream();
        let mut last_event = Instant::now();
        while let Some(chunk) = stream.next().await {
            if job.cancel.load(Ordering::SeqCst) {
                return Err(Transfer::Cancelled);
            }
            let chunk = chunk.map_err(|e| Transfer::Retry(super::hub::describe(e)))?;
            if *offset + chunk.len() as u64 > f.size_bytes {
                return Err(Transfer::Fatal(format!(
                    "the Hub sent more than the {} bytes it listed for `{}`",
                    f.size_bytes, f.path
                )));
            }
            out.write_all(&chunk).await.map_err(io)?;
            self.metrics
                .prometheus()
                .record_download_bytes(chunk.len() as u64);
            hasher.update(&chunk);
            *offset += chunk.len() as u64;
            let done = job.set_file_done(index, *offset);
            job.rate.lock().expect("rate lock").sample(done);
            if last_event.elapsed() >= PROGRESS_EVENT_EVERY {
                last_event = Instant::now();
                let view = job.view();
                self.metrics.events().emit(
                    "download_progress",
                    serde_json::json!({
                        "download_id": view.record.job_id,
                        "repo_id": view.record.repo,
                        "downloaded_bytes": view.bytes_done,
                        "total_bytes": view.bytes_total,
                        "progress_percent": view.progress * 100.0,
                        "rate_bytes_per_second": view.rate_bytes_per_second,
                    }),
                );
            }
        }
        if *offset < f.size_bytes {
            return Err(Transfer::Retry(format!(
                "the connection ended at byte {offset} of {}",
                f.size_bytes
            )));
        }
        Ok(())
    }
}

/// Where a file of a job is while it downloads. Partial and verified files live in trees of
/// their own, each holding the repository's paths as they are, and the record sits beside
/// both: no repository file name (`x.gguf.part` beside `x.gguf`, or `job.json`) can land on
/// another file's staging name.
fn partial_path(job_dir: &Path, repo_path: &str) -> PathBuf {
    job_dir.join("partial").join(repo_path)
}

/// Where a file of a job waits, verified, for the rest (see [`partial_path`]).
fn verified_path(job_dir: &Path, repo_path: &str) -> PathBuf {
    job_dir.join("verified").join(repo_path)
}

/// Writes `bytes` of zeros to the reserve file of a job folder unless it is there already
/// (best effort: a disk too full for it is a disk the download will fail on anyway).
fn reserve(job_dir: &Path, bytes: usize) {
    let path = job_dir.join(RESERVE_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() as usize >= bytes) {
        return;
    }
    if std::fs::write(&path, vec![0u8; bytes]).is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// Whether a job folder holds files outside the record and the two staging trees.
fn has_old_layout(job_dir: &Path) -> bool {
    std::fs::read_dir(job_dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            !matches!(name.to_str(), Some("job.json" | "partial" | "verified"))
                && !name.to_string_lossy().starts_with("job.json.")
        })
    })
}

/// Deletes everything in a job's staging folder but its record.
fn clear_staged_data(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() != "job.json" {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
}

/// Renames, or copies then removes when the destination is on another disk (a models
/// folder symlinked elsewhere). A copy goes through a hidden name first, so a half-copied
/// file is never visible under the model's name.
async fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match tokio::fs::rename(from, to).await {
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let name = to.file_name().unwrap_or_default().to_string_lossy();
            let tmp = to.with_file_name(format!(".{name}.copying"));
            tokio::fs::copy(from, &tmp).await?;
            tokio::fs::rename(&tmp, to).await?;
            tokio::fs::remove_file(from).await
        }
        other => other,
    }
}

enum Transfer {
    Cancelled,
    Retry(String),
    Fatal(String),
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Downloading => "downloading",
        JobState::Ready => "ready",
        JobState::VerificationFailed => "verification_failed",
        JobState::Error => "error",
        JobState::Cancelled => "cancelled",
        JobState::Interrupted => "interrupted",
    }
}

/// The check a file gets: SHA-256 for LFS files, the git blob SHA-1 otherwise.
enum FileHasher {
    Sha256(Sha256),
    GitSha1(Sha1),
}

impl FileHasher {
    fn new(f: &FileRecord) -> Self {
        if f.sha256.is_some() {
            Self::Sha256(Sha256::new())
        } else {
            let mut h = Sha1::new();
            h.update(format!("blob {}\0", f.size_bytes));
            Self::GitSha1(h)
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(b),
            Self::GitSha1(h) => h.update(b),
        }
    }

    /// (algorithm, expected, actual) in lower-case hex.
    fn finish(self, f: &FileRecord) -> (&'static str, String, String) {
        match self {
            Self::Sha256(h) => (
                "sha256",
                f.sha256.clone().unwrap_or_default(),
                hex::encode(h.finalize()),
            ),
            Self::GitSha1(h) => (
                "git-sha1",
                f.git_oid.to_ascii_lowercase(),
                hex::encode(h.finalize()),
            ),
        }
    }
}

/// Feeds the first `len` bytes already on disk to the hasher, so a resumed file is verified
/// over all of its bytes.
async fn hash_prefix(mut h: FileHasher, path: &Path, len: u64) -> std::io::Result<FileHasher> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?.take(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(h);
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What `model_id` itself says to fetch.
#[derive(Debug, PartialEq)]
enum Implied {
    /// `org/repo:Q4_K_M`
    Quant(String),
    /// `org/repo/path/file.gguf`
    File(String),
}

/// Splits `org/repo[:QUANT | /path]`.
fn parse_model_id(id: &str) -> Result<(String, Option<Implied>), DownloadError> {
    let invalid = || {
        DownloadError::Invalid {
        param: "model_id",
        message: format!(
            "`{id}` is not a Hugging Face repository id (`org/repo`, `org/repo:Q4_K_M` or `org/repo/file.gguf`)"
        ),
    }
    };
    let (head, quant) = match id.rsplit_once(':') {
        Some((h, q)) if !q.is_empty() && !q.contains('/') => (h, Some(q)),
        Some(_) => return Err(invalid()),
        None => (id, None),
    };
    let mut parts = head.splitn(3, '/');
    let (org, name, rest) = (parts.next(), parts.next(), parts.next());
    let repo = match (org, name) {
        (Some(o), Some(n)) => format!("{o}/{n}"),
        _ => return Err(invalid()),
    };
    if !valid_repo_id(&repo) {
        return Err(invalid());
    }
    let implied = match (quant, rest) {
        (Some(_), Some(_)) => return Err(invalid()),
        (Some(q), None) => Some(Implied::Quant(q.to_string())),
        (None, Some(p)) if super::hub::safe_relative_path(p) => Some(Implied::File(p.to_string())),
        (None, Some(_)) => return Err(invalid()),
        (None, None) => None,
    };
    Ok((repo, implied))
}

/// Whether a repository listing is an MLX / safetensors model: a top-level `config.json` and
/// weights.
fn is_mlx_listing(files: &[RepoFile]) -> bool {
    files.iter().any(|f| f.path == "config.json")
        && files
            .iter()
            .any(|f| !f.path.contains('/') && f.path.ends_with(".safetensors"))
}

/// Every file an MLX model folder needs: weights, configs, tokenizer and template files (top
/// level only; no READMEs, images or custom code).
fn mlx_files(files: &[RepoFile]) -> Vec<RepoFile> {
    files
        .iter()
        .filter(|f| !f.path.contains('/'))
        .filter(|f| {
            [
                ".safetensors",
                ".json",
                ".jinja",
                ".model",
                ".txt",
                ".tiktoken",
            ]
            .iter()
            .any(|ext| f.path.ends_with(ext))
        })
        .cloned()
        .collect()
}

/// Picks the files a request means. Without a selection, a repository with exactly one
/// model GGUF gets that one; one with several must be narrowed (weights are many GB each).
fn select(
    files: &[RepoFile],
    req: &DownloadRequest,
    implied: Option<&Implied>,
) -> Result<Vec<RepoFile>, DownloadError> {
    let ggufs = || {
        files.iter().filter(|f| {
            f.path.ends_with(".gguf")
                && !file_name(&f.path)
                    .to_ascii_lowercase()
                    .starts_with("mmproj")
        })
    };
    let glob_opts = glob::MatchOptions {
        case_sensitive: false,
        require_literal_separator: false,
        require_literal_leading_dot: false,
    };
    let globs = |param: &'static str, list: &[String]| {
        list.iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| DownloadError::Invalid {
                    param,
                    message: format!("`{p}` is not a valid glob: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ignored = globs(
        "ignore_patterns",
        req.ignore_patterns.as_deref().unwrap_or(&[]),
    )?;
    let allowed = match &req.allow_patterns {
        Some(list) => Some(globs("allow_patterns", list)?),
        None => None,
    };
    let mut chosen: Vec<RepoFile> = if let Some(allowed) = &allowed {
        files
            .iter()
            .filter(|f| allowed.iter().any(|p| p.matches_with(&f.path, glob_opts)))
            .cloned()
            .collect()
    } else if let Some(list) = &req.files {
        let mut out = Vec::new();
        for want in list {
            match files.iter().find(|f| &f.path == want) {
                Some(f) => out.push(f.clone()),
                None => {
                    return Err(DownloadError::Invalid {
                        param: "files",
                        message: format!(
                            "`{want}` is not a file of this repository at this revision"
                        ),
                    })
                }
            }
        }
        out
    } else if let Some(p) = &req.pattern {
        let pat = glob::Pattern::new(p).map_err(|e| DownloadError::Invalid {
            param: "pattern",
            message: format!("`{p}` is not a valid glob: {e}"),
        })?;
        let opts = glob::MatchOptions {
            case_sensitive: false,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        };
        files
            .iter()
            .filter(|f| pat.matches_with(&f.path, opts))
            .cloned()
            .collect()
    } else {
        match implied {
            Some(Implied::File(p)) => files.iter().filter(|f| &f.path == p).cloned().collect(),
            Some(Implied::Quant(q)) => {
                let q = q.to_ascii_uppercase();
                ggufs()
                    .filter(|f| {
                        file_name(&f.path)
                            .to_ascii_uppercase()
                            .split(['-', '.', '_'])
                            .collect::<Vec<_>>()
                            .windows(q.split('_').count())
                            .any(|w| w.join("_") == q)
                    })
                    .cloned()
                    .collect()
            }
            None if ggufs().next().is_none() && is_mlx_listing(files) => mlx_files(files),
            None => {
                let all: Vec<RepoFile> = ggufs().cloned().collect();
                let models: std::collections::BTreeSet<String> =
                    all.iter().map(|f| model_key(&f.path)).collect();
                if models.len() > 1 {
                    return Err(DownloadError::Invalid {
                        param: "pattern",
                        message: format!(
                            "the repository has {} GGUF models; choose one with `pattern` (e.g. \"*Q4_K_M*.gguf\"), `files`, or `org/repo:QUANT`: {}",
                            models.len(),
                            all.iter().map(|f| f.path.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
                all
            }
        }
    };
    chosen.retain(|f| !ignored.iter().any(|p| p.matches_with(&f.path, glob_opts)));
    if chosen.is_empty() {
        let available: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        return Err(DownloadError::Invalid {
            param: if req.pattern.is_some() {
                "pattern"
            } else {
                "model_id"
            },
            message: format!(
                "no file of the repository matches; it has: {}",
                if available.is_empty() {
                    "no files".to_string()
                } else {
                    available.join(", ")
                }
            ),
        });
    }
    Ok(chosen)
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// The model a GGUF file belongs to (shards of one split model share it).
fn model_key(p: &str) -> String {
    let stem = p.strip_suffix(".gguf").unwrap_or(p);
    shard_of(stem).map_or(stem, |(base, _)| base).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_finished_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join(".downloads");
        let record = |i: usize, state: JobState| JobRecord {
            job_id: format!("dl-{i:04}"),
            repo: "acme/x".into(),
            revision: "main".into(),
            commit: "c".into(),
            state,
            files: Vec::new(),
            error: None,
            verification: None,
            models: Vec::new(),
            created_at: format!("2026-12-04T10:{:02}:{:02}Z", i / 60, i % 60),
            finished_at: None,
        };
        let n = FINISHED_KEPT + 6; // one unfinished, FINISHED_KEPT + 5 finished
        for i in 0..n {
            let state = if i == 0 {
                JobState::Error // unfinished (resumable): never pruned, however old
            } else {
                JobState::Cancelled
            };
            let job = staging.join(format!("dl-{i:04}"));
            std::fs::create_dir_all(&job).unwrap();
            std::fs::write(
                job.join("job.json"),
                serde_json::to_vec(&record(i, state)).unwrap(),
            )
            .unwrap();
        }
        let downloads = Downloads::new(
            ModelStore::new(dir.path()),
            HubClient::new(&crate::config::HubConfig::default()),
            Metrics::default(),
            Arc::new(Audit::disabled()),
        );
        let kept: Vec<String> = downloads
            .list()
            .into_iter()
            .map(|j| j.record.job_id)
            .collect();
        assert_eq!(kept.len(), FINISHED_KEPT + 1);
        assert!(kept.contains(&"dl-0000".to_string()));
        for gone in 1..=5 {
            let id = format!("dl-{gone:04}");
            assert!(!kept.contains(&id), "{id} kept");
            assert!(!staging.join(&id).exists(), "{id}'s folder kept");
        }
        assert!(staging.join(format!("dl-{:04}", n - 1)).exists());
    }

    fn file(path: &str) -> RepoFile {
        RepoFile {
            path: path.into(),
            size: 1,
            sha256: Some("00".into()),
            git_oid: "11".into(),
        }
    }

    fn req(id: &str) -> DownloadRequest {
        DownloadRequest {
            model_id: id.into(),
            revision: None,
            files: None,
            pattern: None,
            allow_patterns: None,
            ignore_patterns: None,
        }
    }

    #[test]
    fn parses_model_ids() {
        assert_eq!(parse_model_id("a/b").unwrap(), ("a/b".into(), None));
        assert_eq!(
            parse_model_id("a/b:q4_k_m").unwrap(),
            ("a/b".into(), Some(Implied::Quant("q4_k_m".into())))
        );
        assert_eq!(
            parse_model_id("a/b/sub/x.gguf").unwrap(),
            ("a/b".into(), Some(Implied::File("sub/x.gguf".into())))
        );
        for bad in ["a", "a/b:", "a/../x", "a/b/../../etc", "/a/b", "a/b:x/y"] {
            assert!(parse_model_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selects_files() {
        let files = [
            file("README.md"),
            file("m-Q4_K_M.gguf"),
            file("m-Q8_0.gguf"),
            file("big-Q4_K_M-00001-of-00002.gguf"),
            file("big-Q4_K_M-00002-of-00002.gguf"),
            file("mmproj-m-f16.gguf"),
        ];
        let err = select(&files, &req("a/b"), None).unwrap_err().to_string();
        assert!(err.contains("m-Q8_0.gguf"), "{err}");
        let q = select(&files, &req("a/b"), Some(&Implied::Quant("q8_0".into()))).unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].path, "m-Q8_0.gguf");
        let mut r = req("a/b");
        r.pattern = Some("big*.gguf".into());
        assert_eq!(select(&files, &r, None).unwrap().len(), 2);
        r.pattern = Some("*.safetensors".into());
        assert!(select(&files, &r, None).is_err());
        let mut r = req("a/b");
        r.files = Some(vec!["README.md".into(), "nope".into()]);
        assert!(select(&files, &r, None).is_err());
        // huggingface_hub's allow / ignore patterns, as the CLI sends them.
        let mut r = req("a/b");
        r.allow_patterns = Some(vec!["*Q4_K_M*.gguf".into(), "README.md".into()]);
        r.ignore_patterns = Some(vec!["big*".into()]);
        let picked: Vec<_> = select(&files, &r, None)
            .unwrap()
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(picked, ["README.md", "m-Q4_K_M.gguf"]);
        r.ignore_patterns = Some(vec!["*".into()]);
        assert!(select(&files, &r, None).is_err());
        r.allow_patterns = Some(vec!["[".into()]);
        assert!(select(&files, &r, None).is_err());
        let single = [
            file("README.md"),
            file("only-Q4_K_M.gguf"),
            file("mmproj-x.gguf"),
        ];
        let s = select(&single, &req("a/b"), None).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].path, "only-Q4_K_M.gguf");
    }

    #[test]
    fn an_mlx_repository_gets_every_file_its_folder_needs() {
        let mlx = [
            file("README.md"),
            file(".gitattributes"),
            file("config.json"),
            file("model-00001-of-00002.safetensors"),
            file("model-00002-of-00002.safetensors"),
            file("model.safetensors.index.json"),
            file("tokenizer.json"),
            file("tokenizer_config.json"),
            file("chat_template.jinja"),
            file("figures/plot.png"),
        ];
        let mut picked: Vec<String> = select(&mlx, &req("mlx-community/x-4bit"), None)
            .unwrap()
            .into_iter()
            .map(|f| f.path)
            .collect();
        picked.sort();
        assert_eq!(
            picked,
            [
                "chat_template.jinja",
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
    }

    #[tokio::test]
    async fn moves_across_filesystems() {
        use std::os::unix::fs::MetadataExt;
        // The build tree is on disk; /dev/shm is a tmpfs on Linux: two filesystems.
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let other = tempfile::tempdir_in("/dev/shm").unwrap();
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        assert_ne!(dev(disk.path()), dev(other.path()), "need two filesystems");
        let from = disk.path().join("m.gguf");
        std::fs::write(&from, b"weights").unwrap();
        let to = other.path().join("m.gguf");
        move_file(&from, &to).await.unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"weights");
        assert!(!from.exists());
        assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 1);
    }

    #[test]
    fn git_blob_hash_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let f = FileRecord {
            path: "x".into(),
            size_bytes: 6,
            sha256: None,
            git_oid: "ce013625030ba8dba906f756967f9e9ca394464a".into(),
            verified: false,
            bytes_done: 0,
        };
        let mut h = FileHasher::new(&f);
        h.update(b"hello\n");
        let (alg, expected, actual) = h.finish(&f);
        assert_eq!(alg, "git-sha1");
        assert_eq!(expected, actual);
    }
}
