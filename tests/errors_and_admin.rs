//! Bad input gets a clear OpenAI-shaped error and the server keeps serving; the admin API
//! loads and unloads; a client that hangs up frees its sequence; start-up failures are clear.

mod common;

use std::time::{Duration, Instant};

use common::{error_fields, no_eos, Opts, Server, MODEL};
use futures_util::StreamExt;
use serde_json::{json, Value};

async fn expect_error(s: &Server, path: &str, body: Value, status: u16) -> (String, Value, Value) {
    let (st, v) = s.post(path, &body).await;
    assert_eq!(st, status, "{body} -> {v}");
    let (msg, kind, param, code) = error_fields(&v);
    assert!(!msg.is_empty());
    assert!(!kind.is_empty());
    (msg, param, code)
}

#[tokio::test]
async fn request_errors_are_openai_shaped() {
    let s = Server::start(Opts {
        context: 256,
        ..Opts::default()
    });
    let chat = "/v1/chat/completions";

    // Not JSON at all.
    let (st, v) = s.post_raw(chat, "{not json").await;
    assert_eq!(st, 400);
    let (msg, kind, _, _) = error_fields(&v);
    assert_eq!(kind, "invalid_request_error");
    assert!(msg.contains("not valid JSON"), "{msg}");

    // Missing and mistyped fields name the field.
    let (_, param, _) = expect_error(&s, chat, json!({"model": MODEL}), 400).await;
    assert!(param.is_null() || param == "messages", "{param}");
    let (msg, param, _) = expect_error(
        &s,
        chat,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
        400,
    )
    .await;
    assert_eq!(param, "temperature", "{msg}");
    let (_, param, _) = expect_error(
        &s,
        chat,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}),
        400,
    )
    .await;
    assert_eq!(param, "temperature");
    let (_, param, _) = expect_error(&s, chat, json!({"model": MODEL, "messages": []}), 400).await;
    assert_eq!(param, "messages");
    let (_, param, _) = expect_error(
        &s,
        chat,
        json!({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}),
        400,
    )
    .await;
    assert_eq!(param, "messages[0].role");

    // Absurd max_tokens.
    for bad in [json!(0), json!(-3), json!(1_000_000_000_000i64)] {
        let (_, param, _) = expect_error(
            &s,
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": bad}),
            400,
        )
        .await;
        assert_eq!(param, "max_tokens");
    }
    // max_tokens beyond what the context has left is clamped, as LM Studio and llama-server
    // do: the answer stops at the context's end with `length`. The same for legacy completions
    // and for `max_completion_tokens`.
    for (path, body) in [
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
        ),
        (
            chat,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100000}),
        ),
    ] {
        let mut body = body;
        body["logit_bias"] = no_eos();
        let (st, v) = s.post(path, &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        let u = &v["usage"];
        let (p, c) = (
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        );
        assert_eq!(p + c, 256, "{u}: generation runs to the context's end");
    }

    // Prompt longer than the context: 400 with both numbers.
    let long = "word ".repeat(400);
    let (msg, param, code) = expect_error(
        &s,
        chat,
        json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}),
        400,
    )
    .await;
    assert_eq!(code, "context_length_exceeded");
    assert_eq!(param, "messages");
    assert!(msg.contains("256 tokens"), "{msg}");
    let prompt_tokens: u32 = msg
        .split("prompt has ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prompt count in {msg}"));
    assert!(prompt_tokens > 256, "{msg}");

    // Unknown model: 404, never a silent swap. Path tricks: 400.
    let (_, param, code) = expect_error(
        &s,
        chat,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        404,
    )
    .await;
    assert_eq!(code, "model_not_found");
    assert_eq!(param, "model");
    for tricky in ["../../etc/passwd", "/etc/passwd"] {
        let (msg, param, _) = expect_error(
            &s,
            chat,
            json!({"model": tricky, "messages": [{"role": "user", "content": "hi"}]}),
            400,
        )
        .await;
        assert_eq!(param, "model", "{msg}");
    }
    // Unsupported options are refused, not ignored.
    let (_, param, _) = expect_error(
        &s,
        chat,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}),
        400,
    )
    .await;
    assert_eq!(param, "n");
    let (_, param, _) = expect_error(
        &s,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "logit_bias": {"999999999": 5}}),
        400,
    )
    .await;
    assert_eq!(param, "logit_bias");

    // Unknown routes and methods are JSON errors too.
    let (st, v) = s.get("/v1/nothing-here").await;
    assert_eq!(st, 404);
    error_fields(&v);
    let (st, v) = s.get("/v1/chat/completions").await;
    assert_eq!(st, 405);
    error_fields(&v);

    // After all that, the server still serves.
    let text = s
        .chat_text(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .await;
    assert!(!text.is_empty());
}

#[tokio::test]
async fn load_unload_and_request_after_unload() {
    let s = Server::start(Opts {
        load_model: false,
        ..Opts::default()
    });
    let req =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    // On disk but not loaded: 404 with a hint.
    let (msg, _, code) = expect_error(&s, "/v1/chat/completions", req.clone(), 404).await;
    assert_eq!(code, "model_not_found");
    assert!(msg.contains("not loaded"), "{msg}");

    let (st, v) = s
        .post(
            "/admin/model/load",
            &json!({"model_id": MODEL, "context": 512}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "loaded");
    assert_eq!(v["model_id"], MODEL);
    assert_eq!(v["context"], 512);
    assert!(v["memory_bytes"].as_u64().unwrap() > 253_000_000, "{v}");
    // Loading again is a no-op; the plural alias works.
    let (st, v) = s
        .post("/admin/models/load", &json!({"model_id": MODEL}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["status"], "already_loaded");

    let (st, v) = s.post("/v1/chat/completions", &req).await;
    assert_eq!(st, 200, "{v}");

    let (st, status) = s.get("/admin/status").await;
    assert_eq!(st, 200);
    assert_eq!(status["loaded_models"][0]["id"], MODEL);
    assert!(status["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(status["memory"]["used_percent"].as_f64().unwrap() > 0.0);
    assert_eq!(status["memory"]["threshold_percent"], 90.0);
    assert!(status["performance"]["completions_total"].as_u64().unwrap() >= 1);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));

    let (st, inv) = s.get("/admin/models").await;
    assert_eq!(st, 200);
    assert_eq!(inv["models"][0]["loaded"], true);
    assert_eq!(inv["models"][0]["request_count"], 1);
    assert_eq!(
        inv["models"][0]["runtime"]["chat_template"],
        "builtin_gemma"
    );

    let (st, v) = s
        .post("/admin/model/unload", &json!({"model_id": MODEL}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "unloaded");
    assert!(v["memory_freed_bytes"].as_u64().unwrap() > 253_000_000);
    let (_, _, code) = expect_error(&s, "/v1/chat/completions", req.clone(), 404).await;
    assert_eq!(code, "model_not_found");
    // Unloading what is not loaded is a 404.
    expect_error(&s, "/admin/models/unload", json!({"model_id": MODEL}), 404).await;
    let (st, v) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    assert_eq!(v["data"][0]["loaded"], false);
}

#[tokio::test]
async fn admin_load_errors_keep_the_server_up() {
    let s = Server::start(Opts {
        load_model: false,
        ..Opts::default()
    });
    // Unknown id.
    let (_, _, code) =
        expect_error(&s, "/admin/model/load", json!({"model_id": "nope"}), 404).await;
    assert_eq!(code, "model_not_found");
    // Ids that try to leave the models directory.
    for tricky in ["../secret", "/etc/passwd", "a/../../b"] {
        let (msg, _, _) =
            expect_error(&s, "/admin/model/load", json!({"model_id": tricky}), 400).await;
        assert!(msg.contains(tricky), "{msg}");
    }
    // A corrupt file: a clear failure naming the file, and the server stays up.
    let bad = s.models_dir.join("broken-Q4_K_M.gguf");
    std::fs::write(&bad, b"GGUF this is not really a model").unwrap();
    let (msg, _, code) = expect_error(
        &s,
        "/admin/model/load",
        json!({"model_id": "broken-Q4_K_M"}),
        503,
    )
    .await;
    assert_eq!(code, "model_load_failed");
    assert!(msg.contains("broken-Q4_K_M.gguf"), "{msg}");
    // A truncated copy of the real model fails the same way.
    let half = s.models_dir.join("half.gguf");
    let bytes = std::fs::read(common::model_file()).unwrap();
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&s, "/admin/model/load", json!({"model_id": "half"}), 503).await;
    // Bad options.
    let (_, param, _) = expect_error(
        &s,
        "/admin/model/load",
        json!({"model_id": MODEL, "parallel": 0}),
        400,
    )
    .await;
    assert_eq!(param, "parallel");
    let (_, param, _) = expect_error(
        &s,
        "/admin/model/load",
        json!({"model_id": MODEL, "bogus": 1}),
        400,
    )
    .await;
    assert!(param.is_null() || param == "bogus", "{param}");

    let (st, _) = s
        .post("/admin/model/load", &json!({"model_id": MODEL}))
        .await;
    assert_eq!(st, 200);
    let (st, h) = s.get("/admin/health").await;
    assert_eq!(st, 200);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["models_loaded"], 1);
}

#[tokio::test]
async fn disconnect_mid_stream_frees_the_sequence() {
    // One sequence only: if the abandoned stream kept generating, the next request would wait
    // for all of its 900 tokens.
    let s = Server::start(Opts {
        parallel: 1,
        ..Opts::default()
    });
    let body = json!({"model": MODEL, "prompt": "The history of the Roman Empire", "max_tokens": 900,
                      "temperature": 1.0, "seed": 7, "stream": true,
                      "logit_bias": no_eos()});
    let r = s.send("/v1/completions", &body).await;
    let mut stream = r.bytes_stream();
    let mut got = 0;
    while got < 3 {
        stream.next().await.unwrap().unwrap();
        got += 1;
    }
    assert_eq!(s.performance().await["active_requests"], 1);
    drop(stream); // hang up
    s.wait_for("active_requests", 0, Duration::from_secs(10))
        .await;
    let (_, status) = s.get("/admin/status").await;
    // The abandoned request never completed, so it was not counted as a completion.
    assert_eq!(status["performance"]["completions_total"], 0, "{status}");
    let (st, v) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn auth_keys_guard_api_and_admin() {
    // Keys come from the environment here, as a service would set them.
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let child = common::command()
        .args(["serve", "--port", &port.to_string(), "--models-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(dir.path().join("none.yaml"))
        .env("OPTA_LMX_API_KEY", "sk-test")
        .env("OPTA_LMX_ADMIN_KEY", "adm-test")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // An explicit config path that does not exist stops the start with the path.
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("none.yaml"), "{err}");

    std::fs::write(dir.path().join("c.yaml"), "server:\n  host: 127.0.0.1\n").unwrap();
    let mut child = common::command()
        .args(["serve", "--port", &port.to_string(), "--models-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(dir.path().join("c.yaml"))
        .env("OPTA_LMX_API_KEY", "sk-test")
        .env("OPTA_LMX_ADMIN_KEY", "adm-test")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        st(c.get(format!("{base}/v1/models")).send().await.unwrap()),
        401
    );
    assert_eq!(
        st(c.get(format!("{base}/v1/models"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()),
        401
    );
    assert_eq!(
        st(c.get(format!("{base}/v1/models"))
            .bearer_auth("sk-test")
            .send()
            .await
            .unwrap()),
        200
    );
    assert_eq!(
        st(c.get(format!("{base}/admin/status"))
            .bearer_auth("sk-test")
            .send()
            .await
            .unwrap()),
        401
    );
    assert_eq!(
        st(c.get(format!("{base}/admin/status"))
            .header("X-Admin-Key", "adm-test")
            .send()
            .await
            .unwrap()),
        200
    );
    // Health needs no key.
    assert_eq!(
        st(c.get(format!("{base}/admin/health")).send().await.unwrap()),
        200
    );
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn startup_failures_are_clear() {
    // Port already in use: fails at once, saying so.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "").unwrap();
    let out = common::command()
        .args(["serve", "--port", &port.to_string(), "--models-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already in use") && err.contains(&port.to_string()),
        "{err}"
    );

    // A bad config file names the file, the key and the reason.
    std::fs::write(&cfg, "server:\n  port: lots\n").unwrap();
    let out = common::command()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.yaml") && err.contains("server.port"),
        "{err}"
    );

    // A bad environment value names the variable.
    std::fs::write(&cfg, "").unwrap();
    let out = common::command()
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("OPTA_LMX_MEMORY_THRESHOLD", "eleventy")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OPTA_LMX_MEMORY_THRESHOLD"), "{err}");
}

#[tokio::test]
async fn load_on_demand_when_enabled() {
    let s = Server::start(Opts {
        load_model: false,
        extra_args: vec!["--load-on-demand".into()],
        ..Opts::default()
    });
    let (_, v) = s.get("/v1/models").await;
    assert_eq!(v["data"][0]["loaded"], false);
    // Case-insensitive ids, as clients vary.
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL.to_uppercase(), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], MODEL);
    let (_, v) = s.get("/v1/models").await;
    assert_eq!(v["data"][0]["loaded"], true);
    // Still never a swap: an id that is not on disk is a 404.
    expect_error(
        &s,
        "/v1/chat/completions",
        json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}),
        404,
    )
    .await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams() {
    // The drain limit far above the stream's length on any machine: this asserts that a
    // stop waits for the stream, not how fast the machine decodes.
    let mut s = Server::start(Opts {
        env: vec![("OPTA_LMX_DRAIN_SECONDS".into(), "600".into())],
        ..Opts::default()
    });
    let body = json!({"model": MODEL, "prompt": "The history of the Roman Empire", "max_tokens": 60,
                      "temperature": 0, "stream": true, "logit_bias": no_eos()});
    let r = s.send("/v1/completions", &body).await;
    let mut stream = r.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let pid = s.pid().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("{e}: {}", s.log_text()));
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = common::sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "stream was cut: {text}");
    let finish: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(
        finish.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    let status = s.wait_exit(Duration::from_secs(20));
    let log = s.log_text();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(log.contains("draining done"), "{log}");
}

#[tokio::test]
async fn unload_mid_stream_ends_with_structured_error_event() {
    let s = Server::start(Opts::default());
    let body = json!({"model": MODEL, "prompt": "Once", "max_tokens": 500, "stream": true,
                      "logit_bias": no_eos()});
    let r = s.send("/v1/completions", &body).await;
    let mut stream = r.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let (st, v) = s
        .post("/admin/model/unload", &json!({"model_id": MODEL}))
        .await;
    assert_eq!(st, 200, "{v}");
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("{e}: {}", s.log_text()));
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = common::sse_data(&text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let (msg, kind, _, code) = error_fields(&last);
    assert_eq!(code, "model_unloaded", "{msg}");
    assert_eq!(kind, "server_error");
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "an aborted stream must not claim success"
    );
}
