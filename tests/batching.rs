//! Continuous batching with the real model: many streams from one model, the prefix cache,
//! the bounded queue, cancellation and keep-alives, observed through the HTTP API only.

mod common;

use std::time::{Duration, Instant};

use common::{error_fields, no_eos, opening_words, sse_data, Opts, Server, MODEL};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// How long a status figure may take to reach what a test waits for.
const SETTLE: Duration = Duration::from_secs(30);

/// Starts a long streaming generation that holds a sequence until the response is dropped.
async fn hold_a_sequence(s: &Server) -> reqwest::Response {
    let r = s
        .send(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900,
                    "temperature": 0, "stream": true, "logit_bias": no_eos()}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r
}

/// Reads a whole SSE response; returns the concatenated text and the final usage.
async fn read_stream(r: reqwest::Response) -> (String, Value) {
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let mut text = String::new();
    let mut usage = Value::Null;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        let choice = &v["choices"][0];
        if let Some(t) = choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
        {
            text.push_str(t);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    (text, usage)
}

fn chat(system: &str, user: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens, "temperature": 0, "logit_bias": no_eos(),
        "stream": stream, "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// A system prompt of about `words` tokens, distinct per `seed`.
fn system_prompt(seed: &str, words: usize) -> String {
    let vocab = [
        "river", "stone", "lantern", "orchard", "copper", "meadow", "harbor", "violet",
    ];
    let mut s = format!("You are {seed}, a careful assistant. Rules:");
    for i in 0..words {
        s.push(' ');
        s.push_str(vocab[(i * 7 + seed.len()) % vocab.len()]);
    }
    s
}

/// Eight short, distinct prompts.
const QUESTIONS: [&str; 8] = [
    "Rivers flow",
    "Green leaves",
    "In the city",
    "A small cat",
    "Stars shine",
    "Bees are",
    "The sea is",
    "Bread is made",
];

fn completion(q: &str, n: u32) -> Value {
    json!({"model": MODEL, "prompt": q, "max_tokens": n, "temperature": 0,
           "logit_bias": no_eos(), "stream": true, "stream_options": {"include_usage": true}})
}

/// Serves the eight questions one at a time, then all at once (arriving in reverse, so each
/// lands in another sequence than alone); returns (alone, together, most sequences seen
/// decoding at once).
async fn alone_then_together(s: &Server) -> (Vec<(String, Value)>, Vec<(String, Value)>, u64) {
    let mut alone = Vec::new();
    for q in QUESTIONS {
        let r = s.send("/v1/completions", &completion(q, 12)).await;
        alone.push(read_stream(r).await);
    }
    // A watcher records how many sequences ran together.
    let watcher = {
        let url = s.url("/admin/status");
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..400 {
                let v: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
                most = most.max(v["performance"]["active_requests"].as_u64().unwrap());
                if most == 8 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let mut together = futures_util::future::join_all((0..8).rev().map(|i| async move {
        let r = s
            .send("/v1/completions", &completion(QUESTIONS[i], 12))
            .await;
        (i, read_stream(r).await)
    }))
    .await;
    together.sort_by_key(|(i, _)| *i);
    let together = together.into_iter().map(|(_, r)| r).collect();
    (alone, together, watcher.await.unwrap())
}

#[tokio::test]
async fn eight_streams_at_once_match_each_served_alone_in_batch_invariant_mode() {
    // Batch-invariant mode decodes each sequence alone, in the same chunks as when nothing
    // else runs, so equality holds bit for bit on every CPU. What it checks is the
    // scheduler: eight requests in flight, slots reused, and no sequence ever sees another's
    // tokens or cache.
    let s = Server::start(Opts {
        parallel: 8,
        extra_args: vec!["--batch-invariant".into()],
        ..Opts::default()
    });
    let (alone, together, most) = alone_then_together(&s).await;
    for (i, ((text, usage), (alone_text, alone_usage))) in together.iter().zip(&alone).enumerate() {
        assert_eq!(usage["completion_tokens"], 12, "{usage}");
        assert_eq!(usage["prompt_tokens"], alone_usage["prompt_tokens"]);
        assert_eq!(
            text, alone_text,
            "question {:?} changed when served with seven others",
            QUESTIONS[i]
        );
    }
    let distinct: std::collections::HashSet<_> = together.iter().map(|(t, _)| t).collect();
    assert!(distinct.len() > 1, "all answers identical: {together:?}");
    assert_eq!(most, 8, "the eight requests were never in flight together");
}

#[tokio::test]
async fn eight_streams_at_once_are_decoded_together_in_the_default_mode() {
    // In the default mode the eight share each forward pass. llama.cpp's CPU kernels round a
    // batch differently from a lone token (vec_dot, tinyBLAS tiles, repacked Q4_K gemv/gemm,
    // and these differ between AVX2 and AVX-512 machines), so where two next tokens are nearly
    // tied a batched answer may take the other one: only what holds everywhere is asserted.
    let s = Server::start(Opts {
        parallel: 8,
        ..Opts::default()
    });
    let (alone, together, most) = alone_then_together(&s).await;
    for ((text, usage), (_, alone_usage)) in together.iter().zip(&alone) {
        assert_eq!(usage["completion_tokens"], 12, "{usage}");
        assert_eq!(usage["prompt_tokens"], alone_usage["prompt_tokens"]);
        assert!(!text.trim().is_empty(), "{together:?}");
    }
    let distinct: std::collections::HashSet<_> = together.iter().map(|(t, _)| t).collect();
    assert!(distinct.len() > 1, "all answers identical: {together:?}");
    assert_eq!(most, 8, "the eight requests were never decoded together");
}

#[tokio::test]
async fn full_queue_is_refused_with_429_before_any_stream_bytes() {
    let s = Server::start(Opts {
        parallel: 1,
        extra_args: vec!["--max-queue".into(), "1".into()],
        ..Opts::default()
    });
    let running = hold_a_sequence(&s).await;
    s.wait_for("active_requests", 1, SETTLE).await;
    let queued = hold_a_sequence(&s).await;
    s.wait_for("queued_requests", 1, SETTLE).await;

    // A third request, streaming: refused outright, as JSON, with Retry-After.
    let r = s
        .send(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    let (message, kind, _, code) = error_fields(&body);
    assert_eq!(code, "rate_limit_exceeded");
    assert_eq!(kind, "rate_limit_exceeded");
    assert!(message.contains("queue"), "{message}");
    // Non-streaming too.
    let (code, _) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(code, 429);
    assert_eq!(s.performance().await["rejected_requests_total"], 2);

    // Once the queue drains, the server serves again.
    drop(queued);
    drop(running);
    s.wait_for("active_requests", 0, SETTLE).await;
    let (code, v) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 2}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn queued_requests_are_served_in_arrival_order() {
    let s = Server::start(Opts {
        parallel: 1,
        ..Opts::default()
    });
    let running = hold_a_sequence(&s).await;
    s.wait_for("active_requests", 1, SETTLE).await;
    let mut waiting = Vec::new();
    for (i, name) in ["first", "second", "third"].into_iter().enumerate() {
        let url = s.url("/v1/completions");
        waiting.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({"model": MODEL, "prompt": name, "max_tokens": 4, "temperature": 0}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let _: Value = r.json().await.unwrap();
            (name, Instant::now())
        }));
        s.wait_for("queued_requests", i as u64 + 1, SETTLE).await;
    }
    drop(running);
    let mut done = Vec::new();
    for w in waiting {
        done.push(w.await.unwrap());
    }
    done.sort_by_key(|(_, t)| *t);
    let order: Vec<_> = done.iter().map(|(n, _)| *n).collect();
    assert_eq!(order, ["first", "second", "third"]);
}

#[tokio::test]
async fn cancelling_queued_and_running_requests_frees_their_places() {
    let s = Server::start(Opts {
        parallel: 1,
        ..Opts::default()
    });
    let mut running = hold_a_sequence(&s).await;
    // Read one chunk so the generation is known to be under way.
    assert!(running.chunk().await.unwrap().is_some());
    s.wait_for("active_requests", 1, SETTLE).await;
    let queued = hold_a_sequence(&s).await;
    s.wait_for("queued_requests", 1, SETTLE).await;

    // The queued client hangs up: it leaves the queue; the running stream goes on.
    drop(queued);
    s.wait_for("queued_requests", 0, SETTLE).await;
    assert_eq!(s.performance().await["active_requests"], 1);
    assert!(running.chunk().await.unwrap().is_some());
    assert_eq!(s.performance().await["cancelled_requests_total"], 1);

    // The running client hangs up: its sequence is free for the next request at once.
    drop(running);
    s.wait_for("active_requests", 0, SETTLE).await;
    assert_eq!(s.performance().await["cancelled_requests_total"], 2);
    let (code, v) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 3}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

/// Non-streaming greedy chat: (text, usage).
async fn chat_once(s: &Server, system: &str, user: &str) -> (String, Value) {
    let (code, v) = s
        .post("/v1/chat/completions", &chat(system, user, 12, false))
        .await;
    assert_eq!(code, 200, "{v}");
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["usage"].clone(),
    )
}

fn cached(usage: &Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn shared_prefix_is_copied_between_sequences_and_evicted_lru() {
    let s = Server::start(Opts {
        parallel: 2,
        ..Opts::default()
    });
    let shared = system_prompt("Orion", 300);
    let mut all = Vec::new();

    // Bot 1 computes the shared system prompt.
    let (_, u1) = chat_once(&s, &shared, "What is a river?").await;
    assert_eq!(cached(&u1), 0, "{u1}");
    all.push(u1);
    // Bot 2 sends the same system prompt with its own question: it lands in the other
    // sequence (bot 1's conversation stays cached) and copies the prefix.
    let (copied, u2) = chat_once(&s, &shared, "Describe a lantern.").await;
    let prompt = u2["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 300, "{u2}");
    assert!(
        cached(&u2) >= prompt - 16 && cached(&u2) < prompt,
        "expected the system prompt from the cache: {u2}"
    );
    all.push(u2.clone());
    // Two unrelated prompts evict both cached prefixes, least recently used first.
    for who in ["Vega", "Lyra"] {
        let (_, u) = chat_once(&s, &system_prompt(who, 40), "Hello there.").await;
        assert!(cached(&u) < 8, "{u}");
        all.push(u);
    }
    // Bot 2's question again, now computed from scratch: the copied prefix gave the same answer.
    let (cold, u5) = chat_once(&s, &shared, "Describe a lantern.").await;
    assert!(cached(&u5) < 8, "prefix should have been evicted: {u5}");
    // A wrong copy would change the answer from its first words (exact equality is not
    // promised: the two prefills ran in differently sized batches, see the test above).
    assert_eq!(
        opening_words(&copied, 3),
        opening_words(&cold, 3),
        "a copied prefix changed the answer"
    );
    all.push(u5);

    // The status page's hit ratio is exactly what the usage fields said.
    let sum = |k: fn(&Value) -> u64| all.iter().map(k).sum::<u64>() as f64;
    let ratio = sum(cached) / sum(|u| u["prompt_tokens"].as_u64().unwrap());
    let p = s.performance().await;
    let reported = p["cache_hit_ratio"].as_f64().unwrap();
    assert!(
        (reported - ratio).abs() < 1e-9,
        "{reported} vs {ratio}: {p}"
    );
    // Totals are exact; the rolling rates cover the last seconds only, so on a slow or busy
    // machine the prompts may already have left the window: they are checked as numbers.
    assert_eq!(
        p["prompt_tokens_total"].as_u64().unwrap() as f64,
        sum(|u| u["prompt_tokens"].as_u64().unwrap()),
        "{p}"
    );
    assert_eq!(
        p["completion_tokens_total"].as_u64().unwrap() as f64,
        sum(|u| u["completion_tokens"].as_u64().unwrap()),
        "{p}"
    );
    assert!(
        p["prompt_tokens_per_second"].as_f64().unwrap() >= 0.0,
        "{p}"
    );
    assert!(
        p["decode_tokens_per_second"].as_f64().unwrap() >= 0.0,
        "{p}"
    );
    assert!(
        p["p95_time_to_first_token_ms"].as_f64().unwrap() > 0.0,
        "{p}"
    );
}

#[tokio::test]
async fn simultaneous_requests_compute_a_shared_prompt_once() {
    let s = Server::start(Opts {
        parallel: 4,
        ..Opts::default()
    });
    let shared = system_prompt("Sirius", 300);
    let users = ["One?", "Two?", "Three?", "Four?"];
    let results = futures_util::future::join_all(users.iter().map(|u| async {
        let r = s
            .send("/v1/chat/completions", &chat(&shared, u, 4, true))
            .await;
        read_stream(r).await
    }))
    .await;
    let prompts: u64 = results
        .iter()
        .map(|(_, u)| u["prompt_tokens"].as_u64().unwrap())
        .sum();
    let hits: Vec<u64> = results.iter().map(|(_, u)| cached(u)).collect();
    // One request computed the system prompt; the three others copied it.
    assert_eq!(hits.iter().filter(|&&c| c == 0).count(), 1, "{hits:?}");
    assert_eq!(hits.iter().filter(|&&c| c > 300).count(), 3, "{hits:?}");
    let computed = prompts - hits.iter().sum::<u64>();
    assert!(
        computed < prompts / 3,
        "{computed} of {prompts} prompt tokens computed"
    );
}

#[tokio::test]
async fn keep_alive_comments_flow_during_a_long_prefill() {
    let s = Server::start(Opts {
        parallel: 1,
        context: 2048,
        extra_args: vec!["--sse-keepalive-seconds".into(), "0.05".into()],
        ..Opts::default()
    });
    let prompt = "lantern river ".repeat(450);
    let r = s
        .send(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let mut stream = r.bytes_stream();
    let mut body = String::new();
    while let Some(chunk) = stream.next().await {
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let prefill = started.elapsed();
    let first = body.find("data: ").expect("some data");
    let before = &body[..first];
    let comments = before.matches(": keep-alive\n\n").count();
    assert!(
        comments >= 2,
        "expected keep-alive comments before the first chunk ({prefill:?}): {before:?}"
    );
    // Comments do not disturb the OpenAI framing.
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_cached_prompt_answers_before_two_cold_prompts_that_came_first() {
    // Issue 25: a bot's retry whose prompt was all cached waited behind other bots' cold
    // prompts, because prompt chunks went to the oldest request first.
    let s = Server::start(Opts {
        parallel: 4,
        context: 6144,
        ..Opts::default()
    });
    let warm = system_prompt("the cached bot", 2400);
    let ask = |system: &str| chat(system, "Say yes.", 1, false);
    // Its prefix computed once (and how long the cached request takes alone, for the log).
    let (code, v) = s.post("/v1/chat/completions", &ask(&warm)).await;
    assert_eq!(code, 200, "{v}");
    let alone = Instant::now();
    let (code, v) = s.post("/v1/chat/completions", &ask(&warm)).await;
    assert_eq!(code, 200, "{v}");
    let idle_ms = alone.elapsed().as_millis();

    // Two cold prompts, each many steps of prefill, admitted first.
    let started = Instant::now();
    let spawn = |system: String| {
        common::spawn_timed(
            reqwest::Client::new()
                .post(s.url("/v1/chat/completions"))
                .json(&ask(&system)),
        )
    };
    let cold = [
        spawn(system_prompt("the first cold bot", 3600)),
        spawn(system_prompt("the second cold bot, another one", 3600)),
    ];
    s.wait_for("active_requests", 2, SETTLE).await;
    let cached_sent = Instant::now();
    let (code, v) = s.post("/v1/chat/completions", &ask(&warm)).await;
    let cached_done = Instant::now();
    assert_eq!(code, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached(&v["usage"]) >= prompt - 1,
        "all but the last token reused: {v}"
    );
    for c in cold {
        let (code, v, done) = c.await.unwrap();
        assert_eq!(code, 200, "{v}");
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 3000, "{v}");
        assert!(
            cached_done < done,
            "the cached request ({} ms after it was sent, {idle_ms} ms alone) ended after a \
             cold one ({} ms after they were sent)",
            (cached_done - cached_sent).as_millis(),
            (done - started).as_millis()
        );
    }
    println!(
        "cached request beside two cold prefills: {} ms (alone: {idle_ms} ms)",
        (cached_done - cached_sent).as_millis()
    );
}
