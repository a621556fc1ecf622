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
    let r = reqwest::Client::new()
        .get(s.url(path))
        .header("x-admin-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
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
             routing_alias: brief\nmodels:\n  roles:\n    code: [not-on-disk, {MODEL}]\n"
        ),
        ..Opts::default()
    });
    let (code, v) = s.get("/admin/presets").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["count"], 1);
    assert_eq!(v["presets"][0]["name"], "terse");
    assert_eq!(v["presets"][0]["model"], MODEL);
    let (code, one) = s.get("/admin/presets/brief").await;
    assert_eq!((code, one["name"].as_str()), (200, Some("terse")));
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
