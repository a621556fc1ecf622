//! Several models in memory: the Gemma model linked under several ids, loaded together, evicted
//! least-recently-used first under a low memory threshold or `max_loaded_models`, refused
//! with numbers when pinned or busy models leave no room, unloaded after their TTL, loaded on
//! demand once for many concurrent requests, listed in the inventory, and deleted.

mod common;

use std::time::{Duration, Instant};

use common::fleet::{chat, events, inventory, load, loaded_ids, model_ids, server, spawn_post};
use common::{error_fields, Opts, Server, MODEL};
use serde_json::{json, Value};

#[tokio::test]
async fn two_models_serve_together_and_the_inventory_tells_all() {
    let s = server(&[]);
    // Before loading: what a load would take, from the GGUF header.
    let before = inventory(&s, "gemma-a").await;
    assert_eq!(before["loaded"], false);
    assert_eq!(before["quantization"], "Q4_K_M");
    assert_eq!(before["architecture"], "gemma3");
    assert_eq!(before["size_bytes"], 253_113_024);
    assert_eq!(before["context"], 1024);
    assert_eq!(before["request_count"], 0);
    assert_eq!(before["last_used"], Value::Null);
    let est = &before["estimated_memory"];
    let total = est["total_bytes"].as_u64().unwrap();
    // The file, plus the layer matrices llama.cpp copies into its repacked CPU layout.
    let weights = est["weights_bytes"].as_u64().unwrap();
    assert!(
        (253_113_024..253_113_024 + 20_000_000).contains(&weights),
        "{est}"
    );
    // 18 layers x 1 KV head x (256 + 256) x f16 x 1024 tokens x 2 sequences.
    assert_eq!(est["kv_cache_bytes"], 18 * 512 * 2 * 1024 * 2);
    assert_eq!(
        total,
        weights + est["kv_cache_bytes"].as_u64().unwrap() + est["overhead_bytes"].as_u64().unwrap()
    );

    let (code, a) = load(&s, json!({"model_id": "gemma-a"})).await;
    assert_eq!(code, 200, "{a}");
    assert_eq!(
        a["memory"]["total_bytes"], total,
        "load uses the inventory's estimate"
    );
    let (code, b) = load(
        &s,
        json!({"model_id": "gemma-b", "context": 512, "parallel": 1}),
    )
    .await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["evicted"], Value::Null);
    assert_eq!(loaded_ids(&s).await, ["gemma-a", "gemma-b"]);

    let ta = s.chat_text(chat("gemma-a", 6)).await;
    let tb = s.chat_text(chat("gemma-b", 6)).await;
    s.chat_text(chat("gemma-a", 2)).await;
    assert_eq!(ta, tb, "the same weights under two ids answer the same");

    let a = inventory(&s, "gemma-a").await;
    assert_eq!(a["loaded"], true);
    assert_eq!(a["request_count"], 2);
    assert!(a["last_used"].as_str().unwrap().ends_with('Z'));
    assert_eq!(a["memory_bytes"], total);
    let b = inventory(&s, "gemma-b").await;
    assert_eq!(b["context"], 512);
    assert_eq!(b["request_count"], 1);
    let (_, status) = s.get("/admin/status").await;
    let models_bytes = status["memory"]["models_bytes"].as_u64().unwrap();
    assert_eq!(models_bytes, total + b["memory_bytes"].as_u64().unwrap());

    // Use figures outlive an unload.
    let (code, _) = s
        .post("/admin/model/unload", &json!({"model_id": "gemma-a"}))
        .await;
    assert_eq!(code, 200);
    let a = inventory(&s, "gemma-a").await;
    assert_eq!(
        (a["loaded"].clone(), a["request_count"].clone()),
        (json!(false), json!(2))
    );
    assert!(a["last_used"].is_string());
    assert_eq!(events(&s, "model_loaded", "gemma-a"), 1);
    assert_eq!(events(&s, "model_unloaded", "gemma-a"), 1);
}

#[tokio::test]
async fn max_loaded_models_evicts_the_least_recently_used() {
    let s = server(&["--max-loaded-models", "2"]);
    for id in ["gemma-a", "gemma-b"] {
        let (code, v) = load(&s, json!({"model_id": id, "parallel": 1, "context": 256})).await;
        assert_eq!(code, 200, "{v}");
    }
    // A was used after B was loaded, so B is the least recently used.
    s.chat_text(chat("gemma-a", 1)).await;
    let (code, v) = load(
        &s,
        json!({"model_id": "gemma-c", "parallel": 1, "context": 256}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!(["gemma-b"]));
    assert_eq!(loaded_ids(&s).await, ["gemma-a", "gemma-c"]);

    // With both pinned, a third is refused and nothing is unloaded.
    for id in ["gemma-a", "gemma-c"] {
        let (code, _) = load(&s, json!({"model_id": id, "pin": true})).await;
        assert_eq!(code, 200);
    }
    let (code, v) = load(&s, json!({"model_id": "gemma-b"})).await;
    assert_eq!(code, 503, "{v}");
    let (msg, _, _, c) = error_fields(&v);
    assert_eq!(c, "max_loaded_models");
    assert!(
        msg.contains("gemma-a (pinned)") && msg.contains("gemma-c (pinned)"),
        "{msg}"
    );
    assert_eq!(loaded_ids(&s).await, ["gemma-a", "gemma-c"]);
    let (code, v) = s.get("/admin/models").await;
    assert_eq!(code, 200);
    assert_eq!(v["max_loaded_models"], 2);
}

#[tokio::test]
async fn idle_models_unload_after_their_ttl_but_not_while_busy() {
    let s = server(&[]);
    // A long TTL first: a 1 s TTL could expire while the next load runs on a slow machine.
    let (code, v) = load(
        &s,
        json!({"model_id": "gemma-a", "ttl_seconds": 600, "parallel": 1, "context": 4096}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = load(&s, json!({"model_id": "gemma-b", "parallel": 1})).await;
    assert_eq!(code, 200);

    // A request that outlasts the TTL keeps the model loaded while it runs (4000 tokens: far
    // longer than the check on any machine; the client hangs up after it).
    let long = spawn_post(s.url("/v1/chat/completions"), chat("gemma-a", 4000));
    s.wait_for("active_requests", 1, Duration::from_secs(30))
        .await;
    // Now a 1 s TTL, set on the loaded model while its request runs.
    let (code, v) = load(&s, json!({"model_id": "gemma-a", "ttl_seconds": 1})).await;
    assert_eq!(
        (code, v["status"].clone()),
        (200, json!("already_loaded")),
        "{v}"
    );
    assert_eq!(v["ttl_seconds"], 1);
    let (_, st) = s.get("/admin/status").await;
    let a = st["loaded_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gemma-a")
        .unwrap()
        .clone();
    assert_eq!(
        (a["ttl_seconds"].clone(), a["pinned"].clone()),
        (json!(1), json!(false))
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        s.performance().await["active_requests"],
        1,
        "the request ended too soon"
    );
    assert!(loaded_ids(&s).await.contains(&"gemma-a".to_string()));
    long.abort();
    s.wait_for("active_requests", 0, Duration::from_secs(10))
        .await;

    // Idle past its TTL it goes; the model without a TTL stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while loaded_ids(&s).await.contains(&"gemma-a".to_string()) {
        assert!(Instant::now() < deadline, "TTL never unloaded gemma-a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(loaded_ids(&s).await, ["gemma-b"]);
    let log = s.log_text();
    assert!(
        log.lines().any(|l| l.contains("event=\"model_evicted\"")
            && l.contains("model=gemma-a")
            && l.contains("reason=\"ttl\"")),
        "{log}"
    );
    // A zero TTL is a mistake, not "unload at once".
    let (code, v) = load(&s, json!({"model_id": "gemma-c", "ttl_seconds": 0})).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(error_fields(&v).2, "ttl_seconds");
}

#[tokio::test]
async fn load_on_demand_serves_concurrent_requests_from_one_load() {
    let s = server(&["--load-on-demand"]);
    let tasks: Vec<_> = (0..4)
        .map(|_| spawn_post(s.url("/v1/chat/completions"), chat("gemma-b", 3)))
        .collect();
    for t in tasks {
        let (code, body) = t.await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(loaded_ids(&s).await, ["gemma-b"]);
    assert_eq!(events(&s, "model_loaded", "gemma-b"), 1, "{}", s.log_text());
    assert_eq!(inventory(&s, "gemma-b").await["request_count"], 4);

    // Unknown models are still a 404, never a load of something else.
    let (code, v) = s.post("/v1/chat/completions", &chat("gemma-z", 1)).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(error_fields(&v).3, "model_not_found");
}

#[tokio::test]
async fn without_load_on_demand_an_unloaded_model_is_a_clear_404() {
    let s = server(&[]);
    let (code, v) = s.post("/v1/chat/completions", &chat("gemma-a", 1)).await;
    assert_eq!(code, 404, "{v}");
    let (msg, _, _, c) = error_fields(&v);
    assert_eq!(c, "model_not_found");
    assert!(msg.contains("not loaded"), "{msg}");
    assert!(loaded_ids(&s).await.is_empty());
}

#[tokio::test]
async fn deleting_needs_confirmation_and_force_while_loaded() {
    let s = server(&[]);
    s.link_model("acme/two-GGUF/two-Q4_K_M.gguf");
    let (code, v) = s.delete("/admin/model/gemma-a").await;
    assert_eq!(code, 400, "{v}");
    let (_, _, param, c) = error_fields(&v);
    assert_eq!(
        (param, c),
        (json!("confirm"), json!("confirmation_required"))
    );
    assert!(s.models_dir.join("gemma-a.gguf").exists());

    let (code, _) = load(&s, json!({"model_id": "gemma-a", "parallel": 1})).await;
    assert_eq!(code, 200);
    let (code, v) = s.delete("/admin/model/gemma-a?confirm=true").await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(error_fields(&v).3, "model_loaded");
    assert_eq!(loaded_ids(&s).await, ["gemma-a"]);

    let r = reqwest::Client::new()
        .delete(s.url("/admin/model/gemma-a"))
        .json(&json!({"confirm": true, "force": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["unloaded"], true);
    assert_eq!(v["files"], json!(["gemma-a.gguf"]));
    assert_eq!(v["bytes_freed"], 253_113_024);
    assert!(!s.models_dir.join("gemma-a.gguf").exists());
    assert!(
        common::model_file().exists(),
        "a linked model's target is not touched"
    );
    assert!(loaded_ids(&s).await.is_empty());

    // Nested ids; the folder goes with its last model.
    let (code, v) = s
        .delete("/admin/model/acme/two-GGUF/two-Q4_K_M?confirm=true")
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(!s.models_dir.join("acme").exists());

    let (code, v) = s.delete("/admin/model/gemma-a?confirm=true").await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = s
        .delete("/admin/model/..%2F..%2Fetc%2Fpasswd?confirm=true")
        .await;
    assert_eq!(code, 400, "{v}");
    let (code, _) = s.get("/v1/models").await;
    assert_eq!(code, 200);
    assert!(model_ids(&s).await.contains(&MODEL.to_string()));
    assert!(s.log_text().contains("model_deleted"));
}

/// The process's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Unloading gives a model's memory back to the system: the allocator's leftovers were
/// 0.2-1.6 GB of resident memory that the memory guard then counted against the next load.
#[tokio::test]
async fn unloading_every_model_gives_the_memory_back() {
    let s = Server::start(Opts {
        load_model: false,
        parallel: 4,
        ..Opts::default()
    });
    s.link_model("second.gguf");
    let start = rss_bytes(s.pid());
    for _ in 0..2 {
        for id in [MODEL, "second"] {
            let (code, v) = s.post("/admin/model/load", &json!({"model_id": id})).await;
            assert_eq!(code, 200, "{v}");
            for _ in 0..3 {
                let (code, v) = s
                    .post(
                        "/v1/chat/completions",
                        &json!({"model": id, "max_tokens": 24,
                                "messages": [{"role": "user", "content": "Tell me a long story about the sea. ".repeat(20)}]}),
                    )
                    .await;
                assert_eq!(code, 200, "{v}");
            }
        }
        assert!(
            rss_bytes(s.pid()) > start + (400 << 20),
            "two models should be resident"
        );
        for id in [MODEL, "second"] {
            let (code, v) = s
                .post("/admin/model/unload", &json!({"model_id": id}))
                .await;
            assert_eq!(code, 200, "{v}");
        }
        let after = rss_bytes(s.pid());
        assert!(
            after < start + (100 << 20),
            "resident memory {} MB after unloading everything, {} MB at start",
            after >> 20,
            start >> 20
        );
    }
}
