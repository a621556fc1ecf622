//! MLX models through the same API, with the real `mlx-lm` worker on Linux's CPU backend and
//! an MLX copy of the Qwen2.5-Coder 0.5B test model (float32, made by scripts/fetch-mlx.sh).
//! MLX's CPU backend is slow (a few tokens a second here), so generations stay short.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{qwen_file, sse_data, Opts, Server, QWEN};
use futures_util::StreamExt;
use serde_json::{json, Value};

const MLX: &str = "qwen-mlx";

/// One test at a time: each runs a 2.5 GB float32 model on the CPU, and two at once would
/// only make both crawl.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn mlx_dir() -> PathBuf {
    let p = root().join("target/test-model/qwen2.5-coder-0.5b-instruct-mlx");
    assert!(
        p.join("config.json").exists(),
        "MLX test model missing at {}: run scripts/fetch-mlx.sh",
        p.display()
    );
    p
}

/// A server with the MLX folder and the GGUF copy of the same model on disk, nothing loaded.
fn server(parallel: u32, extra_env: &[(&str, &str)]) -> Server {
    server_with(parallel, extra_env, &[])
}

fn server_with(parallel: u32, extra_env: &[(&str, &str)], args: &[String]) -> Server {
    let mut env = vec![(
        "OPTA_LMX_MLX_PYTHON".to_string(),
        root()
            .join("target/mlx-venv/bin/python")
            .display()
            .to_string(),
    )];
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let s = Server::start(Opts {
        load_model: false,
        context: 1024,
        parallel,
        env,
        extra_args: args.to_vec(),
        ..Opts::default()
    });
    std::os::unix::fs::symlink(mlx_dir(), s.models_dir.join(MLX)).unwrap();
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    s
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split(' ').nth(2).is_none_or(|state| state != "Z"))
}

async fn worker_pid(s: &Server) -> u64 {
    let (_, v) = s.get("/admin/status").await;
    v["loaded_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == MLX)
        .and_then(|m| m["worker_pid"].as_u64())
        .unwrap_or_else(|| panic!("no MLX worker in {v}"))
}

/// Waits until no loaded model has a sequence active or a request queued.
async fn wait_idle(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = s.get("/admin/status").await;
        let busy = v["loaded_models"].as_array().unwrap().iter().any(|m| {
            m["active_sequences"].as_u64() != Some(0) || m["queued_requests"].as_u64() != Some(0)
        });
        if !busy {
            return;
        }
        assert!(Instant::now() < deadline, "still busy: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ask(model: &str, content: &str, max_tokens: u32) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn an_mlx_model_serves_the_api_reuses_and_keeps_prefixes_and_unloads() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let pc = dir.path().join("prompt-cache");
    let s = server_with(
        3,
        // Heartbeats every second, so status shows the worker's cache figures promptly.
        &[
            ("OPTA_LMX_MLX_HEARTBEAT", "4"),
            ("OPTA_LMX_PROMPT_CACHE_MIN_TOKENS", "8"),
        ],
        &["--prompt-cache-dir".into(), pc.display().to_string()],
    );
    let (_, v) = s.get("/admin/models").await;
    let entry = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == MLX)
        .unwrap_or_else(|| panic!("MLX folder not listed: {v}"))
        .clone();
    assert_eq!(entry["format"], "mlx");
    assert_eq!(entry["architecture"], "qwen2");
    assert_eq!(entry["quantization"], "float32");
    assert!(entry["size_bytes"].as_u64().unwrap() > 2_000_000_000);
    assert!(entry["estimated_memory"]["total_bytes"].as_u64().unwrap() > 2_000_000_000);

    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": MLX}))
        .await;
    assert_eq!(code, 200, "{v}");
    let pid = worker_pid(&s).await;
    assert!(alive(pid));
    // The worker's matrix products run on the system OpenBLAS (scripts/deps.sh installs it),
    // not the wheel's reference BLAS (models.mlx.blas: auto).
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("libopenblas"), "no OpenBLAS in the worker");

    // Whole, then streamed: the same greedy answer, with usage.
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &ask(MLX, "What is the capital of France? One word.", 4),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("Paris"), "{text}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 20);
    let mut body = ask(MLX, "What is the capital of France? One word.", 4);
    body["stream"] = json!(true);
    let streamed: String = sse_data(
        &s.send("/v1/chat/completions", &body)
            .await
            .text()
            .await
            .unwrap(),
    )
    .iter()
    .filter(|d| *d != "[DONE]")
    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    .filter_map(|v| {
        v["choices"][0]["delta"]["content"]
            .as_str()
            .map(String::from)
    })
    .collect();
    assert_eq!(streamed, text);

    // Tools: the chat layer parses what the MLX worker generates, as for GGUF. Beside it, at
    // once, `tool_choice: required` on the same prompt: it waits for the first one's prefill
    // and starts from its KV, and gives a call whose arguments follow the tool's schema.
    let mut tools = ask(MLX, "read the file README.md", 40);
    tools["tools"] = json!([{"type": "function", "function": {"name": "read_file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]);
    let mut required = tools.clone();
    required["tool_choice"] = json!("required");
    required["max_tokens"] = json!(60);
    let ((code, v), (rcode, r)) = tokio::join!(
        s.post("/v1/chat/completions", &tools),
        s.post("/v1/chat/completions", &required)
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "read_file");
    assert_eq!(
        serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap(),
        json!({"path": "README.md"})
    );
    assert_eq!(rcode, 200, "{r}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(r["usage"]["prompt_tokens"].as_u64().unwrap(), prompt, "{r}");
    assert_eq!(
        (cached(&v).min(cached(&r)) < 40, cached(&v).max(cached(&r))),
        (true, prompt - 1),
        "one computed the prompt, the other reused it: {v} {r}"
    );
    let call = &r["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "read_file", "{r}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(
        args["path"].is_string() && args.as_object().unwrap().len() == 1,
        "{r}"
    );
    // A named tool_choice: the same prompt again, the call forced to that function.
    let mut named = tools.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "read_file"}});
    named["max_tokens"] = json!(60);
    let (code, n) = s.post("/v1/chat/completions", &named).await;
    assert_eq!(code, 200, "{n}");
    assert_eq!(cached(&n), prompt - 1, "{n}");
    let call = &n["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "read_file", "{n}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["path"].is_string(), "{n}");
    // Counted from the safetensors headers: Qwen2.5-0.5B's 494 million plus the output
    // matrix, which this copy (made from the GGUF) stores apart from the embeddings.
    let (_, inv) = s.get("/admin/models").await;
    let rt = &inv["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == MLX)
        .unwrap()["runtime"];
    let params = rt["parameters"].as_u64().unwrap();
    assert_eq!(params, 630_167_424);
    // Its speed shows in /admin/status like any model's.
    let (_, st) = s.get("/admin/status").await;
    let sched = &st["loaded_models"][0]["scheduler"];
    assert!(
        sched["decode_tokens_per_second"].as_f64().unwrap() > 0.0,
        "{st}"
    );
    assert!(
        sched["completion_tokens_total"].as_u64().unwrap() > 30,
        "{st}"
    );

    // JSON mode holds on MLX too (the grammar runs in the worker).
    let mut fmt = ask(MLX, "Reply with a JSON object whose key a is 1.", 8);
    fmt["response_format"] = json!({"type": "json_object"});
    let (code, v) = s.post("/v1/chat/completions", &fmt).await;
    assert_eq!(code, 200, "{v}");
    assert!(content(&v).trim_start().starts_with('{'), "{v}");
    let mut draft = ask(MLX, "hi", 4);
    draft["speculation"] = json!("draft");
    let (code, v) = s.post("/v1/chat/completions", &draft).await;
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("speculation")),
        "{v}"
    );
    // Log-probabilities come from the worker: greedy takes the most likely token.
    let mut lp = ask(MLX, "What is the capital of France? One word.", 3);
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(3);
    let (code, v) = s.post("/v1/chat/completions", &lp).await;
    assert_eq!(code, 200, "{v}");
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!entries.is_empty(), "{v}");
    let joined: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        joined,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for e in entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], e["token"]);
        let (a, b) = (
            top[0]["logprob"].as_f64().unwrap(),
            e["logprob"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4 && b <= 0.0, "{e}");
    }

    // A cold turn, the same again (its prompt from the cache: the same greedy text), then
    // the next turn of the conversation, which reuses all of the first.
    let q1 = "What is the capital of France?";
    let (code, cold) = s
        .post("/v1/chat/completions", &turn(&[("user", q1)], 4))
        .await;
    assert_eq!(code, 200, "{cold}");
    // Only the template's opening (`<|im_start|>system\n`) is shared with earlier requests
    // (whose system prompt is Qwen's default).
    assert!(cached(&cold) <= 3, "{cold}");
    let prompt1 = cold["usage"]["prompt_tokens"].as_u64().unwrap();
    let (_, warm) = s
        .post("/v1/chat/completions", &turn(&[("user", q1)], 4))
        .await;
    assert_eq!(cached(&warm), prompt1 - 1, "{warm}");
    assert_eq!(content(&warm), content(&cold));
    let a1 = content(&cold);
    let (code, next) = s
        .post(
            "/v1/chat/completions",
            &turn(
                &[("user", q1), ("assistant", &a1), ("user", "And of Italy?")],
                4,
            ),
        )
        .await;
    assert_eq!(code, 200, "{next}");
    assert!(cached(&next) >= prompt1, "{next}");

    // JSON schema output validates over several seeds (sampled, not greedy), at once.
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 9999}},
        "required": ["city", "population"], "additionalProperties": false});
    let asks = [1, 2, 3].map(|seed| {
        let mut body = turn(&[("user", "Describe a European capital as JSON.")], 40);
        body["temperature"] = json!(0.8);
        body["seed"] = json!(seed);
        body["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema}});
        let s = &s;
        async move { s.post("/v1/chat/completions", &body).await }
    });
    for (code, v) in futures_util::future::join_all(asks).await {
        assert_eq!(code, 200, "{v}");
        let doc: Value =
            serde_json::from_str(&content(&v)).unwrap_or_else(|e| panic!("not JSON ({e}): {v}"));
        let obj = doc.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{doc}");
        assert!(
            ["Paris", "Rome", "Oslo"].contains(&doc["city"].as_str().unwrap()),
            "{doc}"
        );
        assert!(
            doc["population"].as_u64().is_some_and(|p| p <= 9999),
            "{doc}"
        );
    }
    // What cannot be enforced is the same 400 as on GGUF.
    let mut bad = ask(MLX, "hi", 4);
    bad["response_format"] = json!({"type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "nonsense"}}});
    let (code, v) = s.post("/v1/chat/completions", &bad).await;
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("response_format")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be enforced"),
        "{v}"
    );

    // Status and metrics count the reuse.
    let (_, st) = s.get("/admin/status").await;
    let sched = &st["loaded_models"][0]["scheduler"];
    assert!(
        sched["prompt_cache_hits_total"].as_u64().unwrap() >= 2,
        "{st}"
    );
    assert!(
        sched["cached_prompt_tokens_total"].as_u64().unwrap() >= 2 * prompt1 - 1,
        "{st}"
    );
    assert!(sched["prompt_cache_bytes"].as_u64().unwrap() > 0, "{st}");
    let text = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hits = text
        .lines()
        .find(|l| l.starts_with(&format!("opta_lmx_prompt_cache_hits{{model=\"{MLX}\"}}")))
        .unwrap_or_else(|| panic!("no hits line in {text}"));
    assert!(
        hits.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= 2,
        "{hits}"
    );
    assert!(text.contains(&format!("opta_lmx_prompt_cache_bytes{{model=\"{MLX}\"}}")));

    // Unloading stops the worker, after it wrote the long prefixes to disk; a new worker
    // restores them.
    unload_mlx(&s).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "worker {pid} outlived its model");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let files = cache_files(&pc);
    assert!(!files.is_empty(), "nothing written to {}", pc.display());
    load_mlx(&s).await;
    assert_eq!(wait_disk_tier(&s).await, files.len() as u64);
    let (_, restored) = s
        .post("/v1/chat/completions", &turn(&[("user", q1)], 4))
        .await;
    assert_eq!(cached(&restored), prompt1 - 1, "{restored}");
    assert_eq!(content(&restored), a1);

    // Truncated files and a foreign one are refused and deleted; the answer is the same.
    unload_mlx(&s).await;
    let files = cache_files(&pc);
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    }
    let foreign = files[0].with_file_name("0123456789abcdef01234567.kv");
    std::fs::write(&foreign, b"OPTAKV01 not of this layout").unwrap();
    load_mlx(&s).await;
    wait_disk_tier(&s).await;
    assert!(!foreign.exists(), "a foreign file was kept");
    let (_, again) = s
        .post("/v1/chat/completions", &turn(&[("user", q1)], 4))
        .await;
    assert_eq!(cached(&again), 0, "{again}");
    assert_eq!(content(&again), a1);
    // Every file this prompt shares tokens with was tried, found cut short, and deleted.
    assert!(
        files.iter().any(|f| !f.exists()),
        "no truncated file deleted"
    );
    assert!(s
        .log_text()
        .contains("deleting an unusable prompt-cache file"));
}

#[tokio::test]
async fn mlx_and_gguf_copies_agree_and_lru_evicts_across_formats() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[("OPTA_LMX_MAX_LOADED_MODELS", "1")]);
    let prompts = [
        "What is the capital of France? One word.",
        "Write the number after 41.",
        "Name a colour.",
    ];
    let mut first = Vec::new();
    for model in [QWEN, MLX] {
        // A sequence is freed just after its answer is sent: wait for that state, or the
        // GGUF model still counts as busy and cannot be evicted.
        wait_idle(&s).await;
        let (code, v) = s
            .post("/admin/models/load", &json!({"model_id": model}))
            .await;
        assert_eq!(code, 200, "{v}");
        if model == MLX {
            // One model at a time: loading the MLX one evicted the GGUF one.
            assert_eq!(v["evicted"], json!([QWEN]), "{v}");
        }
        let mut words = Vec::new();
        for p in prompts {
            let (code, v) = s.post("/v1/chat/completions", &ask(model, p, 1)).await;
            assert_eq!(code, 200, "{v}");
            words.push(
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        first.push(words);
    }
    // The same weights through different arithmetic: the first token agrees for most.
    let agree = first[0]
        .iter()
        .zip(&first[1])
        .filter(|(a, b)| a == b)
        .count();
    assert!(agree >= 2, "GGUF {:?} vs MLX {:?}", first[0], first[1]);
}

#[tokio::test]
async fn six_streams_at_once_and_a_cancel_frees_its_sequence() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(6, &[]);
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": MLX}))
        .await;
    assert_eq!(code, 200, "{v}");
    // Six bots with one system prompt, at once: the first prefills it, the other five wait
    // for that prefill (or find it kept, if they come later) and start from its KV.
    let system = "You are one of six household bots. Answer in one short plain sentence, \
                  without lists, code, markdown or questions back, and never mention that \
                  you are a bot.";
    let streams = (0..6).map(|i| {
        let body = json!({"model": MLX, "temperature": 0, "max_tokens": 3, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": format!("Count from {i} upwards.")}]});
        let s = &s;
        async move {
            s.send("/v1/chat/completions", &body)
                .await
                .text()
                .await
                .unwrap()
        }
    });
    let mut reused = Vec::new();
    for text in futures_util::future::join_all(streams).await {
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert!(!text.contains("\"error\""), "{text}");
        let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        reused.push(cached(&usage));
    }
    reused.sort();
    assert_eq!(
        reused[0], 0,
        "the first computes its whole prompt: {reused:?}"
    );
    assert!(
        reused[1..].iter().all(|&n| n >= 40),
        "five start from the shared system prompt: {reused:?}"
    );
    // A client that hangs up mid-stream: its sequence is freed.
    // (Its prompt shares the system prompt, kept from the six: only its question is computed.)
    let body = json!({"model": MLX, "temperature": 0, "max_tokens": 200, "stream": true,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": "Tell me a long story about the sea."}]});
    let mut resp = s.send("/v1/chat/completions", &body).await.bytes_stream();
    let _ = resp.next().await;
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = s.get("/admin/status").await;
        let m = &v["loaded_models"][0];
        if m["active_sequences"] == 0 && m["scheduler"]["cancelled_total"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "sequence not freed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_killed_worker_fails_its_stream_the_server_goes_on_and_the_model_reloads() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[]);
    // The MLX load asks for its own context and parallel (the server's are 1024 and 2).
    for body in [
        json!({"model_id": QWEN}),
        json!({"model_id": MLX, "context": 512, "parallel": 3}),
    ] {
        let (code, v) = s.post("/admin/models/load", &body).await;
        assert_eq!(code, 200, "{v}");
    }
    let pid = worker_pid(&s).await;
    let mut body = ask(MLX, "Tell me a long story about the sea.", 200);
    body["stream"] = json!(true);
    let resp = s.send("/v1/chat/completions", &body).await;
    let mut chunks = resp.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(Ok(c)) = chunks.next().await {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    let last = sse_data(&rest).last().cloned().unwrap();
    let err: Value = serde_json::from_str(&last).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MLX worker"),
        "{last}"
    );

    // Everyone else is served: health, and the GGUF model.
    let (code, _) = s.get("/healthz").await;
    assert_eq!(code, 200);
    let (code, v) = s
        .post("/v1/chat/completions", &ask(QWEN, "Say hi.", 3))
        .await;
    assert_eq!(code, 200, "{v}");
    // The dead worker is restarted without waiting for a request, and the model answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let new_pid = loop {
        let (_, v) = s.get("/admin/status").await;
        let pid_now = v["loaded_models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == MLX)
            .and_then(|m| m["worker_pid"].as_u64());
        if let Some(p) = pid_now.filter(|p| *p != pid) {
            break p;
        }
        assert!(Instant::now() < deadline, "no restart: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(alive(new_pid));
    let (code, v) = s
        .post("/v1/chat/completions", &ask(MLX, "Say hi.", 2))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(worker_pid(&s).await, new_pid);
    // It came back with its load's settings, not the server's defaults.
    let (_, v) = s.get("/admin/status").await;
    let m = v["loaded_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == MLX)
        .unwrap();
    assert_eq!(
        (m["context"].as_u64(), m["parallel"].as_u64()),
        (Some(512), Some(3)),
        "{m}"
    );
}

#[tokio::test]
async fn no_worker_outlives_the_server_and_the_guard_sizes_mlx_loads() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // SIGTERM and SIGKILL of the server both take the worker down with it.
    for signal in ["-TERM", "-KILL"] {
        let mut s = server(2, &[]);
        let (code, v) = s
            .post("/admin/models/load", &json!({"model_id": MLX}))
            .await;
        assert_eq!(code, 200, "{v}");
        let pid = worker_pid(&s).await;
        std::process::Command::new("kill")
            .args([signal, &s.pid().to_string()])
            .status()
            .unwrap();
        s.wait_exit(Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "worker {pid} outlived the server ({signal})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The memory guard refuses an MLX load it cannot fit, with the numbers.
    let s = server(2, &[("OPTA_LMX_MEMORY_THRESHOLD", "1")]);
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": MLX}))
        .await;
    assert_eq!(code, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("MB") && msg.contains(MLX), "{msg}");
}

#[tokio::test]
async fn config_says_which_format_a_name_means_and_a_load_can_name_the_backend() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[("OPTA_LMX_PREFER", "mlx")]);
    // One folder holding the model in both formats.
    let both = s.models_dir.join("qwen-both");
    std::fs::create_dir(&both).unwrap();
    for e in std::fs::read_dir(mlx_dir()).unwrap().flatten() {
        std::os::unix::fs::symlink(e.path(), both.join(e.file_name())).unwrap();
    }
    std::os::unix::fs::symlink(qwen_file(), both.join("qwen-q4_k_m.gguf")).unwrap();
    let format_of = |v: &Value, id: &str| {
        v["loaded_models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["format"].as_str().unwrap().to_string())
    };
    // `prefer: mlx`: the folder's name means the MLX copy.
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": "qwen-both"}))
        .await;
    assert_eq!(code, 200, "{v}");
    let (_, st) = s.get("/admin/status").await;
    assert_eq!(format_of(&st, "qwen-both").as_deref(), Some("mlx"), "{st}");
    // Naming the backend loads the other copy.
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": "qwen-both", "backend": "llama.cpp"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model_id"], "qwen-both/qwen-q4_k_m");
    let (_, st) = s.get("/admin/status").await;
    assert_eq!(
        format_of(&st, "qwen-both/qwen-q4_k_m").as_deref(),
        Some("gguf")
    );
    // Both answer, each under its own id.
    for id in ["qwen-both", "qwen-both/qwen-q4_k_m"] {
        let (code, v) = s.post("/v1/chat/completions", &ask(id, "Say hi.", 1)).await;
        assert_eq!((code, v["model"].as_str()), (200, Some(id)), "{v}");
    }
}

#[tokio::test]
async fn a_hung_worker_misses_its_heartbeat_and_is_replaced() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[("OPTA_LMX_MLX_HEARTBEAT", "3")]);
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": MLX}))
        .await;
    assert_eq!(code, 200, "{v}");
    let pid = worker_pid(&s).await;
    // Frozen, not dead: only the missed heartbeats can tell.
    std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = s.get("/admin/status").await;
        let now = v["loaded_models"][0]["worker_pid"].as_u64();
        if now.is_some_and(|p| p != pid) {
            break;
        }
        assert!(Instant::now() < deadline, "hung worker not replaced: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!alive(pid), "the hung worker was killed");
    assert!(s.log_text().contains("mlx_worker_unresponsive"));
}

/// One chat turn's body: a shared system prompt, then the conversation so far.
fn turn(history: &[(&str, &str)], max_tokens: u32) -> Value {
    let mut messages = vec![json!({"role": "system",
        "content": "Answer as a terse assistant for a household, in a few words."})];
    messages.extend(
        history
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content})),
    );
    json!({"model": MLX, "temperature": 0, "max_tokens": max_tokens, "messages": messages})
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {v}"))
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

/// The `.kv` files of the disk tier under `root` (any layout).
fn cache_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|x| x == "kv") {
                out.push(f.path());
            }
        }
    }
    out
}

/// Waits until the worker has opened its disk tier (status shows its file count).
async fn wait_disk_tier(s: &Server) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = s.get("/admin/status").await;
        if let Some(n) = v["loaded_models"][0]["scheduler"]["prompt_cache_files"].as_u64() {
            return n;
        }
        assert!(Instant::now() < deadline, "disk tier never opened: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn load_mlx(s: &Server) {
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": MLX}))
        .await;
    assert_eq!(code, 200, "{v}");
}

async fn unload_mlx(s: &Server) {
    let (code, v) = s
        .post("/admin/models/unload", &json!({"model_id": MLX}))
        .await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn a_draft_model_speculates_without_changing_greedy_output() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[("OPTA_LMX_MLX_HEARTBEAT", "4")]);
    // The same weights under a second name: every proposal is accepted, so the counters
    // must move, and the text must not.
    std::os::unix::fs::symlink(mlx_dir(), s.models_dir.join("qwen-mlx-draft")).unwrap();
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": MLX, "speculation": "draft", "draft_model": "qwen-mlx-draft"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let q = "Count from one to ten in words.";
    let mut off = ask(MLX, q, 6);
    off["speculation"] = json!("off");
    let plain = content(&s.post("/v1/chat/completions", &off).await.1);
    let (code, v) = s.post("/v1/chat/completions", &ask(MLX, q, 6)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(content(&v), plain);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = s.get("/admin/status").await;
        let spec = &st["loaded_models"][0]["scheduler"]["speculation"];
        assert_eq!(spec["mode"], "draft", "{st}");
        let (p, a) = (
            spec["proposed_tokens_total"].as_u64().unwrap(),
            spec["accepted_tokens_total"].as_u64().unwrap(),
        );
        if p > 0 {
            assert!(a > 0 && a <= p, "{spec}");
            break;
        }
        assert!(Instant::now() < deadline, "no speculation counted: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Prompt lookup needs no second model: a request that re-emits its prompt (an edit)
    // proposes from it, and the greedy text is the same as without.
    unload_mlx(&s).await;
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": MLX, "speculation": "ngram"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let edit = "Rewrite this function with `total` renamed to `sum`, nothing else:\n\
                def add_all(values):\n    total = 0\n    for v in values:\n        \
                total += v\n    return total\n";
    let mut off = ask(MLX, edit, 24);
    off["speculation"] = json!("off");
    let plain = content(&s.post("/v1/chat/completions", &off).await.1);
    let (code, v) = s.post("/v1/chat/completions", &ask(MLX, edit, 24)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(content(&v), plain);
    assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = s.get("/admin/status").await;
        let spec = &st["loaded_models"][0]["scheduler"]["speculation"];
        assert_eq!(spec["mode"], "ngram", "{st}");
        let (p, a) = (
            spec["proposed_tokens_total"].as_u64().unwrap(),
            spec["accepted_tokens_total"].as_u64().unwrap(),
        );
        if p > 0 {
            // The function is re-emitted: most proposals hold.
            assert!(a > 0 && a <= p, "{spec}");
            println!("prompt lookup: {a} of {p} proposals accepted");
            break;
        }
        assert!(Instant::now() < deadline, "no prompt lookup counted: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A draft that is not in the target's format is refused by name before anything loads.
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": "qwen-mlx-draft", "speculation": "draft", "draft_model": QWEN}),
        )
        .await;
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("draft_model")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not on disk as a MLX model"),
        "{v}"
    );
}

#[tokio::test]
async fn reuse_with_sliding_window_caches_keeps_greedy_output() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[]);
    // A tiny random-weight Gemma 3 with a 16-token window on every other layer: mlx-lm gives
    // those layers rotating caches, which cannot be cut back once past their window.
    let made = std::process::Command::new(root().join("target/mlx-venv/bin/python"))
        .arg(root().join("scripts/make-sliding-mlx-model.py"))
        .arg(mlx_dir())
        .arg(s.models_dir.join("tiny-sliding"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": "tiny-sliding"}))
        .await;
    assert_eq!(code, 200, "{v}");
    let body = |history: &[(&str, &str)]| {
        let mut messages = vec![json!({"role": "system", "content":
            "You are the house assistant for a family of four. Keep answers short and plain, \
             mention no brands, and never ask a question back."})];
        messages.extend(
            history
                .iter()
                .map(|(r, c)| json!({"role": r, "content": c})),
        );
        json!({"model": "tiny-sliding", "temperature": 0, "max_tokens": 6, "messages": messages})
    };
    let (code, first) = s
        .post(
            "/v1/chat/completions",
            &body(&[("user", "What is for dinner?")]),
        )
        .await;
    assert_eq!(code, 200, "{first}");
    let prompt1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt1 > 40,
        "the prompt must pass the 16-token window: {first}"
    );
    let a1 = content(&first);
    let turn2 = body(&[
        ("user", "What is for dinner?"),
        ("assistant", &a1),
        ("user", "And for lunch tomorrow?"),
    ]);
    let (_, warm) = s.post("/v1/chat/completions", &turn2).await;
    // The first prompt's caches are reused whole (kept when its prefill ended).
    assert!(cached(&warm) >= prompt1, "{warm}");
    // A fresh worker computes everything (short prompts are not written to disk): the same
    // greedy text.
    let (code, _) = s
        .post("/admin/models/unload", &json!({"model_id": "tiny-sliding"}))
        .await;
    assert_eq!(code, 200);
    let (code, _) = s
        .post("/admin/models/load", &json!({"model_id": "tiny-sliding"}))
        .await;
    assert_eq!(code, 200);
    let (_, cold) = s.post("/v1/chat/completions", &turn2).await;
    assert_eq!(cached(&cold), 0, "{cold}");
    assert_eq!(warm["usage"]["completion_tokens"], 6, "{warm}");
    assert_eq!(content(&warm), content(&cold));
}

#[tokio::test]
async fn reuse_with_a_thinking_template_keeps_greedy_output() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(2, &[]);
    // A tiny random-weight Qwen 3 whose template opens <think> for the answer and renders
    // past assistant turns without their reasoning: turn 2's prompt shares turn 1's prompt
    // only up to that opened block, so the cached sequence must be cut back, not reused whole.
    let made = std::process::Command::new(root().join("target/mlx-venv/bin/python"))
        .arg(root().join("scripts/make-tiny-qwen3.py"))
        .arg("thinking")
        .arg(mlx_dir())
        .arg(s.models_dir.join("tiny-thinking"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": "tiny-thinking"}))
        .await;
    assert_eq!(code, 200, "{v}");
    let system = json!({"role": "system", "content":
        "You are the house assistant for a family of four. Keep answers short and plain, \
         mention no brands, and never ask a question back."});
    let ask = json!({"role": "user", "content": "What is for dinner?"});
    let (code, first) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "tiny-thinking", "temperature": 0, "max_tokens": 8,
                    "messages": [system, ask]}),
        )
        .await;
    assert_eq!(code, 200, "{first}");
    let prompt1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let message = &first["choices"][0]["message"];
    // The model never closes the block, so everything it wrote is reasoning.
    let reasoning = message["reasoning_content"].as_str().unwrap();
    assert!(!reasoning.is_empty(), "{first}");
    assert_eq!(message["content"], "", "{first}");
    let turn2 = json!({"model": "tiny-thinking", "temperature": 0, "max_tokens": 8,
        "logprobs": true, "top_logprobs": 3, "messages": [system, ask,
        {"role": "assistant", "content": "", "reasoning_content": reasoning},
        {"role": "user", "content": "And for lunch tomorrow?"}]});
    let (code, warm) = s.post("/v1/chat/completions", &turn2).await;
    assert_eq!(code, 200, "{warm}");
    // Everything before `<think>` is reused; the opened block and the reasoning are not.
    let reused = cached(&warm);
    assert!(
        reused < prompt1 && reused + 8 >= prompt1,
        "{reused} of {prompt1}: {warm}"
    );
    let (code, _) = s
        .post(
            "/admin/models/unload",
            &json!({"model_id": "tiny-thinking"}),
        )
        .await;
    assert_eq!(code, 200);
    let (code, _) = s
        .post("/admin/models/load", &json!({"model_id": "tiny-thinking"}))
        .await;
    assert_eq!(code, 200);
    let (_, cold) = s.post("/v1/chat/completions", &turn2).await;
    assert_eq!(cached(&cold), 0, "{cold}");
    let said = |v: &Value| v["choices"][0]["message"]["reasoning_content"].clone();
    assert_eq!(said(&warm), said(&cold));
    // Not only the same picks: the same distributions, alternatives included, to float noise
    // (a stale or misplaced cache entry moves these by far more).
    let steps = |v: &Value| {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone()
    };
    let (w, c) = (steps(&warm), steps(&cold));
    assert_eq!(w.len(), 8);
    for (a, b) in w.iter().zip(&c) {
        let alternatives = |x: &Value| -> Vec<f64> {
            x["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["logprob"].as_f64().unwrap())
                .collect()
        };
        for (x, y) in alternatives(a).iter().zip(alternatives(b)) {
            assert!((x - y).abs() < 1e-3, "{a} vs {b}");
        }
    }
}

/// Waits until no MLX worker runs on the machine: the one an earlier test's server left
/// exits after it, and while it does its memory skews what this test measures.
async fn no_workers_left() {
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("opta-lmx-mlx-worker-"))
                && alive(e.file_name().to_string_lossy().parse().unwrap_or(0))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while running() {
        assert!(Instant::now() < deadline, "an MLX worker is still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The "needs about N MB" of a refused load, in bytes.
fn needed_bytes(refusal: &Value) -> u64 {
    let msg = refusal["error"]["message"].as_str().unwrap();
    let mb: u64 = msg
        .split("needs about ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {msg}"));
    mb * 1_000_000
}

#[tokio::test]
async fn the_guard_drops_cached_prefixes_before_it_evicts_and_never_for_a_refused_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    no_workers_left().await;
    // Measure: what the MLX model needs, what the GGUF copy needs at 32k x 8 and x 32 (read
    // from the refusals a 1% threshold gives), and what the machine uses now.
    let big = json!({"model_id": QWEN, "context": 32768, "parallel": 8});
    let hopeless = json!({"model_id": QWEN, "context": 32768, "parallel": 32});
    let (mlx_need, big_need, hopeless_need, used, total) = {
        let probe = server(2, &[("OPTA_LMX_MEMORY_THRESHOLD", "1")]);
        let (_, inv) = probe.get("/admin/models").await;
        let mlx_need = inv["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == MLX)
            .unwrap_or_else(|| panic!("{inv}"))["estimated_memory"]["ram_bytes"]
            .as_u64()
            .unwrap();
        let (_, a) = probe.post("/admin/models/load", &big).await;
        let (_, b) = probe.post("/admin/models/load", &hopeless).await;
        let (_, st) = probe.get("/admin/status").await;
        (
            mlx_need,
            needed_bytes(&a),
            needed_bytes(&b),
            st["memory"]["used_bytes"].as_u64().unwrap() as f64,
            st["memory"]["total_bytes"].as_u64().unwrap() as f64,
        )
    };
    // Room for the MLX model and half the big load: the big load fits only once the MLX model
    // is gone, the hopeless one never.
    assert!(
        mlx_need > big_need / 2 + 300_000_000,
        "{mlx_need} vs {big_need}"
    );
    assert!(hopeless_need > mlx_need + big_need, "{hopeless_need}");
    let threshold = (used + mlx_need as f64 + big_need as f64 / 2.0) / total * 100.0;
    let s = server(
        2,
        &[("OPTA_LMX_MEMORY_THRESHOLD", &format!("{threshold:.3}"))],
    );
    load_mlx(&s).await;
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &ask(MLX, "Name three colours of the rainbow.", 4),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let prefix_bytes = |st: &Value| {
        st["loaded_models"][0]["scheduler"]["prompt_cache_bytes"]
            .as_u64()
            .unwrap()
    };
    // The worker reports its cache figures after the answer: wait for that state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let (_, st) = s.get("/admin/status").await;
        if prefix_bytes(&st) > 0 {
            break prefix_bytes(&st);
        }
        assert!(Instant::now() < deadline, "no prefix cache: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Refused even with the prefixes dropped and the MLX model gone: refused at once, and the
    // prefixes are still there.
    let (code, v) = s.post("/admin/models/load", &hopeless).await;
    assert_eq!(code, 503, "{v}");
    let (_, st) = s.get("/admin/status").await;
    assert_eq!(prefix_bytes(&st), held, "{st}");
    assert!(!s.log_text().contains("prefix_cache_dropped"));

    // Short of memory: the prefixes go first, then (not enough) the idle MLX model.
    let (code, v) = s.post("/admin/models/load", &big).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!([MLX]), "{v}");
    let log = s.log_text();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no {needle} in {log}"))
    };
    let dropped = at("event=\"prefix_cache_dropped\"");
    assert!(dropped < at("event=\"model_evicted\""), "{log}");
    let line = log[dropped..].lines().next().unwrap();
    assert!(
        line.contains(&format!("for_model={QWEN}")) && line.contains(&format!("bytes={held}")),
        "{line}"
    );
}

#[test]
fn the_lazy_tool_call_grammar_engages_at_its_trigger() {
    // The worker's grammar class on the real tokenizer and llguidance, step by step: free
    // text untouched until `<tool_call>`, then only what the call's grammar allows; without
    // triggers (tool_choice required) constrained from the first token.
    let out = std::process::Command::new(root().join("target/mlx-venv/bin/python"))
        .arg(root().join("tests/mlx_python/lazy_grammar.py"))
        .arg(root().join("src/engine/mlx/worker.py"))
        .arg(mlx_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("lazy grammar: "));
}

#[tokio::test]
async fn the_server_decides_which_waiting_request_the_worker_gets_next() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(1, &[]);
    load_mlx(&s).await;
    // One sequence, held by a long stream.
    let mut long = ask(
        MLX,
        "Count from one to five hundred, one number per line.",
        400,
    );
    long["stream"] = json!(true);
    let holder = tokio::spawn({
        let url = s.url("/v1/chat/completions");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&long)
                .send()
                .await
                .unwrap();
            let _ = r.text().await;
        }
    });
    s.wait_for("active_requests", 1, Duration::from_secs(60))
        .await;
    let send = |label: &'static str, priority: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .header("x-client-id", label)
            .json(&ask(MLX, &format!("Say {label}."), 2));
        if let Some(p) = priority {
            req = req.header("x-priority", p);
        }
        tokio::spawn(async move {
            let code = req.send().await.unwrap().status().as_u16();
            (label, code, Instant::now())
        })
    };
    // Waiting here, not in the worker: low first, then the person's turn.
    let low = send("cron", Some("low"));
    s.wait_for("queued_requests", 1, Duration::from_secs(30))
        .await;
    let high = send("keyboard", Some("high"));
    s.wait_for("queued_requests", 2, Duration::from_secs(30))
        .await;
    let (_, st) = s.get("/admin/status").await;
    let clients = &st["loaded_models"][0]["clients"];
    assert_eq!(clients.as_array().unwrap().len(), 3, "{st}");
    holder.abort();
    let (a, b) = (high.await.unwrap(), low.await.unwrap());
    assert_eq!((a.1, b.1), (200, 200));
    assert!(a.2 < b.2, "the low-priority request went first");
}

/// A greedy low-priority stream on the MLX model: its text, usage, and when it ended; `ready`
/// is told after that many content chunks.
fn low_stream(
    s: &Server,
    ready: Option<(usize, tokio::sync::oneshot::Sender<()>)>,
) -> tokio::task::JoinHandle<(String, Value, Instant)> {
    let mut body = ask(
        MLX,
        "Count from one to five hundred, one number per line.",
        64,
    );
    // Qwen's end-of-text tokens banned: the answer runs to max_tokens.
    body["logit_bias"] = json!({"151643": -100, "151645": -100});
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let req = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-client-id", "cron")
        .header("x-priority", "low")
        .json(&body);
    tokio::spawn(async move { common::read_chat_stream(req.send().await.unwrap(), ready).await })
}

#[tokio::test]
async fn a_paused_mlx_stream_resumes_from_its_parked_kv_with_the_same_text() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = server(1, &[]);
    load_mlx(&s).await;
    let (alone, alone_usage, _) = low_stream(&s, None).await.unwrap();
    assert_eq!(alone_usage["completion_tokens"], 64, "{alone_usage}");
    // Again; after 8 chunks the person's turn arrives with the one sequence busy: the worker
    // parks the low stream's KV, runs the turn, and the stream resumes from it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let low = low_stream(&s, Some((8, tx)));
    rx.await.unwrap();
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-priority", "high")
        .json(&ask(MLX, "Say hello.", 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let turn_done = Instant::now();
    let (resumed, usage, low_done) = low.await.unwrap();
    assert!(turn_done < low_done);
    assert_eq!(resumed, alone);
    assert_eq!(usage["completion_tokens"], 64, "{usage}");
    assert_eq!(usage["prompt_tokens"], alone_usage["prompt_tokens"]);
    let (_, st) = s.get("/admin/status").await;
    let p = &st["loaded_models"][0]["scheduler"]["preemption"];
    assert_eq!(p["paused_total"], 1, "{st}");
    assert_eq!(p["recomputed_tokens_total"], 0, "{p}");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let restored = p["restored_tokens_total"].as_u64().unwrap();
    assert!(
        restored >= prompt + 7 && restored < prompt + 64,
        "restored {restored} of a {prompt}-token prompt"
    );
    assert!(
        s.log_text()
            .lines()
            .any(|l| l.contains("paused sequence resumed") && l.contains("recomputed=0")),
        "{}",
        s.log_text()
    );
}

/// `/admin/quantize` on an MLX folder: mlx-lm's converter in a child process makes a 4-bit
/// folder beside the float32 one, which loads through the MLX worker and answers.
#[tokio::test]
async fn an_mlx_folder_quantizes_to_four_bits_that_load_and_answer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = server(1, &[]);
    let (code, start) = s
        .post("/admin/quantize", &json!({"source_model": MLX, "bits": 4}))
        .await;
    assert_eq!(code, 200, "{start}");
    assert_eq!(
        (
            &start["format"],
            &start["quantization"],
            &start["group_size"],
            &start["mode"]
        ),
        (&json!("mlx"), &json!("4bit"), &json!(64), &json!("affine")),
        "{start}"
    );
    let out = s.models_dir.join(format!("{MLX}-4bit"));
    assert_eq!(start["output_path"], out.display().to_string());
    let id = start["job_id"].as_str().unwrap();
    let done = common::wait_quantize_job(&s, id, common::quantize_ended).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output_model_id"], format!("{MLX}-4bit"));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization"]["bits"], 4, "{config}");
    let size: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(done["output_size_bytes"].as_u64(), Some(size));
    let source: u64 = std::fs::read_dir(mlx_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size * 4 < source, "{size} of {source}");
    assert_eq!(
        std::fs::read_dir(s.models_dir.join(".quantize"))
            .unwrap()
            .count(),
        0
    );

    let new_id = format!("{MLX}-4bit");
    common::loads_and_answers(&s, &new_id, json!({"backend": "mlx"})).await;
    // mlx-lm quantizes full-precision weights only: the 4-bit folder is refused as a source.
    let (code, v) = s
        .post(
            "/admin/quantize",
            &json!({"source_model": new_id, "bits": 2}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(common::error_fields(&v).2, "source_model");
}
