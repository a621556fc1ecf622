//! The real clients' traffic, replayed from `../shared/clients/`: the coding CLI's health,
//! admin and agent-turn calls, and OpenClaw's LM Studio REST preload. Every field a contract
//! says the client reads is checked for its type.

mod common;

use std::time::{Duration, Instant};

use common::{qwen_file, sse_data, Opts, Server, QWEN};
use serde_json::{json, Value};

fn is_num(v: &Value) -> bool {
    v.is_number()
}

/// A server with nothing loaded and Qwen on disk beside Gemma.
fn empty_server() -> Server {
    let s = Server::start(Opts {
        load_model: false,
        context: 4096,
        ..Opts::default()
    });
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    s
}

/// About 30 function tools, as the CLI sends every turn (most are never called).
fn thirty_tools() -> Value {
    let mut tools = vec![
        json!({"type": "function", "function": {"name": "read_file", "description": "Read a file from disk",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}),
    ];
    for i in 0..29 {
        tools.push(json!({"type": "function", "function": {
            "name": format!("tool_{i:02}"), "description": format!("Helper number {i} for project chores"),
            "parameters": {"type": "object", "properties": {
                "target": {"type": "string"}, "force": {"type": "boolean"},
                "mode": {"enum": ["fast", "safe"]}}, "required": ["target"]}}}));
    }
    Value::Array(tools)
}

/// A streamed chat turn as the CLI reads it: content, calls from `delta.tool_calls` (grouped
/// by index, ids non-empty), the finish reason, and usage from any chunk.
async fn streamed_turn(
    s: &Server,
    body: Value,
) -> (String, Vec<(String, String, String)>, String, Value) {
    let r = s.send("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let text = r.text().await.unwrap();
    let (mut content, mut calls, mut finish, mut usage) = (
        String::new(),
        Vec::<(String, String, String)>::new(),
        String::new(),
        Value::Null,
    );
    for d in sse_data(&text) {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        assert!(
            v.get("error").is_none(),
            "an error event is fatal to the CLI: {v}"
        );
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                let id = tc["id"].as_str().unwrap();
                assert!(!id.is_empty());
                calls.push((
                    id.into(),
                    tc["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            }
            calls[i]
                .2
                .push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    (content, calls, finish, usage)
}

#[tokio::test]
async fn the_coding_cli_session_from_its_contract() {
    let s = empty_server();

    // Connection and health.
    let (code, v) = s.get("/healthz").await;
    assert_eq!(code, 200);
    assert!(v["status"].is_string());
    let (code, v) = s.get("/readyz").await;
    assert_eq!(code, 503, "nothing loaded: degraded");
    assert_eq!(v["models_loaded"], 0);
    // The chat WebSocket lives here now (its session is tested in cli_surface.rs); a plain
    // GET is not an upgrade, and says so.
    let (code, v) = s.get("/v1/chat/stream").await;
    assert_eq!(code, 400, "a WebSocket route answers a plain GET with 400");
    assert_eq!(v["error"]["code"], "websocket_required", "{v}");

    // Load, then poll /admin/models until the id is in `loaded`, as the CLI does.
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": QWEN, "backend": "auto", "auto_download": false}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "loaded");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, v) = s.get("/admin/models").await;
        assert_eq!(code, 200);
        let loaded = v["loaded"].as_array().expect("`loaded` array");
        if let Some(m) = loaded.iter().find(|m| m["id"] == QWEN) {
            assert!(
                is_num(&m["memory_gb"]) && m["memory_gb"].as_f64().unwrap() > 0.1,
                "{m}"
            );
            assert_eq!(m["context_length"], 4096);
            let at = m["loaded_at"].as_u64().expect("unix seconds");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(at <= now && now - at < 600, "{at} vs {now}");
            assert!(m["request_count"].is_u64());
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, v) = s.get("/readyz").await;
    assert_eq!((code, v["models_loaded"].as_u64()), (200, Some(1)));

    // Status as `opta status` reads it.
    let (code, v) = s.get("/admin/status").await;
    assert_eq!(code, 200);
    assert!(v["version"].is_string() && v["uptime_seconds"].is_u64());
    assert_eq!(v["models"], json!([QWEN]));
    for k in ["used_gb", "total_gb", "threshold_percent", "available_gb"] {
        assert!(is_num(&v["memory"][k]), "memory.{k}: {v}");
    }
    assert!(v["memory"]["total_gb"].as_f64().unwrap() > 0.5);

    // Every model on disk, the loaded one too (the CLI counts them as downloaded).
    let (code, v) = s.get("/admin/models/available").await;
    assert_eq!(code, 200);
    let avail = v.as_array().expect("an array");
    let qwen = avail
        .iter()
        .find(|m| m["repo_id"] == QWEN)
        .expect("the loaded model is listed");
    assert_eq!(qwen["loaded"], true, "{v}");
    assert!(
        qwen["local_path"].as_str().unwrap().ends_with(".gguf"),
        "{v}"
    );
    assert!(
        qwen["downloaded_at"].as_u64().unwrap() > 1_600_000_000,
        "{v}"
    );
    assert!(
        avail.iter().any(|m| m["repo_id"] == common::MODEL
            && m["loaded"] == false
            && m["size_bytes"].as_u64().unwrap() > 1_000_000),
        "{v}"
    );

    // The agent turn: 30 tools, `auto`, and max_tokens from the CLI's own estimate of the
    // prompt (without the tool definitions), so prompt + max_tokens overflows the context.
    let prompt_estimate = 40;
    let max_tokens = 4096 - prompt_estimate - 1024;
    let mut messages = vec![
        json!({"role": "system", "content": "You are a coding agent. Use the tools to act."}),
        json!({"role": "user", "content": "read the file README.md"}),
    ];
    let turn = |messages: &Vec<Value>| {
        json!({"model": QWEN, "messages": messages, "tools": thirty_tools(), "tool_choice": "auto",
               "max_tokens": max_tokens, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}})
    };
    let (content, calls, finish, usage) = streamed_turn(&s, turn(&messages)).await;
    let prompt_tokens = usage["prompt_tokens"]
        .as_u64()
        .expect("usage in the stream");
    assert!(
        prompt_tokens + max_tokens as u64 > 4096,
        "the turn must overflow: {usage}"
    );
    assert_eq!(finish, "tool_calls", "content: {content:?}");
    let [(id, name, args)] = &calls[..] else {
        panic!("{calls:?}")
    };
    assert_eq!(name, "read_file");
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"path": "README.md"})
    );
    assert!(
        content.trim().is_empty(),
        "no call text leaks into content: {content:?}"
    );

    // The follow-up: the assistant's call, a mid-conversation system message, the result.
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": id, "type": "function", "function": {"name": name, "arguments": args}}]}));
    messages.push(json!({"role": "tool", "tool_call_id": id,
                         "content": "# opta-lmx\nA headless inference server written in Rust."}));
    messages.push(json!({"role": "system", "content": "Answer in one sentence."}));
    messages.push(json!({"role": "user", "content": "What is in that file?"}));
    let (content, calls, finish, usage) = streamed_turn(&s, turn(&messages)).await;
    assert!(calls.is_empty(), "{calls:?}");
    assert_eq!(finish, "stop");
    assert!(content.to_lowercase().contains("server"), "{content}");
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);

    // Unload answers what the CLI reads.
    let (code, v) = s
        .post("/admin/models/unload", &json!({"model_id": QWEN}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model_id"], QWEN);
    assert!(v["memory_freed_gb"].as_f64().unwrap() > 0.1, "{v}");
    let (code, _) = s.get("/readyz").await;
    assert_eq!(code, 503);
}

#[tokio::test]
async fn loads_of_hub_models_that_are_not_on_disk_ask_first() {
    let s = empty_server();
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": "someone/Missing-GGUF"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "download_required");
    let token = v["confirmation_token"].as_str().unwrap();
    assert_eq!(token.len(), 32);
    // A token for another model, or a made-up one, does not confirm this one.
    let (_, other) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": "someone/Other-GGUF"}),
        )
        .await;
    assert_ne!(other["confirmation_token"], v["confirmation_token"]);
    let (_, again) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": "someone/Missing-GGUF", "confirmation_token": "0".repeat(32)}),
        )
        .await;
    assert_eq!(again["status"], "download_required");
    // A local id that does not exist is still a 404; an unknown backend a 400.
    let (code, _) = s
        .post("/admin/models/load", &json!({"model_id": "nothing-here"}))
        .await;
    assert_eq!(code, 404);
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": QWEN, "backend": "tensorrt"}),
        )
        .await;
    assert_eq!((code, v["error"]["param"].as_str()), (400, Some("backend")));
    // A backend that exists, but no copy of the model in its format.
    let (code, _) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": QWEN, "backend": "mlx"}),
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn lm_studio_rest_api_for_openclaws_bundled_provider() {
    let s = empty_server();
    let (code, v) = s.get("/api/v1/models").await;
    assert_eq!(code, 200);
    let models = v["models"].as_array().unwrap();
    let qwen = models.iter().find(|m| m["key"] == QWEN).expect("listed");
    assert_eq!(qwen["type"], "llm");
    assert_eq!(qwen["format"], "gguf");
    assert_eq!(qwen["architecture"], "qwen2");
    assert_eq!(qwen["quantization"]["name"], "Q4_K_M");
    assert_eq!(qwen["max_context_length"], 32768);
    assert!(qwen["size_bytes"].as_u64().unwrap() > 400_000_000);
    assert_eq!(qwen["loaded_instances"], json!([]));

    // The preload OpenClaw sends before a turn, with LM Studio's own knobs.
    let (code, v) = s
        .post(
            "/api/v1/models/load",
            &json!({"model": QWEN, "context_length": 2048, "flash_attention": true}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["type"].as_str()),
        (Some("loaded"), Some("llm"))
    );
    assert_eq!(v["instance_id"], QWEN);
    assert!(is_num(&v["load_time_seconds"]));
    let (_, v) = s.get("/api/v1/models").await;
    let qwen = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == QWEN)
        .unwrap()
        .clone();
    assert_eq!(qwen["loaded_instances"][0]["id"], QWEN);
    assert_eq!(
        qwen["loaded_instances"][0]["config"]["context_length"],
        2048
    );
    assert_eq!(qwen["capabilities"]["trained_for_tool_use"], true);

    let (code, v) = s.get("/api/v0/models").await;
    assert_eq!(code, 200);
    assert_eq!(v["object"], "list");
    let states: Vec<(String, String)> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().into(),
                m["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        states.contains(&(QWEN.into(), "loaded".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&(common::MODEL.into(), "not-loaded".into())),
        "{states:?}"
    );

    // OpenClaw's next preload asks for a larger context than the model is loaded with (its
    // prompts are 11-12k tokens): the model is loaded again with it, and the answer says so.
    let long = "Tell me about the sea, the tides and the moon in detail. ".repeat(220);
    let ask = json!({"model": QWEN, "max_tokens": 1,
                     "messages": [{"role": "user", "content": long}]});
    let (code, v) = s.post("/v1/chat/completions", &ask).await;
    assert_eq!(code, 400, "a ~2.9k-token prompt does not fit 2,048: {v}");
    let (code, v) = s
        .post(
            "/api/v1/models/load",
            &json!({"model": QWEN, "context_length": 4096, "echo_load_config": true}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["load_config"]["context_length"], 4096, "{v}");
    assert_eq!(v["status"], "loaded");
    let (code, v) = s.post("/v1/chat/completions", &ask).await;
    assert_eq!(code, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 2048, "{v}");
    // The same context again changes nothing.
    let (code, v) = s
        .post(
            "/api/v1/models/load",
            &json!({"model": QWEN, "context_length": 4096}),
        )
        .await;
    assert_eq!(
        (code, v["load_time_seconds"].as_f64()),
        (200, Some(0.0)),
        "{v}"
    );
    assert!(s.log_text().contains("model_reload"));

    let (code, v) = s
        .post("/api/v1/models/unload", &json!({"instance_id": QWEN}))
        .await;
    assert_eq!((code, v["instance_id"].as_str()), (200, Some(QWEN)));
    let (code, v) = s
        .post("/api/v1/models/load", &json!({"model": "no-such-model"}))
        .await;
    assert_eq!(code, 404, "{v}");
}
