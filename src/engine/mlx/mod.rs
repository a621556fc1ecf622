//! MLX models (safetensors folders from `mlx-community`), served by one supervised Python
//! worker process per model running `mlx-lm`'s batch generator. Rust keeps everything else:
//! template, tokenizing, detokenizing and stop strings (this module), parsing, SSE, errors.
//!
//! The worker speaks a small versioned protocol over its stdin/stdout (see `worker.py`). A
//! reader thread turns its messages into each request's [`Event`]s; a heartbeat thread pings
//! it and kills it when it stops answering. A worker that dies ends every in-flight request
//! with an error and marks the engine failed, so the registry reloads the model on the next
//! request. The worker exits when its stdin closes, so it never outlives the server.
//!
//! The worker keeps finished sequences' KV as reusable prefixes, bounded in bytes; this side
//! hashes the weights and hands it a directory of the shared disk tier (same file format and
//! bound as llama.cpp's, its own layout key), and turns constraints into the same GBNF as
//! the GGUF path ([`super::grammar`]), which the worker enforces with llguidance.

pub mod blas;
pub mod config;
pub mod tokenizer;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::options::Speculation;
use super::prompt_cache::{self, DiskCacheConfig};
use super::text::TextAssembler;
use super::{
    Backend, EngineError, Event, FinishReason, GenerationRequest, ModelInfo, SchedulerStats,
    TokenId, Usage,
};
use tokenizer::MlxTokenizer;

/// The protocol version this server speaks; a worker announcing another is refused.
const PROTOCOL: u64 = 2;
/// The disk tier's state format for MLX files: mlx-lm's safetensors form of its caches.
const STATE_FORMAT: &str = "mlx-lm=0.32 prompt-cache-safetensors-v1";
const WORKER_SOURCE: &str = include_str!("worker.py");

/// How to start and watch an MLX worker.
#[derive(Debug, Clone)]
pub struct MlxOptions {
    /// Python with `mlx` and `mlx-lm`.
    pub python: PathBuf,
    /// A worker silent for this long is killed.
    pub heartbeat: Duration,
    pub context: u32,
    pub parallel: u32,
    pub max_queue: u32,
    /// Marker texts shown in output even when they are special tokens.
    pub rendered_markers: Vec<String>,
    /// Bound on the worker's in-memory prefix cache.
    pub prefix_cache_bytes: u64,
    /// The disk tier; `None` keeps prefixes in memory only.
    pub disk: Option<DiskCacheConfig>,
    /// The speculation mode requests get unless they name one.
    pub speculation: Speculation,
    /// The draft model's folder for [`Speculation::Draft`].
    pub draft: Option<PathBuf>,
    /// Tokens the draft proposes per round.
    pub draft_max: u32,
    /// A BLAS library preloaded into the worker (see [`blas`]).
    pub blas: Option<PathBuf>,
}

/// One request in flight.
struct Request {
    events: mpsc::UnboundedSender<Event>,
    text: TextAssembler,
    prompt_tokens: u32,
    /// Prompt tokens the worker took from its prefix cache.
    cached: u32,
    generated: u32,
    submitted: Instant,
    first_token: Option<Instant>,
    /// The request field a worker-side refusal names (`response_format`, `tool_choice`).
    param: &'static str,
    /// Its submit message while it waits here for a sequence; `None` once the worker has it.
    /// The server, not the worker, decides who goes next (see [`Shared::dispatch`]).
    held: Option<Value>,
    priority: crate::engine::admission::Priority,
    client: Arc<str>,
    /// Preemption (see [`Shared::dispatch`]): the submit message as first sent, kept while
    /// the request can be paused (never with a grammar, whose state the worker would have
    /// to replay); the tokens it generated (its resume prompt is its prompt and these); its
    /// standing and admission time; a pause asked of the worker and not yet answered.
    pause: Option<PauseState>,
    /// Tokens generated before its last resume: the worker counts from zero again.
    generated_before: u32,
    /// The length of its resume prompt, while its first tokens since resuming are awaited.
    resume_len: Option<u32>,
    /// A sequence is being paused for this request: it takes the sequence when it frees.
    jump: bool,
}

/// What a running MLX request keeps so it can be paused and resumed.
struct PauseState {
    submit: Value,
    tokens: Vec<TokenId>,
    standing: i64,
    admitted: Instant,
    pausing: bool,
}

/// The worker's prefix-cache figures, from its last pong or trim answer.
#[derive(Debug, Default, Clone, Copy)]
struct CacheFigures {
    bytes: u64,
    hits: u64,
    disk_files: Option<u32>,
    proposed: u64,
    accepted: u64,
    rounds: u64,
}

/// What the engine, its reader and its heartbeat share.
struct Shared {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
    requests: Mutex<HashMap<u64, Request>>,
    /// When each client last got a sequence (locked after `requests`).
    served: Mutex<crate::engine::admission::Served>,
    tok: MlxTokenizer,
    next_id: AtomicU64,
    /// Why the worker is gone, once it is.
    failed: Mutex<Option<String>>,
    shutdown: AtomicBool,
    last_pong: Mutex<Instant>,
    rss_bytes: AtomicU64,
    requests_total: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Prompt and generated tokens per second, as `/admin/status` shows for every model.
    rates: Mutex<crate::metrics::RateWindow>,
    cache: Mutex<CacheFigures>,
    /// Sequence numbers of `trim_cache` requests the worker has answered.
    trimmed: (Mutex<u64>, std::sync::Condvar),
    /// The disk tier's root and bound, which this side keeps the whole tree under.
    disk: Option<DiskCacheConfig>,
    /// Sequences the worker decodes at once: more requests wait here, not in the worker.
    parallel: usize,
    /// Preemption: requests paused, and on resume the tokens whose KV came back and those
    /// computed again.
    paused: AtomicU64,
    restored_tokens: AtomicU64,
    recomputed_tokens: AtomicU64,
}

/// A loaded MLX model and its worker.
pub struct MlxEngine {
    info: ModelInfo,
    shared: Arc<Shared>,
    max_queue: u32,
    /// The mode the load asked for (`Draft` only with its draft model loaded); requests may name another.
    speculation: Speculation,
    pid: u32,
}

fn write_msg(w: &mut impl Write, msg: &Value) -> std::io::Result<()> {
    let data = msg.to_string().into_bytes();
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(&data)?;
    w.flush()
}

fn read_msg(r: &mut impl Read) -> std::io::Result<Value> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head)?;
    let n = u32::from_be_bytes(head) as usize;
    if n > 64 << 20 {
        return Err(std::io::Error::other("message too large"));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// The worker script, written once per version where Python can run it.
fn worker_script() -> Result<PathBuf, EngineError> {
    use sha2::{Digest, Sha256};
    let hash = hex::encode(&Sha256::digest(WORKER_SOURCE.as_bytes())[..6]);
    let path = std::env::temp_dir().join(format!("opta-lmx-mlx-worker-{hash}.py"));
    if std::fs::read_to_string(&path).ok().as_deref() != Some(WORKER_SOURCE) {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, WORKER_SOURCE)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| EngineError::Load(format!("writing the MLX worker script: {e}")))?;
    }
    Ok(path)
}

impl MlxEngine {
    /// Starts the worker for the model folder `dir` and waits until it has loaded the
    /// model. Blocking: call from a blocking task.
    pub fn load(dir: &Path, opts: &MlxOptions) -> Result<Self, EngineError> {
        let facts = config::read(dir).map_err(EngineError::Load)?;
        let tok = MlxTokenizer::load(dir, &opts.rendered_markers)?;
        let script = worker_script()?;
        let draft = opts
            .draft
            .as_ref()
            .filter(|_| opts.speculation == Speculation::Draft);
        let settings = json!({"cache_bytes": opts.prefix_cache_bytes, "draft": draft,
                              "num_draft": opts.draft_max.max(1)});
        let mut cmd = Command::new(&opts.python);
        if let Some(lib) = &opts.blas {
            let inherited = std::env::var("LD_PRELOAD").ok();
            cmd.env("LD_PRELOAD", blas::ld_preload(lib, inherited.as_deref()));
        }
        let mut child = cmd
            .arg(&script)
            .arg(dir)
            .arg(opts.parallel.max(1).to_string())
            .arg(settings.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                EngineError::Load(format!(
                    "could not start the MLX worker with `{}` (set models.mlx.python or OPTA_LMX_MLX_PYTHON to a Python with mlx and mlx-lm): {e}",
                    opts.python.display()
                ))
            })?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let ready = match read_msg(&mut stdout) {
            Ok(v) if v["type"] == "ready" => v,
            Ok(v) => {
                let _ = child.kill();
                return Err(EngineError::Load(format!(
                    "the MLX worker answered {v} instead of ready"
                )));
            }
            Err(_) => {
                let status = child.wait().ok();
                return Err(EngineError::Load(format!(
                    "the MLX worker exited while loading {} ({}); its log is on the server's stderr",
                    dir.display(),
                    status.map_or("unknown status".into(), |s| s.to_string())
                )));
            }
        };
        if ready["version"].as_u64() != Some(PROTOCOL) {
            let _ = child.kill();
            return Err(EngineError::Load(format!(
                "the MLX worker speaks protocol {}, this server {PROTOCOL}",
                ready["version"]
            )));
        }
        let context = opts.context.min(facts.context_train.max(16));
        let info = ModelInfo {
            architecture: facts.architecture.clone(),
            context_per_sequence: context,
            parallel: opts.parallel.max(1),
            context_train: facts.context_train,
            parameters: config::parameters(dir),
            gpu_layers: 0,
            threads: 0,
            vocab_size: tok.vocab_size(),
            batch_invariant: false,
            embedding_length: facts.embedding_length,
        };
        let shared = Arc::new(Shared {
            stdin: Mutex::new(Some(stdin)),
            child: Mutex::new(child),
            requests: Mutex::new(HashMap::new()),
            served: Mutex::default(),
            tok,
            next_id: AtomicU64::new(1),
            failed: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            last_pong: Mutex::new(Instant::now()),
            rss_bytes: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            rates: Mutex::new(crate::metrics::RateWindow::default()),
            cache: Mutex::new(CacheFigures::default()),
            trimmed: (Mutex::new(0), std::sync::Condvar::new()),
            disk: opts.disk.clone(),
            parallel: opts.parallel.max(1) as usize,
            paused: AtomicU64::new(0),
            restored_tokens: AtomicU64::new(0),
            recomputed_tokens: AtomicU64::new(0),
        });
        if let Some(cfg) = opts.disk.clone() {
            open_disk_tier(&shared, dir.to_path_buf(), cfg);
        }
        {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("mlx-reader".into())
                .spawn(move || read_loop(&shared, stdout))
                .map_err(|e| EngineError::Load(format!("reader thread: {e}")))?;
        }
        {
            let shared = Arc::clone(&shared);
            let every = opts.heartbeat;
            std::thread::Builder::new()
                .name("mlx-heartbeat".into())
                .spawn(move || heartbeat(&shared, every))
                .map_err(|e| EngineError::Load(format!("heartbeat thread: {e}")))?;
        }
        tracing::info!(event = "mlx_worker_started", pid, model = %dir.display());
        Ok(Self {
            info,
            shared,
            max_queue: opts.max_queue,
            speculation: match opts.speculation {
                Speculation::Draft if draft.is_none() => Speculation::Off,
                mode => mode,
            },
            pid,
        })
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// Hashes the weights off the load path (a large model takes a while the first time; the
/// hash is remembered), then tells the worker where its prefix files live.
fn open_disk_tier(shared: &Arc<Shared>, dir: PathBuf, cfg: DiskCacheConfig) {
    let shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("mlx-prompt-cache".into())
        .spawn(move || {
            let sha = match prompt_cache::weights_sha256(&cfg.root, &dir) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(model = %dir.display(), error = %e, "prompt cache: disk tier unavailable; prefixes stay in memory");
                    return;
                }
            };
            let key = prompt_cache::Layout {
                state_format: STATE_FORMAT,
                model_sha256: sha,
                // The KV of an MLX sequence does not depend on the context setting.
                context_per_sequence: 0,
                type_k: "mlx".into(),
                type_v: "mlx".into(),
            }
            .key();
            let folder = prompt_cache::layout_dir(&cfg.root, &key);
            let _ = shared.send(&json!({
                "type": "disk", "dir": folder, "key": hex::encode(key),
                "min_tokens": cfg.min_tokens,
            }));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "prompt cache: could not start the disk tier");
    }
}

impl Shared {
    fn send(&self, msg: &Value) -> Result<(), EngineError> {
        let mut stdin = self.stdin.lock().expect("stdin lock");
        let w = stdin.as_mut().ok_or(EngineError::Unloaded)?;
        write_msg(w, msg).map_err(|e| EngineError::Decode(format!("the MLX worker is gone: {e}")))
    }

    /// Ends a request whose client left, in the worker too if it had it.
    fn cancel(&self, id: u64) {
        let removed = self.requests.lock().expect("requests lock").remove(&id);
        if let Some(r) = removed {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
            // A paused one's KV is parked in the worker: the cancel frees it.
            if r.held.is_none() || r.resume_len.is_some() {
                let _ = self.send(&json!({"type": "cancel", "id": id}));
            }
            self.dispatch();
        }
    }

    /// Hands waiting requests to the worker while it has free sequences, in the GGUF
    /// scheduler's order (priority, aged; the client with fewer running; the oldest), so the
    /// worker never queues and the order is the server's. Called after every submit and
    /// every end of a request.
    fn dispatch(&self) {
        use crate::engine::admission;
        let mut out = Vec::new();
        let mut parked_gone = Vec::new();
        let mut pause = None;
        {
            let mut requests = self.requests.lock().expect("requests lock");
            let mut served = self.served.lock().expect("served lock");
            // Waiting requests whose client left go without reaching the worker.
            let gone: Vec<u64> = requests
                .iter()
                .filter(|(_, r)| r.held.is_some() && r.events.is_closed())
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                if requests.remove(&id).is_some_and(|r| r.resume_len.is_some()) {
                    parked_gone.push(id);
                }
                self.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            loop {
                let running_ids: Vec<u64> = requests
                    .iter()
                    .filter(|(_, r)| r.held.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                let running: Vec<&str> =
                    running_ids.iter().map(|id| &*requests[id].client).collect();
                let mut ids: Vec<u64> = requests
                    .iter()
                    .filter(|(_, r)| r.held.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                ids.sort_unstable();
                let waiting: Vec<admission::Waiting<'_>> = ids
                    .iter()
                    .map(|id| {
                        let r = &requests[id];
                        admission::Waiting {
                            priority: r.priority,
                            client: &r.client,
                            since: r.submitted,
                            aging_from: served.aging_from(&r.client, r.priority, r.submitted),
                        }
                    })
                    .collect();
                let now = Instant::now();
                // The request a sequence was paused for goes first; then the usual order.
                let jumper = ids.iter().position(|id| requests[id].jump);
                let Some(at) = jumper.or_else(|| admission::next(&waiting, &running, now)) else {
                    break;
                };
                if running.len() >= self.parallel {
                    // Every sequence busy: pause one for this request if the rules say so,
                    // one pause at a time (it frees a sequence when the worker answers).
                    let candidate = &waiting[at];
                    let pausing = requests
                        .values()
                        .any(|r| r.pause.as_ref().is_some_and(|p| p.pausing));
                    if !pausing {
                        let runs: Vec<admission::Running<'_>> = running_ids
                            .iter()
                            .map(|id| {
                                let r = &requests[id];
                                admission::Running {
                                    client: &r.client,
                                    standing: r.pause.as_ref().map_or(i64::MIN, |p| p.standing),
                                    admitted: r.pause.as_ref().map_or(r.submitted, |p| p.admitted),
                                    // Generating (its prompt is in) and without a grammar.
                                    pausable: r.pause.is_some() && r.first_token.is_some(),
                                }
                            })
                            .collect();
                        pause = admission::victim(candidate.priority, candidate.client, &runs)
                            .map(|v| (running_ids[v], ids[at]));
                    }
                    break;
                }
                let standing = waiting[at].effective(now);
                let id = ids[at];
                let r = requests.get_mut(&id).expect("a held request");
                let msg = r.held.take().expect("held");
                r.jump = false;
                served.admitted(&r.client, r.priority, now);
                if r.pause.is_none() && r.resume_len.is_none() && msg["grammar"].is_null() {
                    r.pause = Some(PauseState {
                        submit: msg.clone(),
                        tokens: Vec::new(),
                        standing,
                        admitted: now,
                        pausing: false,
                    });
                } else if let Some(p) = r.pause.as_mut() {
                    p.standing = standing;
                    p.admitted = now;
                }
                out.push((id, msg, r.prompt_tokens));
            }
            if let Some((id, for_id)) = pause {
                if let Some(p) = requests.get_mut(&id).and_then(|r| r.pause.as_mut()) {
                    p.pausing = true;
                }
                if let Some(r) = requests.get_mut(&for_id) {
                    r.jump = true;
                }
            }
        }
        for id in parked_gone {
            let _ = self.send(&json!({"type": "cancel", "id": id}));
        }
        if let Some((id, _)) = pause {
            let _ = self.send(&json!({"type": "pause", "id": id}));
        }
        for (id, msg, prompt) in out {
            match self.send(&msg) {
                Ok(()) if msg["resume"].as_bool() == Some(true) => {}
                Ok(()) => {
                    self.requests_total.fetch_add(1, Ordering::Relaxed);
                    self.prompt_tokens
                        .fetch_add(u64::from(prompt), Ordering::Relaxed);
                }
                Err(e) => {
                    if let Some(r) = self.requests.lock().expect("requests lock").remove(&id) {
                        let _ = r.events.send(Event::Error(e));
                    }
                }
            }
        }
    }

    /// Every request in flight, running or waiting here.
    fn held(&self) -> Vec<super::Held> {
        let requests = self.requests.lock().expect("requests lock");
        let served = self.served.lock().expect("served lock");
        requests
            .values()
            .map(|r| super::Held {
                client: Arc::clone(&r.client),
                priority: r.priority,
                since: r.submitted,
                aging_from: served.aging_from(&r.client, r.priority, r.submitted),
                running: r.held.is_none(),
            })
            .collect()
    }

    fn note_cache(&self, v: &Value, spec: &Value) {
        let mut c = self.cache.lock().expect("cache lock");
        if v.is_object() {
            c.bytes = v["bytes"].as_u64().unwrap_or(0);
            c.hits = v["hits"].as_u64().unwrap_or(0);
            c.disk_files = v["disk_files"].as_u64().map(|n| n as u32);
        }
        if spec.is_object() {
            c.proposed = spec["proposed"].as_u64().unwrap_or(0);
            c.accepted = spec["accepted"].as_u64().unwrap_or(0);
            c.rounds = spec["steps"].as_u64().unwrap_or(0);
        }
    }

    /// The worker is gone: every request ends with an error, and the engine is failed.
    fn fail(&self, why: String) {
        if !self.shutdown.load(Ordering::SeqCst) {
            tracing::error!(event = "mlx_worker_failed", error = %why);
        }
        self.failed
            .lock()
            .expect("failed lock")
            .get_or_insert(why.clone());
        self.stdin.lock().expect("stdin lock").take();
        let unloaded = self.shutdown.load(Ordering::SeqCst);
        for (_, r) in self.requests.lock().expect("requests lock").drain() {
            let e = if unloaded {
                EngineError::Unloaded
            } else {
                EngineError::Decode(why.clone())
            };
            let _ = r.events.send(Event::Error(e));
        }
    }
}

/// The submit message that resumes a paused request: its prompt and what it generated, the
/// answer's remaining length, and `resume` so the worker takes its parked KV.
fn resume_message(r: &mut Request) -> Option<Value> {
    let p = r.pause.as_mut()?;
    p.pausing = false;
    let mut msg = p.submit.clone();
    let mut prompt: Vec<Value> = msg["prompt"].as_array().cloned().unwrap_or_default();
    prompt.extend(p.tokens.iter().map(|&t| json!(t)));
    r.resume_len = Some(prompt.len() as u32);
    let max = msg["max_tokens"].as_u64().unwrap_or(0);
    msg["max_tokens"] = json!(max.saturating_sub(u64::from(r.generated)).max(1));
    msg["prompt"] = Value::Array(prompt);
    msg["resume"] = json!(true);
    Some(msg)
}

fn finish(shared: &Shared, mut r: Request, reason: FinishReason) {
    let rest = r.text.finish();
    if !rest.is_empty() {
        let _ = r.events.send(Event::Text(rest));
    }
    shared
        .completion_tokens
        .fetch_add(u64::from(r.generated), Ordering::Relaxed);
    let total = r.submitted.elapsed();
    let _ = r.events.send(Event::Done {
        finish_reason: reason,
        usage: Usage {
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.generated,
            cached_tokens: r.cached,
        },
        time_to_first_token: r.first_token.unwrap_or(r.submitted) - r.submitted,
        total_time: total,
    });
}

/// A `[logprob, [[id, logprob], …]]` entry of a `tokens` message as an event payload.
fn token_logprob(tok: &MlxTokenizer, id: TokenId, entry: &Value) -> super::TokenLogprob {
    let text = |id: TokenId| {
        let bytes = tok.piece(id).to_vec();
        super::TokenText {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    };
    super::TokenLogprob {
        token: text(id),
        logprob: entry[0].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
        top: entry[1]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let alt = p[0].as_i64().unwrap_or(0) as TokenId;
                (text(alt), p[1].as_f64().unwrap_or(f64::NEG_INFINITY) as f32)
            })
            .collect(),
    }
}

/// Turns the worker's messages into request events until it goes away.
fn read_loop(shared: &Shared, mut out: BufReader<ChildStdout>) {
    loop {
        let msg = match read_msg(&mut out) {
            Ok(m) => m,
            Err(_) => {
                let status = shared.child.lock().expect("child lock").wait().ok();
                shared.fail(format!(
                    "the MLX worker stopped ({})",
                    status.map_or("unknown status".into(), |s| s.to_string())
                ));
                return;
            }
        };
        let id = msg["id"].as_u64().unwrap_or(0);
        match msg["type"].as_str() {
            Some("tokens") => {
                let mut requests = shared.requests.lock().expect("requests lock");
                let Some(r) = requests.get_mut(&id) else {
                    continue;
                };
                let now = Instant::now();
                let tokens = msg["tokens"].as_array().map_or(0, Vec::len) as u64;
                match (msg["cached"].as_u64(), r.resume_len.take()) {
                    (Some(c), Some(len)) => {
                        // Resumed: all but the last token of its resume prompt were in its
                        // parked KV, unless that could not be kept.
                        let held = u64::from(len.saturating_sub(1));
                        let c = c.min(held);
                        shared.restored_tokens.fetch_add(c, Ordering::Relaxed);
                        shared
                            .recomputed_tokens
                            .fetch_add(held - c, Ordering::Relaxed);
                        tracing::info!(
                            client = %r.client,
                            restored = c,
                            recomputed = held - c,
                            "paused sequence resumed"
                        );
                    }
                    (Some(c), None) => {
                        r.cached = (c as u32).min(r.prompt_tokens);
                        shared
                            .cached_tokens
                            .fetch_add(u64::from(r.cached), Ordering::Relaxed);
                    }
                    _ => {}
                }
                // The first tokens mean the prompt was prefilled (what was not reused).
                let prompt = if r.first_token.is_none() {
                    u64::from(r.prompt_tokens - r.cached)
                } else {
                    0
                };
                shared
                    .rates
                    .lock()
                    .expect("rates lock")
                    .record(now, prompt, tokens);
                let mut stopped = false;
                let mut gone = false;
                let logprobs = msg["logprobs"].as_array();
                for (i, t) in msg["tokens"].as_array().into_iter().flatten().enumerate() {
                    let tok = t.as_i64().unwrap_or(-1) as TokenId;
                    // A token's log-probability goes out before its text, as llama.cpp's do.
                    if let Some(lp) = logprobs.and_then(|l| l.get(i)) {
                        let _ = r
                            .events
                            .send(Event::Logprob(token_logprob(&shared.tok, tok, lp)));
                    }
                    r.generated += 1;
                    r.first_token.get_or_insert_with(Instant::now);
                    if let Some(p) = r.pause.as_mut() {
                        p.tokens.push(tok);
                    }
                    let out = r.text.push(shared.tok.piece(tok));
                    if !out.text.is_empty() && r.events.send(Event::Text(out.text)).is_err() {
                        gone = true;
                        break;
                    }
                    if out.stopped {
                        stopped = true;
                        break;
                    }
                }
                if gone {
                    drop(requests);
                    shared.cancel(id);
                } else if stopped {
                    let r = requests.remove(&id).expect("present");
                    drop(requests);
                    let _ = shared.send(&json!({"type": "cancel", "id": id}));
                    finish(shared, r, FinishReason::Stop);
                    shared.dispatch();
                }
            }
            Some("paused") => {
                let mut requests = shared.requests.lock().expect("requests lock");
                if let Some(r) = requests.get_mut(&id) {
                    r.held = resume_message(r);
                    r.generated_before = r.generated;
                    shared.paused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        client = %r.client,
                        priority = r.priority,
                        tokens = msg["tokens"].as_u64().unwrap_or(0),
                        "sequence paused for a higher-priority request"
                    );
                }
                drop(requests);
                shared.dispatch();
            }
            Some("pause_refused") => {
                // It finished, or is not pausable right now: it keeps its sequence, and is
                // not asked again.
                if let Some(r) = shared.requests.lock().expect("requests lock").get_mut(&id) {
                    r.pause = None;
                }
                shared.dispatch();
            }
            Some("done") => {
                let r = shared.requests.lock().expect("requests lock").remove(&id);
                if let Some(mut r) = r {
                    r.generated = msg["generated"]
                        .as_u64()
                        .map_or(r.generated, |g| r.generated_before + g as u32);
                    let reason = match msg["reason"].as_str() {
                        Some("length") => FinishReason::Length,
                        _ => FinishReason::Stop,
                    };
                    finish(shared, r, reason);
                    shared.dispatch();
                }
            }
            Some("pong") => {
                *shared.last_pong.lock().expect("pong lock") = Instant::now();
                shared
                    .rss_bytes
                    .store(msg["rss_bytes"].as_u64().unwrap_or(0), Ordering::Relaxed);
                shared.note_cache(&msg["cache"], &msg["spec"]);
            }
            Some("trimmed") => {
                shared.note_cache(&msg["cache"], &Value::Null);
                let (seq, answered) = &shared.trimmed;
                let mut seq = seq.lock().expect("trim lock");
                *seq = (*seq).max(msg["seq"].as_u64().unwrap_or(0));
                answered.notify_all();
            }
            Some("saved") => {
                // A prefix file was written: the whole tree (every model, both formats) is
                // kept under its bound here, as llama.cpp's saves keep it.
                if let Some(cfg) = shared.disk.clone() {
                    std::thread::spawn(move || prompt_cache::trim(&cfg.root, cfg.max_bytes));
                }
            }
            Some("error") => {
                let message = msg["message"]
                    .as_str()
                    .unwrap_or("worker error")
                    .to_string();
                tracing::warn!(event = "mlx_request_failed", error = %message);
                let r = shared.requests.lock().expect("requests lock").remove(&id);
                if let Some(r) = r {
                    // A grammar the worker refused is the client's error, as on GGUF.
                    let e = if msg["param"].is_string() {
                        EngineError::InvalidParam {
                            param: r.param,
                            message,
                        }
                    } else {
                        EngineError::Decode(message)
                    };
                    let _ = r.events.send(Event::Error(e));
                    shared.dispatch();
                }
            }
            _ => tracing::warn!(event = "mlx_unknown_message", message = %msg),
        }
    }
}

/// Pings the worker; kills it when it has not answered within `limit`. Also notices clients
/// that left while their request was still prefilling (no token yet to fail on).
fn heartbeat(shared: &Shared, limit: Duration) {
    let every = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut seq = 0u64;
    while !shared.shutdown.load(Ordering::SeqCst) && shared.failed.lock().expect("lock").is_none() {
        std::thread::sleep(every);
        seq += 1;
        let _ = shared.send(&json!({"type": "ping", "seq": seq}));
        let gone: Vec<u64> = shared
            .requests
            .lock()
            .expect("requests lock")
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            shared.cancel(id);
        }
        let silent = shared.last_pong.lock().expect("pong lock").elapsed();
        if silent > limit {
            tracing::error!(
                event = "mlx_worker_unresponsive",
                silent_ms = silent.as_millis() as u64
            );
            let _ = shared.child.lock().expect("child lock").kill();
            return;
        }
    }
}

impl Backend for MlxEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn chat_template_source(&self) -> Option<&str> {
        self.shared.tok.template.as_deref()
    }

    fn special_tokens(&self) -> (String, String) {
        (self.shared.tok.bos.clone(), self.shared.tok.eos.clone())
    }

    fn has_special_token(&self, text: &str) -> bool {
        self.shared.tok.has_token(text)
    }

    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Vec<TokenId> {
        self.shared.tok.encode(text, add_bos, special)
    }

    fn control_texts(&self) -> &[String] {
        &self.shared.tok.control_texts
    }

    fn submit(
        &self,
        mut req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        // A draft model it does not have is refused by name, as on GGUF; prompt lookup needs
        // nothing loaded.
        let mode = req.speculation.unwrap_or(self.speculation);
        if mode == Speculation::Draft && self.speculation != Speculation::Draft {
            return Err(super::grammar::no_draft_model());
        }
        // The same schema subset and the same refusals as GGUF: one converter makes the
        // grammar, which the worker enforces (lazily, from a trigger on, under `auto`).
        let mut param = "response_format";
        let mut triggers = req.sampling.grammar_triggers.clone();
        if let Some(c) = req.constraint.take() {
            param = c.param;
            let lazy = !c.triggers.is_empty();
            if let Some(g) = super::grammar::unless_lazy(super::grammar::grammar_for(&c), lazy)? {
                req.sampling.grammar = Some(g);
                triggers = c.triggers;
            }
        }
        if let Some(why) = self.shared.failed.lock().expect("failed lock").clone() {
            return Err(EngineError::Decode(why));
        }
        let vocab = self.info.vocab_size as TokenId;
        if let Some((pos, &t)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t >= vocab)
        {
            return Err(EngineError::InvalidParam {
                param: "prompt",
                message: format!(
                    "prompt token id {t} at position {pos} is outside the vocabulary (0..{vocab})"
                ),
            });
        }
        let limit = (self.info.parallel + self.max_queue) as usize;
        let mut requests = self.shared.requests.lock().expect("requests lock");
        if requests.len() >= limit {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(EngineError::QueueFull {
                queue: self.max_queue,
                retry_after_secs: 5,
            });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let s = &req.sampling;
        let bias: serde_json::Map<String, Value> = s
            .logit_bias
            .iter()
            .map(|(t, b)| (t.to_string(), json!(b)))
            .collect();
        let msg = json!({
            "type": "submit", "id": id, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty, "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty, "logit_bias": bias,
            "logprobs": req.logprobs,
            "grammar": s.grammar, "triggers": triggers,
            "speculate": match mode {
                Speculation::Draft => Some("draft"),
                Speculation::Ngram => Some("ngram"),
                Speculation::Off => None,
            },
        });
        let (tx, rx) = mpsc::unbounded_channel();
        requests.insert(
            id,
            Request {
                events: tx,
                text: TextAssembler::new(req.stop.clone()),
                prompt_tokens: req.prompt.len() as u32,
                cached: 0,
                generated: 0,
                submitted: Instant::now(),
                first_token: None,
                param,
                held: Some(msg),
                priority: req.priority.unwrap_or(0),
                client: req.client.clone().unwrap_or_else(|| Arc::from("")),
                pause: None,
                generated_before: 0,
                resume_len: None,
                jump: false,
            },
        );
        drop(requests);
        self.shared.dispatch();
        Ok(rx)
    }

    fn stats(&self) -> SchedulerStats {
        let s = &self.shared;
        let (active, queued) = {
            let requests = s.requests.lock().expect("requests lock");
            let queued = requests.values().filter(|r| r.held.is_some()).count() as u32;
            (requests.len() as u32 - queued, queued)
        };
        let (prompt_rate, decode_rate) = s.rates.lock().expect("rates lock").rates(Instant::now());
        let cache = *s.cache.lock().expect("cache lock");
        SchedulerStats {
            active_sequences: active,
            queued_requests: queued,
            max_queue: self.max_queue,
            requests_total: s.requests_total.load(Ordering::Relaxed),
            cancelled_total: s.cancelled.load(Ordering::Relaxed),
            rejected_total: s.rejected.load(Ordering::Relaxed),
            prompt_tokens_total: s.prompt_tokens.load(Ordering::Relaxed),
            cached_prompt_tokens_total: s.cached_tokens.load(Ordering::Relaxed),
            completion_tokens_total: s.completion_tokens.load(Ordering::Relaxed),
            preemption: super::PreemptionStats {
                paused_total: s.paused.load(Ordering::Relaxed),
                restored_tokens_total: s.restored_tokens.load(Ordering::Relaxed),
                recomputed_tokens_total: s.recomputed_tokens.load(Ordering::Relaxed),
            },
            prompt_tokens_per_second: prompt_rate,
            decode_tokens_per_second: decode_rate,
            prompt_cache_files: cache.disk_files,
            prompt_cache_bytes: Some(cache.bytes),
            prompt_cache_hits_total: cache.hits,
            speculation: super::SpeculationStats {
                mode: self.speculation,
                proposed_tokens_total: cache.proposed,
                accepted_tokens_total: cache.accepted,
                speculative_steps_total: cache.rounds,
            },
        }
    }

    fn failed(&self) -> Option<String> {
        self.shared.failed.lock().expect("failed lock").clone()
    }

    fn worker(&self) -> Option<(u32, u64)> {
        Some((self.pid, self.shared.rss_bytes.load(Ordering::Relaxed)))
    }

    fn held(&self) -> Vec<super::Held> {
        self.shared.held()
    }

    fn prefix_cache_bytes(&self) -> u64 {
        self.shared.cache.lock().expect("cache lock").bytes
    }

    fn release_prefix_cache(&self) {
        static SEQ: AtomicU64 = AtomicU64::new(1);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        if self
            .shared
            .send(&json!({"type": "trim_cache", "seq": seq, "bytes": 0}))
            .is_err()
        {
            return;
        }
        // Between generation steps, after writing long prefixes to disk: seconds at most.
        let (answered, wake) = &self.shared.trimmed;
        let guard = answered.lock().expect("trim lock");
        let _ = wake
            .wait_timeout_while(guard, Duration::from_secs(30), |a| *a < seq)
            .expect("trim lock");
    }

    fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        let _ = self.shared.send(&json!({"type": "shutdown"}));
        self.shared.stdin.lock().expect("stdin lock").take();
        let mut child = self.shared.child.lock().expect("child lock");
        // A clean exit, after the worker has written its long prefixes to the disk tier, else
        // a kill: it must not outlive the model.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        drop(child);
        self.shared.fail("the model was unloaded".into());
    }
}
