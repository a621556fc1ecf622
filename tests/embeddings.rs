//! Embeddings and rerank through the real server: all-MiniLM-L6-v2 (a BERT GGUF made by
//! scripts/fetch-embed-model.sh) beside the chat models. The vectors themselves are checked
//! against an independent forward pass in tests/python/test_embeddings.py.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const EMBED: &str = "all-minilm-l6-v2-f32";

fn embed_file() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/test-model/{EMBED}.gguf"));
    assert!(
        p.exists(),
        "embedding model missing at {}: run scripts/fetch-embed-model.sh",
        p.display()
    );
    p
}

/// A server with Gemma (loaded), Qwen and the embedding model on disk.
fn server() -> Server {
    let s = Server::start(Opts {
        context: 1024,
        parallel: 2,
        ..Opts::default()
    });
    std::os::unix::fs::symlink(embed_file(), s.models_dir.join(format!("{EMBED}.gguf"))).unwrap();
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    s
}

fn vector(v: &Value, i: usize) -> Vec<f32> {
    v["data"][i]["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("no vector {i} in {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The entry of `list[field]` whose `key` is `id`.
fn entry(list: &Value, field: &str, key: &str, id: &str) -> Value {
    list[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {list}"))
        .iter()
        .find(|m| m[key] == id)
        .unwrap_or_else(|| panic!("no {id} in {list}"))
        .clone()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn the_lm_studio_flow_openclaw_uses_lists_loads_and_embeds() {
    let s = server();
    // 1. Discovery: OpenClaw picks the models whose type is `embedding`.
    let (code, v) = s.get("/api/v1/models").await;
    assert_eq!(code, 200, "{v}");
    let models = v["models"].as_array().unwrap();
    let embedders: Vec<&Value> = models.iter().filter(|m| m["type"] == "embedding").collect();
    assert_eq!(embedders.len(), 1, "{v}");
    let m = embedders[0];
    assert_eq!(m["key"], EMBED);
    assert_eq!(m["max_context_length"], 512);
    assert_eq!(m["loaded_instances"], json!([]));
    for chat in [MODEL, QWEN] {
        let listed = models.iter().find(|m| m["key"] == chat).unwrap();
        assert_eq!(listed["type"], "llm", "{listed}");
    }
    // 2. Load, as OpenClaw sends it.
    let (code, v) = s
        .post(
            "/api/v1/models/load",
            &json!({"model": EMBED, "context_length": 512}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "loaded");
    assert_eq!(v["type"], "embedding");
    let instance = v["instance_id"].as_str().unwrap().to_string();
    let (_, v) = s.get("/api/v1/models").await;
    let m = entry(&v, "models", "key", EMBED);
    assert_eq!(m["loaded_instances"][0]["id"], instance.as_str());
    // 3. Embeddings with the instance id.
    let (code, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": instance, "input": ["memory of a walk on the beach", "a stroll by the sea"]}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], EMBED);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["object"], "embedding");
    let (a, b) = (vector(&v, 0), vector(&v, 1));
    assert_eq!(a.len(), 384);
    assert!((dot(&a, &a) - 1.0).abs() < 1e-4, "not unit length");
    assert!(dot(&a, &b) > 0.5, "similar sentences: {}", dot(&a, &b));
    // The v0 list says `embeddings`, as LM Studio's does; /v1/models and /admin/models say
    // what each model is.
    let (_, v) = s.get("/api/v0/models").await;
    let e = entry(&v, "data", "id", EMBED);
    assert_eq!(
        (e["type"].as_str(), e["state"].as_str()),
        (Some("embeddings"), Some("loaded"))
    );
    let (_, v) = s.get("/v1/models").await;
    let kinds: Vec<(String, String)> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().into(),
                m["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&(EMBED.into(), "embedding".into())),
        "{kinds:?}"
    );
    assert!(kinds.contains(&(QWEN.into(), "llm".into())), "{kinds:?}");
    let (_, v) = s.get("/admin/models").await;
    let e = entry(&v, "models", "id", EMBED);
    assert_eq!(e["type"], "embedding", "{e}");
    // `opta-lmx models` shows the type.
    let url = format!("--url={}", s.base);
    let out =
        tokio::task::spawn_blocking(move || command().args(["models", &url]).output().unwrap())
            .await
            .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().next().is_some_and(|l| l.contains("models in")),
        "{text}"
    );
    let header = text.lines().find(|l| l.starts_with("MODEL")).expect(&text);
    assert!(header.contains("TYPE"), "{header}");
    let row = text.lines().find(|l| l.starts_with(EMBED)).expect(&text);
    assert!(row.contains("embedding") && row.contains("loaded"), "{row}");
    let row = text.lines().find(|l| l.starts_with(QWEN)).expect(&text);
    assert!(row.contains(" llm "), "{row}");
    // LM Studio's own embeddings path answers the same.
    let (code, v2) = s
        .post(
            "/api/v0/embeddings",
            &json!({"model": EMBED, "input": "a stroll by the sea"}),
        )
        .await;
    assert_eq!(code, 200, "{v2}");
    assert!(dot(&vector(&v2, 0), &b) > 0.9999);
}

#[tokio::test]
async fn every_input_shape_and_option_and_every_refusal() {
    let s = server();
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": EMBED}))
        .await;
    assert_eq!(code, 200, "{v}");
    let text = "Embeddings turn text into vectors.";
    let (_, one) = s
        .post("/v1/embeddings", &json!({"model": EMBED, "input": text}))
        .await;
    let reference = vector(&one, 0);
    let tokens = one["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(one["usage"]["total_tokens"], tokens);
    // Token ids: the same tokens as a text give the same vector ("hello world" in BERT's
    // uncased vocabulary, framed by [CLS] and [SEP]).
    let (_, hello) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": "Hello world"}),
        )
        .await;
    assert_eq!(hello["usage"]["prompt_tokens"], 4, "{hello}");
    let (code, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": [101, 7592, 2088, 102]}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert!(dot(&vector(&v, 0), &vector(&hello, 0)) > 0.9999);
    let (code, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": [[101, 2023, 102], [101, 2008, 102]]}),
        )
        .await;
    assert_eq!((code, v["data"].as_array().unwrap().len()), (200, 2), "{v}");
    // base64: the same floats, little-endian.
    let (_, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": text, "encoding_format": "base64"}),
        )
        .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 384 * 4);
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, reference);
    // dimensions: the first N, unit length again.
    let (_, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": text, "dimensions": 128}),
        )
        .await;
    let short = vector(&v, 0);
    assert_eq!(short.len(), 128);
    assert!((dot(&short, &short) - 1.0).abs() < 1e-4);
    let scale = short[0] / reference[0];
    assert!((short[5] / reference[5] - scale).abs() < 1e-3);

    let refused = [
        (
            json!({"model": EMBED, "input": text, "dimensions": 385}),
            "dimensions",
        ),
        (
            json!({"model": EMBED, "input": text, "dimensions": 0}),
            "dimensions",
        ),
        (
            json!({"model": EMBED, "input": text, "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"model": EMBED, "input": ""}), "input"),
        (json!({"model": EMBED, "input": []}), "input"),
        (json!({"model": EMBED, "input": [[]]}), "input"),
        (json!({"model": EMBED, "input": [1, 999999]}), "input"),
        (json!({"model": EMBED, "input": vec!["x"; 2049]}), "input"),
        // A chat model has no embeddings; an embedding model does not chat.
        (json!({"model": MODEL, "input": text}), "model"),
    ];
    for (body, param) in refused {
        let (code, v) = s.post("/v1/embeddings", &body).await;
        assert_eq!(
            (code, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
    }
    let (code, v) = s
        .post("/v1/embeddings", &json!({"model": MODEL, "input": text}))
        .await;
    assert!(
        code == 400
            && v["error"]["message"].as_str().unwrap().contains(MODEL)
            && v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("a chat model"),
        "{v}"
    );
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": EMBED, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(EMBED) && msg.contains("an embedding model"),
        "{v}"
    );
    let (code, _) = s
        .post("/v1/completions", &json!({"model": EMBED, "prompt": "hi"}))
        .await;
    assert_eq!(code, 400);

    // Longer than the context (512): refused with the numbers, or cut when asked.
    let long = "word ".repeat(700);
    let (code, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": ["short", long]}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("input[1]") && msg.contains("702 tokens") && msg.contains("512"),
        "{msg}"
    );
    let (code, v) = s
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": long, "truncate": true}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 512);

    // Metrics count inputs and tokens.
    let text = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let inputs = text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "opta_lmx_embedding_inputs_total{{model=\"{EMBED}\"}}"
            ))
        })
        .unwrap_or_else(|| panic!("no embedding inputs in {text}"));
    assert!(inputs.ends_with(" 8"), "{inputs}"); // 1 + 1 + 1 + 2 + 1 + 1 + 1
}

#[tokio::test]
async fn the_largest_request_batches_with_small_ones_which_finish_first_and_chat_goes_on() {
    let s = server();
    for id in [EMBED] {
        let (code, v) = s.post("/admin/models/load", &json!({"model_id": id})).await;
        assert_eq!(code, 200, "{v}");
    }
    // The most inputs one request may send.
    let texts: Vec<String> = (0..2048)
        .map(|i| format!("Note {i}: the bot remembered item {} for later.", i * 7))
        .collect();
    // Singly first, then all in one request and in four at once: batching changes nothing.
    let mut single = Vec::new();
    for t in texts.iter().take(5) {
        let (_, v) = s
            .post("/v1/embeddings", &json!({"model": EMBED, "input": t}))
            .await;
        single.push(vector(&v, 0));
    }
    let big_body = json!({"model": EMBED, "input": texts});
    let big = async {
        let r = s.post("/v1/embeddings", &big_body).await;
        (r, Instant::now())
    };
    // The small requests are sent once the large one is in the engine, so they come after it.
    let started = async {
        loop {
            let (_, st) = s.get("/admin/status").await;
            let active = st["loaded_models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["id"] == EMBED)
                .map(|m| m["scheduler"]["active_sequences"].as_u64().unwrap());
            if active == Some(1) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    let started = futures_util::future::FutureExt::shared(Box::pin(started));
    let smalls = (0..4).map(|i| {
        let s = &s;
        let t = texts[i].clone();
        let started = started.clone();
        async move {
            started.await;
            let r = s
                .post("/v1/embeddings", &json!({"model": EMBED, "input": [t]}))
                .await;
            (r, Instant::now())
        }
    });
    let mut chat = json!({"model": MODEL, "max_tokens": 12, "stream": true, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]});
    chat["stream"] = json!(true);
    let stream = async {
        s.send("/v1/chat/completions", &chat)
            .await
            .text()
            .await
            .unwrap()
    };
    let (((code, v), big_done), rest, streamed) =
        tokio::join!(big, futures_util::future::join_all(smalls), stream);
    assert_eq!(
        code,
        200,
        "{}",
        &v.to_string()[..200.min(v.to_string().len())]
    );
    assert_eq!(v["data"].as_array().unwrap().len(), 2048);
    for (i, want) in single.iter().enumerate() {
        assert!(
            dot(&vector(&v, i), want) > 0.9999,
            "input {i} differs in a batch"
        );
        assert_eq!(v["data"][i]["index"], i);
    }
    // Inputs are taken round-robin across requests: the small ones ride in the first
    // batches instead of waiting behind 2,048 inputs (32 batches of 64).
    for (i, ((code, r), done)) in rest.iter().enumerate() {
        assert_eq!(*code, 200, "{r}");
        assert!(dot(&vector(r, 0), &single[i]) > 0.9999);
        assert!(
            *done < big_done,
            "small request {i} waited for the large one"
        );
    }
    let data = sse_data(&streamed);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{streamed}"
    );
    let (_, st) = s.get("/admin/status").await;
    let m = st["loaded_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == EMBED)
        .unwrap()
        .clone();
    assert_eq!(m["scheduler"]["requests_total"], 10, "{m}");
    assert_eq!(m["scheduler"]["active_sequences"], 0, "{m}");
}

#[tokio::test]
async fn rerank_with_a_chat_models_yes_no_judgement_puts_the_relevant_document_first() {
    let s = server();
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": QWEN}))
        .await;
    assert_eq!(code, 200, "{v}");
    let docs = [
        "Bananas are a good source of potassium.",
        "Paris is the capital and largest city of France.",
        "The stock market closed lower on Tuesday.",
    ];
    for path in ["/v1/rerank", "/rerank"] {
        let (code, v) = s
            .post(
                path,
                &json!({"model": QWEN, "query": "What is the capital of France?",
                        "documents": docs, "top_n": 2, "return_documents": true}),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{v}");
        assert_eq!(results[0]["index"], 1, "{v}");
        assert_eq!(results[0]["document"]["text"], docs[1]);
        let (a, b) = (
            results[0]["relevance_score"].as_f64().unwrap(),
            results[1]["relevance_score"].as_f64().unwrap(),
        );
        assert!((0.0..=1.0).contains(&a) && a > b, "{v}");
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 30);
    }
    // Documents as objects (Cohere's form); refusals.
    let (code, v) = s
        .post(
            "/v1/rerank",
            &json!({"model": QWEN, "query": "Which fruit is rich in potassium?", "documents": [{"text": docs[2]}, {"text": docs[0]}]}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"][0]["index"], 1, "{v}");
    assert!(v["results"][0].get("document").is_none());
    for (body, param) in [
        (
            json!({"model": QWEN, "query": "", "documents": ["a"]}),
            "query",
        ),
        (
            json!({"model": QWEN, "query": "q", "documents": []}),
            "documents",
        ),
        (
            json!({"model": QWEN, "query": "q", "documents": ["a"], "top_n": 0}),
            "top_n",
        ),
    ] {
        let (code, v) = s.post("/v1/rerank", &body).await;
        assert_eq!(
            (code, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
    }
    // An embedding model is not a reranker.
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": EMBED}))
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = s
        .post(
            "/v1/rerank",
            &json!({"model": EMBED, "query": "q", "documents": ["a"]}),
        )
        .await;
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("model")),
        "{v}"
    );
}

#[tokio::test]
async fn the_new_routes_take_the_api_key_like_any_v1_route() {
    let s = Server::start(Opts {
        env: vec![("OPTA_LMX_API_KEY".into(), "sk-embed".into())],
        ..Opts::default()
    });
    std::os::unix::fs::symlink(embed_file(), s.models_dir.join(format!("{EMBED}.gguf"))).unwrap();
    let client = reqwest::Client::new();
    for path in [
        "/v1/embeddings",
        "/api/v0/embeddings",
        "/v1/rerank",
        "/rerank",
    ] {
        let body = json!({"model": MODEL, "input": "x", "query": "q", "documents": ["d"]});
        let r = client.post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
        // With the key the request reaches the handler (Gemma is a chat model: a 400 that says
        // so for embeddings; rerank on a chat model runs).
        let r = client
            .post(s.url(path))
            .bearer_auth("sk-embed")
            .json(&body)
            .send()
            .await
            .unwrap();
        let want = if path.contains("rerank") { 200 } else { 400 };
        assert_eq!(
            r.status().as_u16(),
            want,
            "{path}: {}",
            r.text().await.unwrap()
        );
    }
}

#[tokio::test]
async fn an_embedding_model_evicts_and_is_evicted_like_a_chat_model() {
    // One model at a time: Gemma is loaded at start.
    let s = Server::start(Opts {
        env: vec![("OPTA_LMX_MAX_LOADED_MODELS".into(), "1".into())],
        ..Opts::default()
    });
    std::os::unix::fs::symlink(embed_file(), s.models_dir.join(format!("{EMBED}.gguf"))).unwrap();
    let loaded = |v: &Value| -> Vec<String> {
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["loaded"] == true)
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": EMBED}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!([MODEL]), "{v}");
    let (_, inv) = s.get("/admin/models").await;
    assert_eq!(loaded(&inv), vec![EMBED.to_string()]);
    let e = entry(&inv, "models", "id", EMBED);
    assert!(e["memory_bytes"].as_u64().unwrap() > 90_000_000, "{e}");
    let (code, _) = s
        .post("/v1/embeddings", &json!({"model": EMBED, "input": "kept"}))
        .await;
    assert_eq!(code, 200);
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": MODEL}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], json!([EMBED]), "{v}");
    let (code, v) = s
        .post("/v1/embeddings", &json!({"model": EMBED, "input": "gone"}))
        .await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{v}"
    );
    // Unloaded explicitly too.
    let (code, _) = s
        .post("/admin/models/load", &json!({"model_id": EMBED}))
        .await;
    assert_eq!(code, 200);
    let (code, v) = s
        .post("/admin/models/unload", &json!({"model_id": EMBED}))
        .await;
    assert_eq!(code, 200, "{v}");
    let (_, inv) = s.get("/admin/models").await;
    assert!(loaded(&inv).is_empty(), "{inv}");
}
