//! The admin-API client behind the subcommands: one request, the JSON answer printed, and a
//! non-zero exit with the server's message when it refuses. `download` follows its job with a
//! progress bar.

use std::time::Duration;

use serde_json::Value;

use super::ClientArgs;

/// Sends one admin request and prints the answer.
pub async fn call(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<()> {
    let json = request(args, method, path, body).await?;
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// Starts a download and follows it to the end with a progress bar; fails unless it ends
/// `ready`.
pub async fn download(args: &ClientArgs, body: Value) -> anyhow::Result<()> {
    let job = request(
        args,
        reqwest::Method::POST,
        "/admin/model/download",
        Some(body),
    )
    .await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_string();
    let bar = indicatif::ProgressBar::new(job["bytes_total"].as_u64().unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(id.clone());
    let path = format!("/admin/model/download/{id}");
    let last = loop {
        let j = request(args, reqwest::Method::GET, &path, None).await?;
        bar.set_position(j["bytes_done"].as_u64().unwrap_or(0));
        if j["state"] != "downloading" {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&last)?);
    match last["state"].as_str() {
        Some("ready") => Ok(()),
        _ => anyhow::bail!(
            "download {}: {}",
            last["state"].as_str().unwrap_or("?"),
            last["error"].as_str().unwrap_or("")
        ),
    }
}

/// An HTTP client that trusts `--ca-cert` besides the system's roots.
pub fn http(args: &ClientArgs) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder();
    if let Some(path) = &args.ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read --ca-cert {}: {e}", path.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", path.display()))?;
        b = b.add_root_certificate(cert);
    }
    Ok(b.build()?)
}

/// The server's base URL joined with `path`.
pub fn url(args: &ClientArgs, path: &str) -> String {
    format!("{}{}", args.url.trim_end_matches('/'), path)
}

/// Sends one admin request; the answer's JSON, or the server's error message. The admin key
/// is sent when given, else the API key (which opens /admin when no admin key is set).
pub async fn request(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let url = url(args, path);
    let client = http(args)?;
    let mut req = client.request(method, &url);
    if let Some(key) = &args.admin_key {
        req = req.header("X-Admin-Key", key);
    } else if let Some(key) = &args.api_key {
        req = req.bearer_auth(key);
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
        anyhow::bail!("{status}: {}", error_message(&json));
    }
    Ok(json)
}

/// The message of an OpenAI error body, or the body itself.
pub fn error_message(json: &Value) -> String {
    json.pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| json.to_string())
}
