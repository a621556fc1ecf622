//! The OpenAI surface with the real Gemma model through the real server: models, chat and
//! text completions, streaming framing, sampling controls and concurrency.

mod common;

use common::{sse_data, Opts, Server, MODEL};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn greedy_chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test]
async fn models_list_and_lookup() {
    let s = Server::start(Opts::default());
    let (st, v) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{v}");
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "opta-lmx");
    assert_eq!(data[0]["loaded"], true);
    assert_eq!(data[0]["size_bytes"], 253_113_024u64);
    assert_eq!(data[0]["quantization"], "Q4_K_M");

    let (st, v) = s.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(st, 200);
    assert_eq!(v["id"], MODEL);
    let (st, v) = s.get("/v1/models/no-such-model").await;
    assert_eq!(st, 404);
    let (_, _, param, code) = common::error_fields(&v);
    assert_eq!(code, "model_not_found");
    assert_eq!(param, "model");
}

#[tokio::test]
async fn chat_non_stream_shape_and_usage() {
    let s = Server::start(Opts::default());
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &greedy_chat("Tell me about the moon.", 12),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], MODEL);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5, "{u}");
    assert!((1..=12).contains(&c), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);
    let fr = choice["finish_reason"].as_str().unwrap();
    assert!(fr == "length" && c == 12 || fr == "stop" && c < 12, "{v}");
}

#[tokio::test]
async fn max_tokens_is_honoured_exactly() {
    let s = Server::start(Opts::default());
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "The history of the Roman Empire", "max_tokens": 7, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about dragons."}], "max_completion_tokens": 9, "temperature": 0}),
        ),
    ] {
        let (st, v) = s.post(path, &body).await;
        assert_eq!(st, 200, "{v}");
        let want = body
            .get("max_tokens")
            .or(body.get("max_completion_tokens"))
            .unwrap();
        assert_eq!(&v["usage"]["completion_tokens"], want, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    }
}

#[tokio::test]
async fn stream_framing_usage_and_equality_with_non_stream() {
    let s = Server::start(Opts::default());
    let mut body = greedy_chat("Describe a forest at night.", 24);
    let whole = s.chat_text(body.clone()).await;

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.send("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // Usage: null on every chunk but the last, which has no choices.
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest.iter().all(|c| c["usage"].is_null()), "{text}");
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    let completion = last["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion));
    let finish: Vec<_> = rest
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1, "exactly one finish chunk");
    let streamed: String = rest
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!streamed.is_empty());
    assert_eq!(
        streamed, whole,
        "stream and non-stream differ at temperature 0"
    );
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_field() {
    let s = Server::start(Opts::default());
    let mut body =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0});
    let (_, whole) = s.post("/v1/completions", &body).await;
    body["stream"] = json!(true);
    let text = s.send("/v1/completions", &body).await.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c.get("usage").is_none() && c["object"] == "text_completion"));
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn stop_sequences_cut_output() {
    let s = Server::start(Opts::default());
    let base = json!({"model": MODEL, "prompt": "The history of the Roman Empire", "max_tokens": 40, "temperature": 0});
    let (_, v) = s.post("/v1/completions", &base).await;
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the greedy output.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 30, "{full:?}");
    let stop: String = chars[20..24].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    for stop_field in [json!(stop), json!(["@@never@@", stop])] {
        let mut body = base.clone();
        body["stop"] = stop_field;
        let (_, v) = s.post("/v1/completions", &body).await;
        assert_eq!(
            v["choices"][0]["text"], expected,
            "stop {stop:?} in {full:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn seed_reproducible_at_positive_temperature() {
    let s = Server::start(Opts::default());
    let body = |seed: u64| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Invent a name for a ship."}],
               "max_tokens": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0, "seed": seed})
    };
    let a = s.chat_text(body(42)).await;
    // The second request reuses the first one's cached prompt: its first token's logits must
    // still be computed exactly as when nothing was cached.
    let (code, v) = s.post("/v1/chat/completions", &body(42)).await;
    assert_eq!(code, 200, "{v}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        cached,
        prompt - 1,
        "the prompt was not served from the cache: {v}"
    );
    let b = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(a, b, "same seed, same text, cached or not");
    let mut others = Vec::new();
    for seed in [1, 2, 3] {
        others.push(s.chat_text(body(seed)).await);
    }
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds never differed: {a:?}"
    );
}

#[tokio::test]
async fn multibyte_text_streams_intact() {
    let s = Server::start(Opts::default());
    let mut body = json!({"model": MODEL, "prompt": "日本の首都は東京です。日本の有名な食べ物は", "max_tokens": 30, "temperature": 0});
    let (_, v) = s.post("/v1/completions", &body).await;
    let whole = v["choices"][0]["text"].as_str().unwrap().to_string();
    body["stream"] = json!(true);
    let r = s.send("/v1/completions", &body).await;
    // Read raw bytes: every event must be valid UTF-8 on its own.
    let mut stream = r.bytes_stream();
    let mut raw = Vec::new();
    while let Some(chunk) = stream.next().await {
        raw.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(raw).expect("stream is valid UTF-8");
    let streamed: String = sse_data(&text)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, whole);
    assert!(
        !streamed.contains('\u{fffd}'),
        "broken character in {streamed:?}"
    );
    assert!(
        !streamed.is_ascii(),
        "expected non-ASCII output: {streamed:?}"
    );
}

#[tokio::test]
async fn concurrent_clients_all_answered_independently() {
    // Batch-invariant mode, so that "independently" can mean bit for bit on every CPU (the
    // default mode's rounding depends on the batch: see tests/batching.rs).
    let s = Server::start(Opts {
        parallel: 2,
        extra_args: vec!["--batch-invariant".into()],
        ..Opts::default()
    });
    let prompts = [
        "Rivers flow",
        "The mountain",
        "In the city",
        "A small cat",
        "Stars shine",
    ];
    // Served alone first, one at a time.
    let mut alone = Vec::new();
    for p in prompts {
        let (_, v) = s
            .post(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0}),
            )
            .await;
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    // Then all at once: more clients than sequences, so some wait in the queue.
    let futures = prompts.iter().map(|p| {
        let body = json!({"model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0});
        let url = s.url("/v1/completions");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    });
    let together = futures_util::future::join_all(futures).await;
    for (i, v) in together.iter().enumerate() {
        assert_eq!(
            v["choices"][0]["text"].as_str().unwrap(),
            alone[i],
            "prompt {:?} changed under concurrency",
            prompts[i]
        );
    }
}
