//! The memory threshold, tested in a binary of its own: it measures the machine's memory, so
//! no other test may be loading models meanwhile (cargo runs test binaries one at a time).

mod common;

use std::time::Duration;

use common::error_fields;
use common::fleet::{chat, inventory, load, loaded_ids, server, spawn_post};
use serde_json::json;

#[tokio::test]
async fn a_low_memory_threshold_evicts_the_least_recently_used_or_refuses_with_numbers() {
    // Measure what one load takes and what the machine uses now, then set the threshold to
    // leave room for about one and a half loads.
    let probe = server(&[]);
    let need = inventory(&probe, "gemma-a").await["estimated_memory"]["ram_bytes"]
        .as_u64()
        .unwrap();
    let (_, st) = probe.get("/admin/status").await;
    let total = st["memory"]["total_bytes"].as_u64().unwrap() as f64;
    let used = st["memory"]["used_bytes"].as_u64().unwrap() as f64;
    drop(probe);
    let threshold = (used + 1.5 * need as f64) / total * 100.0;
    let threshold_text = format!("{threshold:.3}");
    let s = server(&["--memory-threshold", &threshold_text]);

    let (code, v) = load(&s, json!({"model_id": "gemma-a"})).await;
    assert_eq!(code, 200, "{v}");
    s.chat_text(chat("gemma-a", 2)).await;
    // The machine really stays under the threshold with the model loaded and used.
    let (_, st) = s.get("/admin/status").await;
    let used_percent = st["memory"]["used_percent"].as_f64().unwrap();
    assert!(
        used_percent <= threshold,
        "{used_percent}% used > {threshold}%"
    );

    // B does not fit beside A: A, idle and unpinned, is evicted.
    let (code, v) = load(&s, json!({"model_id": "gemma-b", "pin": true})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!(["gemma-a"]));
    assert_eq!(v["pinned"], true);
    assert_eq!(loaded_ids(&s).await, ["gemma-b"]);
    let log = s.log_text();
    assert!(
        log.lines().any(|l| l.contains("event=\"model_evicted\"")
            && l.contains("model=gemma-a")
            && l.contains("reason=\"memory\"")),
        "{log}"
    );

    // B is pinned: nothing may go, so A is refused, with the numbers, and nothing unloads.
    let (code, v) = load(&s, json!({"model_id": "gemma-a"})).await;
    assert_eq!(code, 503, "{v}");
    let (msg, kind, _, c) = error_fields(&v);
    assert_eq!(
        (kind.as_str(), c),
        ("server_error", json!("insufficient_memory"))
    );
    println!("refusal: {msg}");
    assert!(
        msg.contains(&format!("needs about {} MB", need.div_ceil(1_000_000))),
        "{msg}"
    );
    let shown: f64 = threshold_text.parse().unwrap();
    assert!(
        msg.contains(&format!("the {shown}% memory threshold")),
        "{msg}"
    );
    assert!(msg.contains("gemma-b (pinned)"), "{msg}");
    assert_eq!(loaded_ids(&s).await, ["gemma-b"]);

    // Unpinned but busy: refused while its request runs, evicted once it is idle, and the
    // running stream is not cut.
    let (code, v) = load(&s, json!({"model_id": "gemma-b", "pin": false})).await;
    assert_eq!((code, v["status"].clone()), (200, json!("already_loaded")));
    assert_eq!(v["pinned"], false);
    let mut body = chat("gemma-b", 250);
    body["stream"] = json!(true);
    let stream = spawn_post(s.url("/v1/chat/completions"), body);
    s.wait_for("active_requests", 1, Duration::from_secs(10))
        .await;
    let (code, v) = load(&s, json!({"model_id": "gemma-a"})).await;
    assert_eq!(code, 503, "{v}");
    assert!(error_fields(&v).0.contains("gemma-b (busy)"), "{v}");
    let (code, text) = stream.await.unwrap();
    assert_eq!(code, 200);
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the busy model's stream was cut: {text}"
    );
    // The client has its last byte a moment before the scheduler counts the request done:
    // wait for that state, not for time, before asking for the eviction.
    s.wait_for("active_requests", 0, Duration::from_secs(30))
        .await;
    let (code, v) = load(&s, json!({"model_id": "gemma-a"})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!(["gemma-b"]));
    assert_eq!(loaded_ids(&s).await, ["gemma-a"]);
    let (_, st) = s.get("/admin/status").await;
    let used_percent = st["memory"]["used_percent"].as_f64().unwrap();
    assert!(
        used_percent <= threshold,
        "{used_percent}% used > {threshold}%"
    );
}

#[tokio::test]
async fn a_threshold_below_current_use_refuses_every_load() {
    let s = server(&["--memory-threshold", "1"]);
    let (code, v) = load(&s, json!({"model_id": "gemma-a"})).await;
    assert_eq!(code, 503, "{v}");
    let (msg, _, _, c) = error_fields(&v);
    assert_eq!(c, "insufficient_memory");
    assert!(
        msg.contains("at most 0 MB can be had under the 1% memory threshold"),
        "{msg}"
    );
    assert!(loaded_ids(&s).await.is_empty());
    assert!(s.log_text().contains("model_load_refused"));
}
