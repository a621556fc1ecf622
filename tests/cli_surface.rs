//! The coding CLI's routes beyond inference (issue 26): each answer carries the fields the
//! CLI's client reads (`src/lmx/types.ts` in the CLI: `LmxDiscoveryDoc`, `LmxDeviceIdentity`,
//! `LmxMemoryResponse`, `LmxMetricsSummary`) with the types it reads them as.

mod common;

use common::events::EventReader;
use common::{Opts, Server, MODEL};
use serde_json::{json, Value};

const API_KEY: &str = "sk-surface-api";
const ADMIN_KEY: &str = "sk-surface-admin";

/// The JSON type a field must have for the CLI to read it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Str,
    Num,
    Bool,
    Arr,
    Obj,
    /// A string or null.
    StrOrNull,
}

/// Checks each (JSON pointer, kind) of `fields` in `v`.
fn has_fields(v: &Value, fields: &[(&str, Kind)]) {
    for (path, kind) in fields {
        let f = v
            .pointer(path)
            .unwrap_or_else(|| panic!("{path} missing in {v}"));
        let ok = match kind {
            Kind::Str => f.is_string(),
            Kind::Num => f.is_number(),
            Kind::Bool => f.is_boolean(),
            Kind::Arr => f.is_array(),
            Kind::Obj => f.is_object(),
            Kind::StrOrNull => f.is_string() || f.is_null(),
        };
        assert!(ok, "{path} is not {kind:?}: {f}");
    }
}

fn keyed_server() -> Server {
    Server::start(Opts {
        env: vec![
            ("OPTA_LMX_API_KEY".into(), API_KEY.into()),
            ("OPTA_LMX_ADMIN_KEY".into(), ADMIN_KEY.into()),
        ],
        ..Opts::default()
    })
}

async fn admin_get(s: &Server, path: &str) -> (u16, Value) {
    common::with_admin_key(s, reqwest::Method::GET, path, ADMIN_KEY, None).await
}

#[tokio::test]
async fn discovery_answers_without_a_key_and_gives_none_away() {
    use Kind::*;
    let s = keyed_server();
    for path in ["/.well-known/opta-lmx", "/v1/discovery"] {
        let r = reqwest::get(s.url(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let text = r.text().await.unwrap();
        assert!(
            !text.contains(API_KEY) && !text.contains(ADMIN_KEY),
            "{path} leaks a key: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        has_fields(
            &v,
            &[
                ("/service", Str),
                ("/version", Str),
                ("/schema_version", Str),
                ("/instance_id", Str),
                ("/security_profile", Str),
                ("/ready", Bool),
                ("/loaded_models", Arr),
                ("/loaded_model_count", Num),
                ("/continuity/event_resume_supported", Bool),
                ("/auth/admin_key_required", Bool),
                ("/auth/inference_key_required", Bool),
                ("/endpoints/preferred_base_url", Str),
                ("/endpoints/base_urls", Arr),
                ("/endpoints/openai_base_url", Str),
                ("/endpoints/admin_base_url", Str),
                ("/endpoints/websocket_url", StrOrNull),
                ("/client_probe_order", Arr),
            ],
        );
        assert_eq!(v["service"], "opta-lmx");
        assert_eq!(v["auth"]["inference_key_required"], true);
        assert_eq!(v["auth"]["admin_key_required"], true);
        assert_eq!(v["loaded_models"], json!([MODEL]));
        assert_eq!(v["ready"], true);
        // Bound to loopback (the tests' default): reachable there, and the URLs say so.
        let base = format!("http://127.0.0.1:{}", s.port);
        assert_eq!(v["endpoints"]["preferred_base_url"], base);
        assert_eq!(v["endpoints"]["openai_base_url"], format!("{base}/v1"));
    }
    // What it names works: the OpenAI base URL answers with the key, not without.
    let (code, _) = s.get("/v1/models").await;
    assert_eq!(code, 401);
}

#[tokio::test]
async fn device_memory_and_metrics_carry_what_the_cli_reads() {
    use Kind::*;
    let s = keyed_server();
    for path in ["/admin/device", "/admin/memory", "/admin/metrics/json"] {
        let (code, _) = s.get(path).await;
        assert_eq!(code, 401, "{path} needs the admin key");
    }
    let (code, device) = admin_get(&s, "/admin/device").await;
    assert_eq!(code, 200, "{device}");
    has_fields(
        &device,
        &[
            ("/hardware/hostname", Str),
            ("/hardware/memory_gb", Num),
            ("/hardware/cpu_cores", Num),
            ("/hardware/metal_available", Bool),
            ("/hardware/architecture", Str),
            ("/identity/name", Str),
            ("/identity/purpose", Str),
            ("/identity/role", Str),
            ("/engines/gguf/default_threads", Num),
        ],
    );
    assert!(device["hardware"]["cpu_cores"].as_u64().unwrap() >= 1);
    assert!(device["hardware"]["memory_gb"].as_f64().unwrap() > 0.1);

    // One generation, so the model has a share and the metrics something to count.
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(code, 401, "{v}");
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let usage = r.json::<Value>().await.unwrap()["usage"].clone();

    let (code, memory) = admin_get(&s, "/admin/memory").await;
    assert_eq!(code, 200, "{memory}");
    has_fields(
        &memory,
        &[
            ("/total_unified_memory_gb", Num),
            ("/used_gb", Num),
            ("/available_gb", Num),
            ("/threshold_percent", Num),
            ("/models", Obj),
            ("/budget_bytes", Num),
        ],
    );
    let model = &memory["models"][MODEL];
    assert_eq!(model["loaded"], true, "{memory}");
    assert!(model["memory_gb"].as_f64().unwrap() > 0.0, "{memory}");
    let total = memory["total_unified_memory_gb"].as_f64().unwrap();
    let used = memory["used_gb"].as_f64().unwrap();
    assert!(used > 0.0 && used <= total, "{memory}");

    let (code, m) = admin_get(&s, "/admin/metrics/json").await;
    assert_eq!(code, 200, "{m}");
    has_fields(
        &m,
        &[
            ("/totalRequests", Num),
            ("/totalTokens", Num),
            ("/avgLatencyMs", Num),
            ("/errorRate", Num),
            ("/families", Obj),
        ],
    );
    assert_eq!(m["totalRequests"], 1, "{m}");
    let tokens =
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(m["totalTokens"].as_u64(), Some(tokens), "{m}");
    assert!(m["avgLatencyMs"].as_f64().unwrap() > 0.0, "{m}");
    assert_eq!(m["errorRate"], 0.0);
    let completions = &m["families"]["opta_lmx_completions_total"];
    assert_eq!(completions[0]["labels"]["model"], MODEL, "{m}");
    assert_eq!(completions[0]["value"], 1.0, "{m}");
}

#[tokio::test]
async fn a_model_loaded_without_a_context_fits_an_agent_s_turn() {
    // No context anywhere: the model's trained context where memory allows (Gemma 3 270M:
    // 32,768), not the 4,096 that ran the coding CLI's edit task out of room.
    let s = Server::start(Opts {
        context: 0,
        ..Opts::default()
    });
    let (_, status) = admin_get(&s, "/admin/status").await;
    let context = status["loaded_models"][0]["context"].as_u64().unwrap();
    assert!(context >= 16384, "default context {context}: {status}");
    // The CLI's shape: a 3,500-token system prompt (its instructions and tools), then 4,000
    // tokens of history, then the next request.
    let words = |seed: &str, n: usize| {
        (0..n)
            .map(|i| format!("{seed}{}", i % 97))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut messages = vec![json!({"role": "system", "content": words("rule", 1750)})];
    for turn in 0..4 {
        messages.push(json!({"role": "user", "content": words(&format!("ask{turn}x"), 250)}));
        messages.push(json!({"role": "assistant", "content": words(&format!("did{turn}y"), 250)}));
    }
    messages.push(json!({"role": "user", "content": "Now run the tests."}));
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 8, "messages": messages}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 7500, "the prompt is {prompt} tokens");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{v}"
    );
}

#[tokio::test]
async fn events_arrive_for_an_unload_and_a_load_and_need_the_admin_key() {
    let s = Server::start(Opts::default());
    let mut events = EventReader::open(&s, None).await;
    let (code, v) = s
        .post("/admin/model/unload", &json!({"model_id": MODEL}))
        .await;
    assert_eq!(code, 200, "{v}");
    let (e, _) = events.until("model_unloaded").await;
    assert_eq!(e["event_type"], "model_unloaded");
    assert_eq!(e["data"]["model_id"], MODEL);
    assert_eq!(e["data"]["reason"], "request");
    assert!(e["timestamp"].as_f64().unwrap() > 1.7e9);

    let (code, v) = s
        .post(
            "/admin/model/load",
            &json!({"model_id": MODEL, "context": 2048}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (e, _) = events.until("model_loaded").await;
    assert_eq!(e["data"]["model_id"], MODEL);
    assert_eq!(e["data"]["context"], 2048);
    assert!(e["data"]["memory_bytes"].as_u64().unwrap() > 0);
    // Without the admin key where one is set, no stream.
    let keyed = keyed_server();
    let r = reqwest::get(keyed.url("/admin/events")).await.unwrap();
    assert_eq!(r.status(), 401);
    EventReader::open(&keyed, Some(ADMIN_KEY)).await;
}

#[tokio::test]
async fn a_reload_changes_a_key_and_an_alias_live_and_a_bad_file_changes_nothing() {
    let s = Server::start(Opts {
        config: format!("server:\n  api_key: first-key\nmodels:\n  aliases:\n    quick: {MODEL}\n"),
        ..Opts::default()
    });
    let chat = |key: &'static str, model: &'static str| {
        let url = s.url("/v1/chat/completions");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": model, "max_tokens": 2,
                              "messages": [{"role": "user", "content": "Hi"}]}))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(chat("first-key", "quick").await, 200);
    assert_eq!(chat("second-key", "quick").await, 401);
    let mut events = EventReader::open(&s, Some("first-key")).await;

    // The key is replaced and the alias renamed, in the file; a reload puts both in effect.
    let config = s.models_dir.join(".config.yaml");
    std::fs::write(
        &config,
        format!("server:\n  api_key: second-key\nmodels:\n  aliases:\n    swift: {MODEL}\n"),
    )
    .unwrap();
    let reload = |key: &'static str| {
        let url = s.url("/admin/config/reload");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap())
        }
    };
    let (code, v) = reload("first-key").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(
        v["updated"],
        json!([
            "models.aliases.quick",
            "models.aliases.swift",
            "server.api_key"
        ]),
        "{v}"
    );
    assert!(
        !v.to_string().contains("second-key"),
        "values stay out: {v}"
    );
    assert_eq!(chat("first-key", "swift").await, 401);
    assert_eq!(chat("second-key", "swift").await, 200);
    assert_eq!(chat("second-key", "quick").await, 404);
    let (e, _) = events.until("config_reloaded").await;
    assert_eq!(e["data"]["trigger"], "http");

    // A file that does not check: refused with the file, the key and the reason; nothing
    // changes.
    std::fs::write(
        &config,
        "server:\n  api_key: third-key\n  port: not-a-port\n",
    )
    .unwrap();
    let (code, v) = reload("second-key").await;
    assert_eq!(code, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(".config.yaml") && message.contains("server.port"),
        "{message}"
    );
    assert_eq!(chat("second-key", "swift").await, 200);
    assert_eq!(chat("third-key", "swift").await, 401);
    // Both reloads are in the audit log.
    let reloads: Vec<String> = s
        .audit_lines()
        .iter()
        .filter(|l| l["action"] == "config_reload")
        .map(|l| l["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reloads, ["ok", "refused"]);

    // SIGHUP reloads too.
    std::fs::write(
        &config,
        format!("server:\n  api_key: fourth-key\nmodels:\n  aliases:\n    swift: {MODEL}\n"),
    )
    .unwrap();
    unsafe { libc::kill(s.pid() as i32, libc::SIGHUP) };
    let (e, _) = events.until("config_reloaded").await;
    assert_eq!(e["data"]["trigger"], "sighup");
    assert_eq!(chat("fourth-key", "swift").await, 200);
}

#[tokio::test]
async fn a_preset_shapes_a_request_and_a_role_resolves_to_a_loaded_model() {
    let s = Server::start(Opts {
        config: format!(
            "presets:\n  - name: terse\n    description: short answers\n    model: {MODEL}\n    \
             parameters: {{max_tokens: 3, temperature: 0}}\n    system_prompt: You answer in three words.\n    \
             routing_alias: brief\n    context: 2048\nmodels:\n  roles:\n    code: [not-on-disk, {MODEL}]\n"
        ),
        // No --context: the preset's context is the one the model is loaded with.
        context: 0,
        ..Opts::default()
    });
    let (code, v) = s.get("/admin/presets").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["count"], 1);
    assert_eq!(v["presets"][0]["name"], "terse");
    assert_eq!(v["presets"][0]["model"], MODEL);
    let (code, one) = s.get("/admin/presets/brief").await;
    assert_eq!((code, one["name"].as_str()), (200, Some("terse")));
    assert_eq!(one["context"], 2048);
    let (_, perf) = s.get(&format!("/admin/models/{MODEL}/performance")).await;
    assert_eq!(perf["context_length"], 2048, "{perf}");
    assert_eq!(s.get("/admin/presets/nope").await.0, 404);

    let ask = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "Describe the sea."}]});
    let (code, plain) = s
        .post("/v1/chat/completions", &{
            let mut b = ask(MODEL);
            b["max_tokens"] = json!(3);
            b
        })
        .await;
    assert_eq!(code, 200, "{plain}");
    for name in ["terse", "brief"] {
        let (code, v) = s.post("/v1/chat/completions", &ask(name)).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["model"], MODEL);
        // The preset's max_tokens, and its system prompt ahead of the conversation.
        assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(
            v["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64(),
            "{v} vs {plain}"
        );
    }
    // The request's own fields win.
    let (_, v) = s
        .post("/v1/chat/completions", &{
            let mut b = ask("terse");
            b["max_tokens"] = json!(1);
            b
        })
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");

    let (code, stack) = s.get("/admin/stack").await;
    assert_eq!(code, 200, "{stack}");
    assert_eq!(
        stack["roles"]["code"]["preferences"],
        json!(["not-on-disk", MODEL])
    );
    assert_eq!(stack["roles"]["code"]["resolved_model"], MODEL);
    assert_eq!(stack["roles"]["code"]["loaded"], true);
    assert_eq!(stack["loaded_models"], json!([MODEL]));
    let (code, v) = s
        .post("/v1/chat/completions", &{
            let mut b = ask("code");
            b["max_tokens"] = json!(2);
            b
        })
        .await;
    assert_eq!((code, v["model"].as_str()), (200, Some(MODEL)), "{v}");
}

#[tokio::test]
async fn the_websocket_chat_streams_the_same_answer_and_its_cancel_frees_the_sequence() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let s = Server::start(Opts::default());
    let body = json!({"model": MODEL, "max_tokens": 12, "temperature": 0,
                      "messages": [{"role": "user", "content": "Name three colours."}]});
    let (code, whole) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(code, 200, "{whole}");

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/v1/chat/stream", s.port))
            .await
            .unwrap();
    let mut request = body.clone();
    request["type"] = json!("chat.request");
    ws.send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    let (mut text, mut id) = (String::new(), None::<String>);
    let done = loop {
        let m = next_msg(&mut ws).await;
        let rid = m["request_id"].as_str().unwrap().to_string();
        assert!(rid.starts_with("chatcmpl-"), "{m}");
        assert_eq!(id.get_or_insert(rid.clone()), &rid, "one request, one id");
        match m["type"].as_str().unwrap() {
            "chat.token" => text.push_str(m["content"].as_str().unwrap()),
            "chat.done" => break m,
            other => panic!("unexpected {other}: {m}"),
        }
    };
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(done["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(
        done["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );

    // A long answer, cancelled after its first token: `cancelled`, and the sequence is free.
    let mut long = json!({"type": "chat.request", "model": MODEL, "max_tokens": 900,
                          "logit_bias": common::no_eos(),
                          "messages": [{"role": "user", "content": "Tell a long story."}]});
    long["temperature"] = json!(0);
    ws.send(Message::Text(long.to_string().into()))
        .await
        .unwrap();
    let first = next_msg(&mut ws).await;
    assert_eq!(first["type"], "chat.token", "{first}");
    let rid = first["request_id"].as_str().unwrap().to_string();
    let cancel = json!({"type": "chat.cancel", "request_id": rid});
    ws.send(Message::Text(cancel.to_string().into()))
        .await
        .unwrap();
    let done = loop {
        let m = next_msg(&mut ws).await;
        if m["type"] == "chat.done" {
            break m;
        }
    };
    assert_eq!(
        (done["request_id"].as_str(), done["finish_reason"].as_str()),
        (Some(rid.as_str()), Some("cancelled"))
    );
    s.wait_for("active_requests", 0, std::time::Duration::from_secs(30))
        .await;

    // Not a message the protocol knows: an error on the socket, which stays open.
    ws.send(Message::Text(
        json!({"type": "chat.nope"}).to_string().into(),
    ))
    .await
    .unwrap();
    let m = next_msg(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_str()),
        (Some("chat.error"), Some("unknown_message_type"))
    );
}

/// The next text message of a WebSocket, as JSON.
async fn next_msg<S>(ws: &mut S) -> Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(120), ws.next())
            .await
            .expect("a message within two minutes")
            .expect("the socket stays open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Runs `POST path` with `body` under the admin key.
async fn admin_post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    common::with_admin_key(s, reqwest::Method::POST, path, ADMIN_KEY, Some(body)).await
}

#[tokio::test]
async fn a_benchmark_is_measured_beside_other_clients_stored_and_reported() {
    let s = keyed_server();
    // Another client's request sent while the benchmark runs is served beside it (its own
    // sequence and share) and ends first: the benchmark waits for no one and nobody for it.
    let bench = common::spawn_timed(
        reqwest::Client::new()
            .post(s.url("/admin/benchmark"))
            .header("x-admin-key", ADMIN_KEY)
            .json(&json!({"model_id": MODEL, "max_tokens": 24, "runs": 3, "prompt": "Describe the sea."})),
    );
    // The benchmark holds a sequence before the other client asks.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (_, st) = admin_get(&s, "/admin/status").await;
        if st["performance"]["active_requests"].as_u64() > Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the benchmark never started: {st}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&json!({"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let other_done = std::time::Instant::now();
    let (code, quick, bench_done) = bench.await.unwrap();
    assert_eq!(code, 200, "{quick}");
    assert!(other_done < bench_done);
    // The CLI's RawBenchmarkResponse.
    has_fields(
        &quick,
        &[
            ("/model_id", Kind::Str),
            ("/backend_type", Kind::Str),
            ("/prompt", Kind::Str),
            ("/max_tokens", Kind::Num),
            ("/runs", Kind::Num),
            ("/results", Kind::Arr),
            ("/results/0/run", Kind::Num),
            ("/results/0/tokens_generated", Kind::Num),
            ("/results/0/time_to_first_token_ms", Kind::Num),
            ("/results/0/total_time_ms", Kind::Num),
            ("/results/0/tokens_per_second", Kind::Num),
            ("/avg_tokens_per_second", Kind::Num),
            ("/avg_time_to_first_token_ms", Kind::Num),
            ("/avg_total_time_ms", Kind::Num),
        ],
    );
    assert_eq!(
        (&quick["model_id"], &quick["backend_type"]),
        (&json!(MODEL), &json!("llama.cpp"))
    );
    let runs = quick["results"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{quick}");
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["run"], i + 1);
        let n = r["tokens_generated"].as_u64().unwrap();
        assert!((1..=24).contains(&n), "{r}");
        // Each run's prompt differs at its start: the prefill is measured, not cached.
        assert!(
            r["cached_tokens"].as_u64() < Some(r["prompt_tokens"].as_u64().unwrap() / 2),
            "{r}"
        );
        assert!(
            r["time_to_first_token_ms"].as_f64() <= r["total_time_ms"].as_f64(),
            "{r}"
        );
    }
    assert!(
        quick["avg_tokens_per_second"].as_f64().unwrap() > 0.0,
        "{quick}"
    );

    let (code, stored) = admin_post(
        &s,
        "/admin/benchmark/run",
        &json!({"model_id": MODEL, "num_output_tokens": 8, "runs": 2, "warmup_runs": 1}),
    )
    .await;
    assert_eq!(code, 200, "{stored}");
    // The CLI's LmxBenchmarkPersistResult.
    has_fields(
        &stored,
        &[
            ("/model_id", Kind::Str),
            ("/backend", Kind::Str),
            ("/timestamp", Kind::Str),
            ("/status", Kind::Str),
            ("/hardware", Kind::Str),
            ("/lmx_version", Kind::Str),
            ("/prompt_preview", Kind::Str),
            ("/stats/ttft_p50_sec", Kind::Num),
            ("/stats/ttft_p95_sec", Kind::Num),
            ("/stats/ttft_mean_sec", Kind::Num),
            ("/stats/toks_per_sec_p50", Kind::Num),
            ("/stats/toks_per_sec_p95", Kind::Num),
            ("/stats/toks_per_sec_mean", Kind::Num),
            ("/stats/prompt_tokens", Kind::Num),
            ("/stats/output_tokens", Kind::Num),
            ("/stats/runs_completed", Kind::Num),
            ("/stats/warmup_runs_discarded", Kind::Num),
            ("/stats/output_text", Kind::Str),
            ("/stats/output_token_count", Kind::Num),
            ("/stats/completed_naturally", Kind::Bool),
            ("/stats/repetition_ratio", Kind::Num),
            ("/stats/coherence_flag", Kind::Str),
            ("/stats/skills", Kind::Arr),
        ],
    );
    assert_eq!(stored["status"], "ok");
    assert_eq!(
        (
            &stored["stats"]["runs_completed"],
            &stored["stats"]["warmup_runs_discarded"]
        ),
        (&json!(2), &json!(1))
    );
    assert!(["ok", "truncated", "repetitive", "garbled"]
        .contains(&stored["stats"]["coherence_flag"].as_str().unwrap()));

    // Both are stored, beside the models, and listed by model.
    let (code, all) = admin_get(&s, &format!("/admin/benchmark/results?model_id={MODEL}")).await;
    assert_eq!(code, 200);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0]["id"], quick["id"]);
    assert_eq!(all[1], stored);
    let (_, none) = admin_get(&s, "/admin/benchmark/results?model_id=other").await;
    assert_eq!(none, json!([]));
    let file = std::fs::read_to_string(s.models_dir.join(".benchmarks/results.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 2);

    // The model's performance (the CLI's RawModelPerformanceResponse) with what it measured.
    let (code, perf) = admin_get(&s, &format!("/admin/models/{MODEL}/performance")).await;
    assert_eq!(code, 200, "{perf}");
    has_fields(
        &perf,
        &[
            ("/model_id", Kind::Str),
            ("/backend_type", Kind::Str),
            ("/loaded_at", Kind::Num),
            ("/request_count", Kind::Num),
            ("/last_used_at", Kind::Num),
            ("/memory_gb", Kind::Num),
            ("/context_length", Kind::Num),
            ("/use_batching", Kind::Bool),
            ("/performance", Kind::Obj),
            ("/global_defaults", Kind::Obj),
            ("/measured/decode_tokens_per_second", Kind::Num),
            ("/measured/prompt_tokens_total", Kind::Num),
        ],
    );
    assert_eq!(perf["context_length"], 1024);
    assert_eq!(perf["performance"]["parallel"], 2);
    // 3 runs, then 1 warm-up and 2 runs, and the other client's request.
    assert_eq!(perf["request_count"], 7, "{perf}");
    assert_eq!(perf["benchmark"]["id"], stored["id"]);

    // Refusals: a model not loaded, numbers out of range, a path that is no model fact.
    let (code, v) = admin_post(&s, "/admin/benchmark", &json!({"model_id": "nope"})).await;
    assert_eq!(
        (code, &v["error"]["code"]),
        (409, &json!("model_not_loaded")),
        "{v}"
    );
    let (code, v) = admin_post(
        &s,
        "/admin/benchmark/run",
        &json!({"model_id": MODEL, "runs": 0}),
    )
    .await;
    assert_eq!((code, &v["error"]["param"]), (400, &json!("runs")), "{v}");
    let (code, _) = admin_get(&s, "/admin/models/nope/performance").await;
    assert_eq!(code, 404);
    let (code, _) = admin_get(&s, &format!("/admin/models/{MODEL}/secrets")).await;
    assert_eq!(code, 404);
    // Admin routes: the API key is not enough.
    let r = reqwest::Client::new()
        .get(s.url("/admin/benchmark/results"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// A copy of the Gemma GGUF whose architecture is renamed (`zzzzz3`, in its header only; the
/// rest is a hole of the same size): a file this build of llama.cpp cannot load.
fn alien_gguf(dir: &std::path::Path) {
    use std::io::Read;
    let src = common::model_file();
    let size = std::fs::metadata(&src).unwrap().len();
    let mut head = vec![0u8; 16 << 20];
    std::fs::File::open(&src)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    let mut patched = Vec::with_capacity(head.len());
    let mut i = 0;
    while i < head.len() {
        if head[i..].starts_with(b"gemma3") {
            patched.extend_from_slice(b"zzzzz3");
            i += 6;
        } else {
            patched.push(head[i]);
            i += 1;
        }
    }
    let f = std::fs::File::create(dir.join("alien.gguf")).unwrap();
    std::io::Write::write_all(&mut &f, &patched).unwrap();
    f.set_len(size).unwrap();
}

#[tokio::test]
async fn compatibility_and_probe_tell_whether_a_model_can_load_here() {
    use common::hub::{FakeFile, FakeHub, FakeRepo, HubOptions};
    let mut huge = FakeFile::lfs("huge-Q4_K_M.gguf", vec![7; 64]);
    huge.advertised_size = Some(10_000_000_000_000_000); // 10 PB
    let hub = FakeHub::start(
        vec![
            FakeRepo::new(
                "acme/tiny-GGUF",
                vec![FakeFile::lfs("tiny-Q4_K_M.gguf", vec![1; 4096])],
            ),
            FakeRepo::new("acme/huge-GGUF", vec![huge]),
            FakeRepo::new("acme/docs", vec![FakeFile::git("README.md", b"hello")]),
        ],
        HubOptions::default(),
    );
    let s = Server::start(Opts {
        env: vec![
            ("OPTA_LMX_ADMIN_KEY".into(), ADMIN_KEY.into()),
            ("HF_ENDPOINT".into(), hub.base.clone()),
        ],
        ..Opts::default()
    });
    alien_gguf(&s.models_dir);
    let probe = |id: &str| {
        let body = json!({"model_id": id, "timeout_sec": 120});
        let s = &s;
        async move { admin_post(s, "/admin/models/probe", &body).await }
    };

    // Before any probe: the loaded model passes, the renamed one is not known yet.
    let (code, c) = admin_get(&s, "/admin/models/compatibility?include_summary=true").await;
    assert_eq!(code, 200, "{c}");
    let row = |c: &Value, id: &str| {
        c["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {id}: {c}"))
    };
    assert_eq!(row(&c, MODEL)["outcome"], "pass");
    assert_eq!(row(&c, "alien")["outcome"], "unknown");
    assert_eq!(row(&c, "alien")["architecture"], "zzzzz3");
    assert_eq!(c["summary"]["pass"], 1, "{c}");
    assert_eq!(c["total"], 2);

    // The renamed file: its header reads, llama.cpp refuses it and says why.
    let (code, v) = probe("alien").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["success"], &v["outcome"], &v["location"]),
        (&json!(false), &json!("fail"), &json!("disk"))
    );
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("unknown model architecture") && reason.contains("zzzzz3"),
        "{reason}"
    );
    let checks: Vec<(String, bool)> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_string(),
                c["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        checks,
        [
            ("format", true),
            ("header", true),
            ("memory", true),
            ("runtime", false)
        ]
        .map(|(c, ok)| (c.to_string(), ok))
    );
    // A model on disk that is not loaded: every check passes.
    let (_, unloaded) = admin_post(&s, "/admin/model/unload", &json!({"model_id": MODEL})).await;
    assert_eq!(unloaded["status"], "unloaded", "{unloaded}");
    let (code, v) = probe(MODEL).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["success"], &v["recommended_backend"]),
        (&json!(true), &json!("llama.cpp")),
        "{v}"
    );
    assert_eq!(v["architecture"], "gemma3");

    // The probes are recorded, and the filters apply.
    let (_, c) = admin_get(&s, "/admin/models/compatibility?outcome=fail").await;
    assert_eq!(c["total"], 1, "{c}");
    assert_eq!(row(&c, "alien")["last_outcome"]["source"], "probe");
    let (_, c) = admin_get(&s, &format!("/admin/models/compatibility?model_id={MODEL}")).await;
    assert_eq!(
        (&c["total"], &row(&c, MODEL)["outcome"]),
        (&json!(1), &json!("pass"))
    );

    // On the Hub: what a download would fetch, sized against the memory guard.
    let (code, v) = probe("acme/tiny-GGUF").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["success"], &v["location"], &v["format"]),
        (&json!(true), &json!("hub"), &json!("gguf")),
        "{v}"
    );
    assert_eq!(v["files"][0]["path"], "tiny-Q4_K_M.gguf");
    let (_, v) = probe("acme/huge-GGUF").await;
    assert_eq!(v["success"], false, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("memory guard allows"),
        "{v}"
    );
    let (code, v) = probe("acme/missing").await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = probe("no-such-model").await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = probe("../../etc/passwd").await;
    assert_eq!(
        (code, &v["error"]["param"]),
        (400, &json!("model_id")),
        "{v}"
    );
    let (code, v) = admin_post(
        &s,
        "/admin/models/probe",
        &json!({"model_id": MODEL, "timeout_sec": 0}),
    )
    .await;
    assert_eq!(
        (code, &v["error"]["param"]),
        (400, &json!("timeout_sec")),
        "{v}"
    );
}

#[tokio::test]
async fn the_server_is_advertised_on_the_lan_only_beyond_loopback() {
    // On loopback (the default) nobody else could reach it: not advertised.
    let local = Server::start(Opts {
        load_model: false,
        ..Opts::default()
    });
    let (_, d) = local.get("/.well-known/opta-lmx").await;
    assert_eq!(d["mdns"]["advertised"], false, "{d}");
    assert_eq!(d["mdns"]["service_type"], "_opta-lmx._tcp.local.");

    let s = Server::start(Opts {
        load_model: false,
        extra_args: vec!["--host".into(), "0.0.0.0".into()],
        env: vec![("OPTA_LMX_ADMIN_KEY".into(), ADMIN_KEY.into())],
        ..Opts::default()
    });
    let (_, d) = s.get("/.well-known/opta-lmx").await;
    assert_eq!(d["mdns"]["advertised"], true, "{d}");
    let instance = d["mdns"]["instance"].as_str().unwrap().to_string();
    assert!(instance.ends_with("._opta-lmx._tcp.local."), "{instance}");
    // A browser on the LAN (this host, through its own multicast) resolves it to the port,
    // with where the APIs are and that a key is needed (and never the key).
    let browser = mdns_sd::ServiceDaemon::new().unwrap();
    let rx = browser.browse("_opta-lmx._tcp.local.").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "{instance} was never resolved");
        match rx.recv_timeout(left) {
            Ok(mdns_sd::ServiceEvent::ServiceResolved(r)) if r.fullname == instance => break r,
            Ok(_) => continue,
            Err(e) => panic!("{instance} was never resolved: {e}"),
        }
    };
    assert_eq!(found.port, s.port);
    let txt = |k: &str| {
        found
            .txt_properties
            .get_property_val_str(k)
            .map(String::from)
    };
    assert_eq!(txt("auth").as_deref(), Some("required"));
    assert_eq!(txt("api").as_deref(), Some("/v1"));
    assert_eq!(txt("discovery").as_deref(), Some("/.well-known/opta-lmx"));
    assert!(!found.addresses.is_empty());
    let all: Vec<String> = found
        .txt_properties
        .iter()
        .map(|p| format!("{}={}", p.key(), p.val_str()))
        .collect();
    assert!(!all.iter().any(|p| p.contains(ADMIN_KEY)), "{all:?}");
    let _ = browser.shutdown();
}
