//! `opta-lmx chat`: try a model without writing code. With a prompt, one answer is streamed
//! to standard output; without one, a conversation reads lines from standard input and keeps
//! its history, so each answer sees the turns before it.

use std::io::{BufRead, IsTerminal, Write};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::client::{error_message, http, url};
use super::ChatArgs;

/// Token counts and timing of one answer.
struct Turn {
    text: String,
    usage: Option<Value>,
    seconds: f64,
}

/// Runs the one-shot or interactive chat.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let mut history: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({"role": "system", "content": system}));
    }
    if let Some(prompt) = &args.prompt {
        history.push(json!({"role": "user", "content": prompt}));
        let turn = answer(&args, &history).await?;
        finish_turn(&args, &turn);
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {}; /reset forgets, /exit leaves",
            args.model.as_deref().unwrap_or("the default model")
        );
    }
    let base = history.len();
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(base);
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": line}));
        match answer(&args, &history).await {
            Ok(turn) => {
                finish_turn(&args, &turn);
                history.push(json!({"role": "assistant", "content": turn.text}));
            }
            Err(e) => {
                // The turn is dropped so the next one does not carry a question without answer.
                history.pop();
                if !interactive {
                    return Err(e);
                }
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

fn finish_turn(args: &ChatArgs, turn: &Turn) {
    println!();
    if args.verbose {
        if let Some(u) = &turn.usage {
            let completion = u["completion_tokens"].as_u64().unwrap_or(0);
            eprintln!(
                "[prompt_tokens={} cached_tokens={} completion_tokens={} seconds={:.2} tokens_per_second={:.1}]",
                u["prompt_tokens"].as_u64().unwrap_or(0),
                u.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0),
                completion,
                turn.seconds,
                completion as f64 / turn.seconds.max(1e-9),
            );
        }
    }
}

/// Streams one answer to standard output and returns it.
async fn answer(args: &ChatArgs, messages: &[Value]) -> anyhow::Result<Turn> {
    let c = &args.client;
    let mut body = json!({
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    for (k, v) in [
        ("model", args.model.clone().map(Value::from)),
        ("max_tokens", args.max_tokens.map(Value::from)),
        ("temperature", args.temperature.map(Value::from)),
        ("seed", args.seed.map(Value::from)),
    ] {
        if let Some(v) = v {
            body[k] = v;
        }
    }
    let mut req = http(c)?.post(url(c, "/v1/chat/completions")).json(&body);
    if let Some(key) = &c.api_key {
        req = req.bearer_auth(key);
    }
    let started = std::time::Instant::now();
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach opta-lmx at {}: {e}", c.url))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        anyhow::bail!("{status}: {}", error_message(&json));
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut turn = Turn {
        text: String::new(),
        usage: None,
        seconds: 0.0,
    };
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        // SSE events end with a blank line; handle each whole one.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                if v.get("error").is_some() {
                    anyhow::bail!("the server ended the answer: {}", error_message(&v));
                }
                if let Some(t) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    print!("{t}");
                    let _ = out.flush();
                    turn.text.push_str(t);
                }
                if v.get("usage").is_some_and(|u| !u.is_null()) {
                    turn.usage = Some(v["usage"].clone());
                }
            }
        }
    }
    turn.seconds = started.elapsed().as_secs_f64();
    Ok(turn)
}
