//! Helpers for tests with several models: the Gemma model linked under several ids, and
//! short ways to load, list and inspect them.

use serde_json::{json, Value};

use super::{no_eos, Opts, Server};

/// A greedy chat request that runs to `max_tokens`.
pub fn chat(model: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Count with me: one, two,"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": no_eos(),
    })
}

/// A server with the Gemma model linked as `gemma-a`, `gemma-b` and `gemma-c` too (before it
/// starts: requests find names in an index of the folder that may be a second old).
pub fn server(extra_args: &[&str]) -> Server {
    Server::start(Opts {
        load_model: false,
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        also_link: ["gemma-a", "gemma-b", "gemma-c"].map(String::from).to_vec(),
        ..Opts::default()
    })
}

/// POSTs in a task of its own; gives status and body text.
pub fn spawn_post(url: String, body: Value) -> tokio::task::JoinHandle<(u16, String)> {
    tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// `POST /admin/model/load`.
pub async fn load(s: &Server, body: Value) -> (u16, Value) {
    s.post("/admin/model/load", &body).await
}

/// Ids of the loaded models, from `/admin/status`.
pub async fn loaded_ids(s: &Server) -> Vec<String> {
    let (_, v) = s.get("/admin/status").await;
    v["loaded_models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// The disk inventory's entries (`GET /admin/models` → `models`).
pub async fn inventory_models(s: &Server) -> Vec<Value> {
    let (code, v) = s.get("/admin/models").await;
    assert_eq!(code, 200, "{v}");
    v["models"].as_array().unwrap().clone()
}

/// One model's inventory entry.
pub async fn inventory(s: &Server, id: &str) -> Value {
    let models = inventory_models(s).await;
    models
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {models:?}"))
        .clone()
}

/// Occurrences of a structured event for a model in the server log.
pub fn events(s: &Server, event: &str, model: &str) -> usize {
    s.log_text()
        .lines()
        .filter(|l| {
            l.contains(&format!("event=\"{event}\"")) && l.contains(&format!("model={model} "))
        })
        .count()
}

/// Ids in the disk inventory.
pub async fn model_ids(s: &Server) -> Vec<String> {
    inventory_models(s)
        .await
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}
