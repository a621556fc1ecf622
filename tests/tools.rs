//! Tool calls with the real instruction-tuned Qwen2.5-Coder 0.5B model: what it writes is
//! parsed into OpenAI `tool_calls`, streamed and not, and a tool result leads to an answer.

mod common;

use common::{qwen_file, sse_data, Opts, Server, QWEN};
use serde_json::{json, Value};

/// A server with Qwen loaded (and Gemma on disk beside it).
async fn qwen_server() -> Server {
    let s = Server::start(Opts {
        load_model: false,
        context: 4096,
        ..Opts::default()
    });
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    let (code, v) = s
        .post("/admin/model/load", &json!({"model_id": QWEN}))
        .await;
    assert_eq!(code, 200, "{v}");
    s
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "read_file", "description": "Read a file from disk",
         "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
        {"type": "function", "function": {"name": "list_dir", "description": "List a directory",
         "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
    ])
}

fn ask(messages: Value, stream: bool, tool_choice: &str) -> Value {
    json!({"model": QWEN, "temperature": 0, "max_tokens": 120, "messages": messages,
           "tools": tools(), "tool_choice": tool_choice, "stream": stream})
}

/// Reassembles a streamed chat answer as the SDKs' helpers do: content, and calls grouped by
/// index (ids must be non-empty and come first), with the finish reason.
fn reassemble(body: &str) -> (String, Vec<(String, String, String)>, String) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = String::new();
    for d in sse_data(body) {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                let id = tc["id"]
                    .as_str()
                    .expect("the first delta of a call has its id");
                assert!(id.starts_with("call_") && id.len() > 5, "{tc}");
                assert_eq!(tc["type"], "function");
                calls.push((
                    id.into(),
                    tc["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            }
            calls[i]
                .2
                .push_str(tc["function"]["arguments"].as_str().unwrap());
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    (content, calls, finish)
}

#[tokio::test]
async fn the_model_s_call_is_parsed_streamed_and_not_and_a_tool_result_is_answered() {
    let s = qwen_server().await;
    let user = json!([{"role": "user", "content": "read the file README.md"}]);

    // Whole: the call the model wrote (a fenced JSON block) becomes `tool_calls`.
    let (code, v) = s
        .post("/v1/chat/completions", &ask(user.clone(), false, "auto"))
        .await;
    assert_eq!(code, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "read_file");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"path": "README.md"}));
    let id = call["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("call_"), "{id}");

    // Streamed: the same call, in OpenAI's deltas, no marker in content.
    let r = s
        .send("/v1/chat/completions", &ask(user.clone(), true, "auto"))
        .await;
    assert_eq!(r.status(), 200);
    let (content, calls, finish) = reassemble(&r.text().await.unwrap());
    assert_eq!(finish, "tool_calls");
    assert!(
        !content.contains("```") && !content.contains('{'),
        "{content:?}"
    );
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1, "read_file");
    assert_eq!(calls[0].2, call["function"]["arguments"].as_str().unwrap());
    assert_ne!(calls[0].0, id, "call ids must be fresh per answer");
    // Both answers are counted as the finish the client was sent.
    let scrape = s.scrape().await;
    let counted = |reason: &str| {
        scrape.get(
            "opta_lmx_completions_total",
            &[("model", common::QWEN), ("finish_reason", reason)],
        )
    };
    assert_eq!(counted("tool_calls"), 2.0);
    assert_eq!(counted("stop"), 0.0);

    // The next turn: the call in the history, the tool's result, and a text answer.
    let mut history = user.as_array().unwrap().clone();
    history.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
    history.push(json!({"role": "tool", "tool_call_id": id,
                        "content": "# opta-lmx\nA headless inference server written in Rust."}));
    history.push(json!({"role": "user", "content": "In one sentence, what is in that file?"}));
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &ask(Value::Array(history), false, "auto"),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    println!("answer after the tool result: {text:?}");
    assert!(
        text.to_lowercase().contains("server") || text.contains("opta"),
        "{v}"
    );
}

#[tokio::test]
async fn tool_choice_none_keeps_the_tools_from_the_model() {
    let s = qwen_server().await;
    let user = json!([{"role": "user", "content": "read the file README.md"}]);
    let (code, v) = s
        .post("/v1/chat/completions", &ask(user.clone(), false, "none"))
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls");
    // The tools were not rendered: the prompt is shorter than with them.
    let none_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let (_, with) = s
        .post("/v1/chat/completions", &ask(user, false, "auto"))
        .await;
    assert!(
        with["usage"]["prompt_tokens"].as_u64().unwrap() > none_tokens + 50,
        "{with}"
    );
}
