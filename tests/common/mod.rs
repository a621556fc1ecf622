//! Starts the real `opta-lmx` binary on a free port with the real Gemma model, and small HTTP
//! helpers for the tests. Each test gets its own server, killed when the guard drops.

#![allow(dead_code)]

pub mod events;
pub mod fleet;
pub mod hub;
pub mod metrics;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Id the test model is served under.
pub const MODEL: &str = "gemma-3-270m-q4_k_m";

/// The Gemma GGUF placed by `scripts/fetch-model.sh`; tests fail (not skip) without it.
pub fn model_file() -> PathBuf {
    let p = std::env::var_os("OPTA_LMX_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-model/gemma-3-270m-q4_k_m.gguf")
        });
    assert!(
        p.exists(),
        "test model missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Id the instruction-tuned Qwen model is served under in tests that need a chat model.
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m";

/// The Qwen GGUF placed by `scripts/fetch-model.sh qwen`; tests fail (not skip) without it.
pub fn qwen_file() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/test-model/{QWEN}.gguf"));
    assert!(
        p.exists(),
        "test model missing at {}: run scripts/fetch-model.sh qwen",
        p.display()
    );
    p
}

/// A wrapper (for [`Opts::wrap`]) that runs the server in a private mount namespace with a
/// `mb`-megabyte tmpfs over `dir` (its files copied in first), so a test can fill a disk
/// without touching the machine's. The server's view of it is under `/proc/<pid>/root`.
pub fn small_disk(dir: &Path, mb: u32) -> Vec<String> {
    vec![
        "unshare".into(),
        "-rm".into(),
        "sh".into(),
        "-c".into(),
        format!(
            r#"cd "$0" && mount -t tmpfs -o size={mb}m tmpfs "$0" && cp -a . "$0"/ && cd / && exec "$@""#
        ),
        dir.display().to_string(),
    ]
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub base: String,
    pub models_dir: PathBuf,
    /// Owns the models directory unless the test passed its own.
    _tmp: Option<tempfile::TempDir>,
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for a test server.
pub struct Opts {
    pub load_model: bool,
    /// Context per sequence (`--context`); 0 leaves it to the server's default.
    pub context: u32,
    pub parallel: u32,
    pub extra_args: Vec<String>,
    /// Use this models directory (kept after the server stops) instead of a fresh one.
    pub models_dir: Option<PathBuf>,
    /// Extra environment variables (HF_ENDPOINT, HF_TOKEN, ...).
    pub env: Vec<(String, String)>,
    /// More ids the Gemma model is linked under (`<id>.gguf`) before the server starts.
    pub also_link: Vec<String>,
    /// A command the server is started through (its arguments, then the server's command
    /// line): a private mount namespace with a small disk, say.
    pub wrap: Vec<String>,
    /// The config file's YAML (empty by default).
    pub config: String,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            load_model: true,
            context: 1024,
            parallel: 2,
            extra_args: Vec::new(),
            models_dir: None,
            env: Vec::new(),
            also_link: Vec::new(),
            wrap: Vec::new(),
            config: String::new(),
        }
    }
}

/// The binary under test, with a clean environment (no user config, no OPTA_LMX_* leaking in).
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_opta-lmx"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OPTA_LMX_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Server {
    /// Starts a server with the Gemma model linked into a fresh models directory.
    pub fn start(opts: Opts) -> Server {
        let (tmp, dir) = match &opts.models_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir().unwrap();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        for id in std::iter::once(MODEL).chain(opts.also_link.iter().map(String::as_str)) {
            let link = dir.join(format!("{id}.gguf"));
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(model_file(), &link).unwrap();
            }
        }
        let config = dir.join(".config.yaml");
        std::fs::write(&config, &opts.config).unwrap();
        // Appends, so a restarted server's log follows the first one's.
        let log = dir.join(".server.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let port = free_port();
        let mut cmd = if opts.wrap.is_empty() {
            command()
        } else {
            let mut c = Command::new(&opts.wrap[0]);
            c.args(&opts.wrap[1..]).arg(env!("CARGO_BIN_EXE_opta-lmx"));
            for (k, _) in std::env::vars() {
                if k.starts_with("OPTA_LMX_") {
                    c.env_remove(k);
                }
            }
            c
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--port")
            .arg(port.to_string())
            .arg("--models-dir")
            .arg(&dir)
            .args(
                // 0: no context setting, the server's own default.
                (opts.context > 0)
                    .then(|| ["--context".to_string(), opts.context.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--parallel")
            .arg(opts.parallel.to_string())
            .args(&opts.extra_args)
            .stdout(Stdio::null())
            .env_remove("HF_TOKEN")
            .env_remove("HF_ENDPOINT")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stderr(log_file);
        if opts.load_model {
            cmd.arg("--model").arg(MODEL);
        }
        // One compute thread per server unless a test says otherwise: tests run two at a
        // time, and llama.cpp's threads spin at every barrier while they wait for each
        // other, so two servers of two threads each on a two-core runner took whole seconds
        // a token (a 60-token stream ran past the 60 s drain limit in CI).
        if !opts.extra_args.iter().any(|a| a == "--threads") {
            cmd.arg("--threads").arg("1");
        }
        // The audit log beside the test's models, never in the home.
        if !opts.extra_args.iter().any(|a| a == "--audit-file") {
            cmd.arg("--audit-file").arg(dir.join(".audit.jsonl"));
        }
        // The prefix cache's disk tier only where a test asks for it (with a directory of
        // its own): elsewhere a prefix restored from disk would change what a test measures.
        if !opts.extra_args.iter().any(|a| a == "--prompt-cache-dir") {
            cmd.arg("--no-prompt-cache");
        }
        let child = cmd.spawn().expect("start opta-lmx");
        let mut server = Server {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            models_dir: dir,
            _tmp: tmp,
            log,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("server exited early ({status}): {}", self.log_text());
            }
            if health_ok(self.port) {
                return;
            }
            // An HTTPS server answers no plain request: its start line says it is up.
            if self
                .log_text()
                .lines()
                .any(|l| l.contains("opta-lmx listening") && l.contains("https"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server did not become ready: {}", self.log_text());
    }

    /// Kills the server at once (SIGKILL), as a crash or power cut would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Links the test model into the models directory under another name (another id).
    pub fn link_model(&self, relative: &str) {
        let p = self.models_dir.join(relative);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(model_file(), p).unwrap();
    }

    /// DELETEs and returns status and parsed body.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .delete(self.url(path))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The server's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the server to exit on its own, failing the test after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The audit log's lines so far, parsed.
    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.models_dir.join(".audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Full URL for a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs JSON and returns the response unread (for streams and headers).
    pub async fn send(&self, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs JSON and returns status and parsed body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.send(path, body).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs raw bytes (for malformed-body tests).
    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GETs and returns status and parsed body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(self.url(path)).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A greedy chat completion's text.
    pub async fn chat_text(&self, body: Value) -> String {
        let (s, v) = self.post("/v1/chat/completions", &body).await;
        assert_eq!(s, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// Whether `GET /healthz` answers 200, over a plain socket so it works inside async tests.
fn health_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap_or(0);
    buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200")
}

/// Parses an SSE body into its `data:` payloads, checking the framing on the way:
/// every event is `data: ...` lines followed by a blank line, or a `:` comment.
pub fn sse_data(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "stream must end with a blank line: {body:?}"
    );
    let mut out = Vec::new();
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        if event.starts_with(':') {
            continue;
        }
        let payload = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("event without `data: ` prefix: {event:?}"));
        assert!(!payload.contains('\n'), "one line per event: {event:?}");
        out.push(payload.to_string());
    }
    out
}

/// The OpenAI error body's fields, asserting its shape.
pub fn error_fields(v: &Value) -> (String, String, Value, Value) {
    let e = &v["error"];
    assert!(e.is_object(), "not an OpenAI error body: {v}");
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error body lacks `{k}`: {v}");
    }
    (
        e["message"].as_str().unwrap().to_string(),
        e["type"].as_str().unwrap().to_string(),
        e["param"].clone(),
        e["code"].clone(),
    )
}

/// Gemma's end-of-generation tokens (`<eos>`, `<end_of_turn>`) banned, as a `logit_bias`, so a
/// generation runs to `max_tokens`.
pub fn no_eos() -> Value {
    serde_json::json!({"1": -100, "106": -100})
}

/// The first `n` words of a completion: what a batched answer must share with the same prompt
/// served alone. llama.cpp's CPU matrix kernels round differently for different batch sizes,
/// so a nearly tied next token may flip later on; a sequence mixed up with another differs at
/// once.
pub fn opening_words(text: &str, n: usize) -> Vec<String> {
    text.split_whitespace().take(n).map(String::from).collect()
}

impl Server {
    /// `GET /admin/status` → `performance`.
    pub async fn performance(&self) -> Value {
        let (code, v) = self.get("/admin/status").await;
        assert_eq!(code, 200, "{v}");
        v["performance"].clone()
    }

    /// Polls `/admin/status` until `performance.<field>` equals `want`, failing after `limit`.
    pub async fn wait_for(&self, field: &str, want: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.performance().await;
            if p[field].as_u64() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{field} never reached {want}: {p}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Reads a chat completion stream: its text (non-empty content deltas, in order), its usage
/// (with `stream_options.include_usage`), and when it ended. `ready` is told once that many
/// content chunks (so at least that many tokens) have arrived.
pub async fn read_chat_stream(
    r: reqwest::Response,
    ready: Option<(usize, tokio::sync::oneshot::Sender<()>)>,
) -> (String, Value, Instant) {
    use futures_util::StreamExt;
    assert_eq!(r.status(), 200);
    let mut ready = ready;
    let (mut raw, mut text, mut usage, mut chunks) = (String::new(), String::new(), Value::Null, 0);
    let mut bytes = r.bytes_stream();
    while let Some(b) = bytes.next().await {
        raw.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
        while let Some(end) = raw.find("\n\n") {
            let event: String = raw.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|c| !c.is_empty())
            {
                text.push_str(c);
                chunks += 1;
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
            if ready.as_ref().is_some_and(|(after, _)| chunks >= *after) {
                let _ = ready.take().unwrap().1.send(());
            }
        }
    }
    (text, usage, Instant::now())
}

impl Server {
    /// `GET /metrics`, as text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /metrics`, parsed.
    pub async fn scrape(&self) -> metrics::Scrape {
        metrics::Scrape::parse(&self.metrics_text().await)
    }
}

/// Polls a quantize job until `done` says so (or ten minutes pass: a slow runner, not a hang).
pub async fn wait_quantize_job(s: &Server, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (code, v) = s.get(&format!("/admin/quantize/{id}")).await;
        assert_eq!(code, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "job never got there: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a quantize job has ended, one way or another.
pub fn quantize_ended(v: &Value) -> bool {
    ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or(""))
}

/// Loads `id` (with `extra` load fields) and asks it a question any chat model gets right;
/// panics unless the answer says Paris.
pub async fn loads_and_answers(s: &Server, id: &str, extra: Value) {
    let mut body = serde_json::json!({"model_id": id});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (code, v) = s.post("/admin/model/load", &body).await;
    assert_eq!(code, 200, "{v}");
    let answer = s
        .chat_text(serde_json::json!({"model": id, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]}))
        .await;
    assert!(answer.to_lowercase().contains("paris"), "{answer}");
}

/// Sends `method path` with `X-Admin-Key: key` (and a JSON body); status and parsed body
/// (null when it is not JSON).
pub async fn with_admin_key(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, s.url(path))
        .header("x-admin-key", key);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Sends a prepared request in a task of its own; its status, JSON body and when it ended
/// (for tests that assert which of several requests finished first).
pub fn spawn_timed(req: reqwest::RequestBuilder) -> tokio::task::JoinHandle<(u16, Value, Instant)> {
    tokio::spawn(async move {
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        (code, v, Instant::now())
    })
}
