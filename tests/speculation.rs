//! Speculative decoding against the real server and the real Qwen model: whatever proposes
//! the tokens (prompt lookup, a draft model), greedy output is the target's own token for
//! token, alone and batched; seeded sampling gives the same text with and without it; the
//! status counts what was proposed and accepted; settings that cannot work are refused with
//! a 400 that says why.

mod common;

use common::fleet::spawn_post;
use common::*;
use serde_json::{json, Value};

/// An edit task: the answer re-emits the given code with one change, which is what prompt
/// lookup proposes well.
fn edit_request(tag: usize) -> Value {
    let code = format!(
        "def total_{tag}(items):\n    result = 0\n    for item in items:\n        result += item.price * item.quantity\n    return result\n\n\ndef average_{tag}(items):\n    if not items:\n        return 0\n    return total_{tag}(items) / len(items)\n"
    );
    json!({
        "model": QWEN,
        "messages": [
            {"role": "system", "content": "You are a coding assistant. Answer with code only."},
            {"role": "user", "content": format!("Rename the variable `result` to `acc` in this code and output the whole file:\n\n```python\n{code}```")}
        ],
        "max_tokens": 120,
        "temperature": 0,
    })
}

/// Free writing: little for prompt lookup to find.
fn story_request() -> Value {
    json!({
        "model": QWEN,
        "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        "max_tokens": 60,
        "temperature": 0,
    })
}

/// One Qwen server at a time: llama.cpp's threads spin while they wait, so two servers
/// decoding on two cores take many times as long as one after the other. Alone, a server may
/// use every core (the harness's default is one thread, for tests that run side by side).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn all_cores() -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    vec!["--threads".into(), cores.to_string()]
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// A server with Qwen linked under its id and under `qwen-draft` (the same file as another
/// model id: a draft that always agrees, so draft verification is exercised fully), loaded
/// with `load` settings.
async fn qwen_server(load: Value) -> Server {
    let s = Server::start(Opts {
        load_model: false,
        context: 2048,
        parallel: 4,
        extra_args: all_cores(),
        ..Opts::default()
    });
    for id in [QWEN, "qwen-draft"] {
        let link = s.models_dir.join(format!("{id}.gguf"));
        std::os::unix::fs::symlink(qwen_file(), link).unwrap();
    }
    let mut body = load;
    body["model_id"] = json!(QWEN);
    let (code, v) = s.post("/admin/model/load", &body).await;
    assert_eq!(code, 200, "{v}");
    s
}

async fn speculation_stats(s: &Server) -> Value {
    let (code, v) = s.get("/admin/status").await;
    assert_eq!(code, 200, "{v}");
    let m = v["loaded_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == QWEN)
        .unwrap_or_else(|| panic!("{QWEN} not loaded: {v}"))
        .clone();
    m["scheduler"]["speculation"].clone()
}

/// `got` is `plain`'s text, or departs from it only where the plain run's two likeliest
/// tokens were nearly tied. llama.cpp computes a pass of several tokens with other matrix
/// kernels than a pass of one (tinyBLAS tiles vs dot products, repacked gemm vs gemv), which
/// round differently, and with 8-bit activations a rounding can move a logit by a few
/// hundredths (seen: a 0.07-nat tie flipped after 50 tokens): a verified pass can flip a near
/// tie, as batching with other requests can. A wrong token where the target was sure (a KV
/// left behind by a rejected proposal, a proposal kept that the target did not pick) fails.
fn assert_same_or_near_tie(plain: &Value, got: &str, what: &str) {
    let want = plain["choices"][0]["message"]["content"].as_str().unwrap();
    if got == want {
        return;
    }
    let tokens = plain["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    // Where the texts part: the first plain token `got` does not continue with. The choice
    // that differed is that token or the one before it (" l" then "ighthouse" in the plain
    // run against " lif" then "eguard": the texts part inside the second token).
    let mut starts = vec![0usize];
    for t in tokens {
        let at = *starts.last().unwrap();
        let text = t["token"].as_str().unwrap();
        if !got.get(at..).is_some_and(|g| g.starts_with(text)) {
            let near_tie = |k: usize| {
                let top = tokens[k]["top_logprobs"].as_array().unwrap();
                let gap = top[0]["logprob"].as_f64().unwrap() - top[1]["logprob"].as_f64().unwrap();
                let alt = top[1]["token"].as_str().unwrap();
                (
                    gap < 0.25 && got.get(starts[k]..).is_some_and(|g| g.starts_with(alt)),
                    gap,
                )
            };
            let k = starts.len() - 1;
            let here = near_tie(k);
            let before = if k > 0 {
                near_tie(k - 1)
            } else {
                (false, f64::NAN)
            };
            assert!(
                here.0 || before.0,
                "{what}: departs at byte {at} where the target was sure (gaps {:.4} / {:.4} nats):\nplain: {want:?}\ngot:   {got:?}",
                before.1,
                here.1
            );
            return;
        }
        starts.push(at + text.len());
    }
    panic!("{what}: same tokens, different text?\nplain: {want:?}\ngot:   {got:?}");
}

/// Every request alone with speculation off, then with the model's mode, then four at once.
async fn assert_greedy_unchanged(s: &Server, requests: &[Value]) {
    let mut plain = Vec::new();
    for r in requests {
        let mut r = with(r.clone(), "speculation", json!("off"));
        r["logprobs"] = json!(true);
        r["top_logprobs"] = json!(2);
        let (code, v) = s.post("/v1/chat/completions", &r).await;
        assert_eq!(code, 200, "{v}");
        plain.push(v);
    }
    let mut exact = 0;
    for (r, want) in requests.iter().zip(&plain) {
        let got = s.chat_text(r.clone()).await;
        assert_same_or_near_tie(want, &got, "alone");
        exact += usize::from(got == want["choices"][0]["message"]["content"]);
    }
    let batched: Vec<_> = requests
        .iter()
        .map(|r| spawn_post(s.url("/v1/chat/completions"), r.clone()))
        .collect();
    for (h, want) in batched.into_iter().zip(&plain) {
        let (code, body) = h.await.unwrap();
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_same_or_near_tie(want, got, "batched");
    }
    // Near ties are rare: most answers are the plain ones to the byte.
    assert!(
        exact * 2 >= requests.len(),
        "{exact} of {} exact",
        requests.len()
    );
}

#[tokio::test]
async fn ngram_speculation_keeps_greedy_output_and_counts_what_it_accepts() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = qwen_server(json!({"speculation": "ngram", "speculation_adaptive": false})).await;
    let requests = [
        edit_request(1),
        edit_request(2),
        edit_request(3),
        story_request(),
    ];
    assert_greedy_unchanged(&s, &requests).await;
    let st = speculation_stats(&s).await;
    assert_eq!(st["mode"], "ngram", "{st}");
    let proposed = st["proposed_tokens_total"].as_u64().unwrap();
    let accepted = st["accepted_tokens_total"].as_u64().unwrap();
    // The edits re-emit their code: most of what prompt lookup proposes is kept.
    assert!(proposed >= 100, "{st}");
    assert!(accepted * 2 >= proposed, "{st}");
    assert!(st["speculative_steps_total"].as_u64().unwrap() > 0, "{st}");
    // The same counts for Prometheus.
    let text = s.metrics_text().await;
    let line = format!("opta_lmx_speculation_accepted_tokens{{model=\"{QWEN}\"}} {accepted}");
    assert!(text.contains(&line), "{line} not in {text}");

    // A request may turn it off: nothing more is proposed for it.
    let before = speculation_stats(&s).await["proposed_tokens_total"].clone();
    s.chat_text(with(edit_request(4), "speculation", json!("off")))
        .await;
    assert_eq!(speculation_stats(&s).await["proposed_tokens_total"], before);

    // Seeded sampling: the same text with and without speculation, and run to run.
    let sampled = json!({
        "model": QWEN,
        "messages": edit_request(5)["messages"],
        "max_tokens": 80,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 1234,
    });
    let a = s.chat_text(sampled.clone()).await;
    let b = s.chat_text(sampled.clone()).await;
    let off = s
        .chat_text(with(sampled.clone(), "speculation", json!("off")))
        .await;
    assert_eq!(a, b, "seeded sampling not reproducible with speculation");
    // The sampler draws the same numbers in the same order with and without speculation.
    assert_eq!(a, off, "seeded sampling changed by speculation");
}

#[tokio::test]
async fn the_adaptive_default_gives_the_same_greedy_output() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = qwen_server(json!({"speculation": "ngram"})).await;
    assert_greedy_unchanged(&s, &[edit_request(6), story_request()]).await;
    assert_eq!(speculation_stats(&s).await["mode"], "ngram");
}

#[tokio::test]
async fn draft_speculation_keeps_greedy_output() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = qwen_server(json!({
        "speculation": "draft",
        "draft_model": "qwen-draft",
        "speculation_adaptive": false,
    }))
    .await;
    assert_greedy_unchanged(&s, &[edit_request(7), story_request()]).await;
    let st = speculation_stats(&s).await;
    assert_eq!(st["mode"], "draft", "{st}");
    let proposed = st["proposed_tokens_total"].as_u64().unwrap();
    // The draft is the target itself: it proposes what the target picks.
    assert!(proposed >= 50, "{st}");
    assert!(
        st["accepted_tokens_total"].as_u64().unwrap() * 10 >= proposed * 9,
        "{st}"
    );
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_with_a_reason() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Server::start(Opts {
        load_model: false,
        ..Opts::default()
    });
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    let cases = [
        // Gemma's 262k-token vocabulary is not Qwen's.
        (
            json!({"model_id": MODEL, "speculation": "draft", "draft_model": QWEN}),
            "draft_model",
            "vocabulary",
        ),
        (
            json!({"model_id": QWEN, "speculation": "draft", "draft_model": "nowhere"}),
            "draft_model",
            "not on disk",
        ),
        (
            json!({"model_id": QWEN, "speculation": "draft"}),
            "speculation",
            "draft_model",
        ),
        (
            json!({"model_id": QWEN, "speculation": "draft", "draft_model": QWEN}),
            "draft_model",
            "its own draft",
        ),
        (
            json!({"model_id": MODEL, "cache_type_v": "q8_0", "flash_attention": "off"}),
            "cache_type_v",
            "flash attention",
        ),
        (
            json!({"model_id": MODEL, "cache_type_k": "q3_x"}),
            "",
            "cache_type_k",
        ),
        (
            json!({"model_id": MODEL, "draft_max": 0}),
            "draft_max",
            "1..=64",
        ),
    ];
    for (body, param, words) in cases {
        let (code, v) = s.post("/admin/model/load", &body).await;
        assert_eq!(code, 400, "{body} -> {v}");
        let (msg, kind, p, _) = error_fields(&v);
        assert_eq!(kind, "invalid_request_error", "{v}");
        if !param.is_empty() {
            assert_eq!(p, json!(param), "{v}");
        }
        assert!(msg.contains(words), "{body} -> {msg}");
    }
    let (_, st) = s.get("/admin/status").await;
    assert_eq!(st["loaded_models"], json!([]), "nothing was loaded: {st}");

    // A request may not ask for a draft its model was loaded without.
    let (code, v) = s
        .post("/admin/model/load", &json!({"model_id": QWEN}))
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &with(story_request(), "speculation", json!("draft")),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(error_fields(&v).2, json!("speculation"), "{v}");
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &with(story_request(), "speculation", json!("sideways")),
        )
        .await;
    assert_eq!(code, 400, "{v}");
}
