//! The admin-API client behind `status`, `models`, `load` and `unload`: one request, the JSON
//! answer printed, and a non-zero exit with the server's message when it refuses.

use serde_json::Value;

use super::ClientArgs;

/// Sends one admin request and prints the answer.
pub async fn call(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<()> {
    let url = format!("{}{}", args.url.trim_end_matches('/'), path);
    let client = reqwest::Client::new();
    let mut req = client.request(method, &url);
    if let Some(key) = &args.admin_key {
        req = req.header("X-Admin-Key", key);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach opta-lmx at {}: {e}", args.url))?;
    let status = resp.status();
    let text = resp.text().await?;
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let msg = json
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| json.to_string());
        anyhow::bail!("{status}: {msg}");
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
