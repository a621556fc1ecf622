//! Running opta-lmx as infrastructure, against the real server and the real Gemma model:
//! Prometheus metrics that move by exactly what traffic did, the audit log of admin actions,
//! secrets that never reach a log, HTTPS, systemd readiness and unit files, launchd plists,
//! and the CLI's tables, exit codes and chat.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::metrics::Scrape;
use common::*;
use serde_json::{json, Value};

/// Starts `opta-lmx serve` outside the common fixture, for tests that need the process to
/// themselves: an empty config, the audit file and a models folder holding Gemma, all under
/// `dir`, then `args`. Returns the child and its port.
fn serve_in(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> (std::process::Child, u16) {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let link = models.join(format!("{MODEL}.gguf"));
    if !link.exists() {
        std::os::unix::fs::symlink(model_file(), link).unwrap();
    }
    std::fs::write(dir.join("c.yaml"), "").unwrap();
    let port = free_port();
    let child = command()
        .args(["serve", "--port", &port.to_string()])
        .arg("--config")
        .arg(dir.join("c.yaml"))
        .arg("--models-dir")
        .arg(&models)
        .arg("--audit-file")
        .arg(dir.join("audit.jsonl"))
        .arg("--no-prompt-cache")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    (child, port)
}

/// Waits until the file at `path` contains `needle`.
fn wait_for_text(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "`{needle}` never appeared in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn scrape(s: &Server, key: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(s.url("/metrics"));
    if let Some(k) = key {
        req = req.header("X-Admin-Key", k);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.text().await.unwrap())
}

async fn admin(s: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    with_admin_key(s, reqwest::Method::POST, path, key, Some(&body)).await
}

#[tokio::test]
async fn metrics_count_exactly_what_the_traffic_did() {
    let s = Server::start(Opts {
        env: vec![("OPTA_LMX_ADMIN_KEY".into(), "adm-metrics".into())],
        ..Opts::default()
    });
    let (code, _) = scrape(&s, None).await;
    assert_eq!(code, 401, "/metrics needs the admin key when one is set");
    let (code, before) = scrape(&s, Some("adm-metrics")).await;
    assert_eq!(code, 200);
    let before = Scrape::parse(&before);

    // Three whole answers and one stream, with their own usage as the expected deltas.
    let mut prompt = 0.0;
    let mut generated = 0.0;
    for i in 0..3 {
        let (code, v) = s
            .post(
                "/v1/chat/completions",
                &json!({"model": MODEL, "max_tokens": 6 + i, "temperature": 0,
                        "messages": [{"role": "user", "content": format!("Count to {i}")}]}),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        prompt += v["usage"]["prompt_tokens"].as_f64().unwrap();
        generated += v["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let body = s
        .send(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 5, "stream": true,
                    "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await
        .text()
        .await
        .unwrap();
    let usage: Value = sse_data(&body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk")["usage"]
        .clone();
    prompt += usage["prompt_tokens"].as_f64().unwrap();
    generated += usage["completion_tokens"].as_f64().unwrap();
    // An unknown model: counted as a 404 with no serving model.
    let (code, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(code, 404);

    let (_, after) = scrape(&s, Some("adm-metrics")).await;
    let after = Scrape::parse(&after);
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let chat_ok = [
        ("route", "/v1/chat/completions"),
        ("method", "POST"),
        ("status", "200"),
        ("model", MODEL),
    ];
    assert_eq!(delta("opta_lmx_http_requests_total", &chat_ok), 4.0);
    assert_eq!(
        delta(
            "opta_lmx_http_requests_total",
            &[
                ("route", "/v1/chat/completions"),
                ("method", "POST"),
                ("status", "404"),
                ("model", "")
            ]
        ),
        1.0
    );
    let m = [("model", MODEL)];
    assert_eq!(delta("opta_lmx_prompt_tokens_total", &m), prompt);
    assert_eq!(delta("opta_lmx_generated_tokens_total", &m), generated);
    assert_eq!(delta("opta_lmx_time_to_first_token_seconds_count", &m), 4.0);
    assert_eq!(delta("opta_lmx_request_duration_seconds_count", &m), 4.0);
    assert_eq!(
        delta("opta_lmx_inter_token_latency_seconds_count", &m),
        4.0,
        "every answer had more than one token"
    );
    assert_eq!(after.get("opta_lmx_loaded_models", &[]), 1.0);
    assert!(after.get("opta_lmx_model_memory_bytes", &m) > 100e6);
    assert!(after.get("opta_lmx_process_resident_memory_bytes", &[]) > 0.0);
    assert!(after.get("opta_lmx_system_memory_total_bytes", &[]) > 0.0);
    assert_eq!(after.get("opta_lmx_queue_depth", &m), 0.0);
    assert_eq!(after.get("opta_lmx_active_sequences", &m), 0.0);
    assert_eq!(
        after.get(
            "opta_lmx_model_loads_total",
            &[("model", MODEL), ("outcome", "loaded")]
        ),
        1.0
    );
    for name in after.names() {
        assert!(name.starts_with("opta_lmx_"), "{name} lacks the prefix");
    }

    // A client that leaves mid-stream is a cancellation.
    let resp = s
        .send(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 400, "stream": true, "ignore_eos": true,
                    "logit_bias": no_eos(), "messages": [{"role": "user", "content": "Tell a story"}]}),
        )
        .await;
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = scrape(&s, Some("adm-metrics")).await;
        if Scrape::parse(&text).get("opta_lmx_cancelled_requests_total", &m) == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cancellation was never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Unloading shows in the gauges and the unload counter; a refused key is counted.
    let (code, v) = admin(
        &s,
        "adm-metrics",
        "/admin/models/unload",
        json!({"model_id": MODEL}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = admin(
        &s,
        "wrong-key",
        "/admin/models/unload",
        json!({"model_id": MODEL}),
    )
    .await;
    assert_eq!(code, 401);
    let (_, text) = scrape(&s, Some("adm-metrics")).await;
    let after = Scrape::parse(&text);
    assert_eq!(after.get("opta_lmx_loaded_models", &[]), 0.0);
    assert_eq!(after.get("opta_lmx_model_memory_bytes", &m), 0.0);
    assert_eq!(
        after.get(
            "opta_lmx_model_unloads_total",
            &[("model", MODEL), ("reason", "request")]
        ),
        1.0
    );
    // The unauthenticated scrape at the start, and the wrong key just now.
    assert_eq!(
        after.get("opta_lmx_auth_failures_total", &[("scope", "admin")]),
        2.0
    );
}

#[tokio::test]
async fn rejected_requests_and_evictions_are_counted_with_their_reasons() {
    let s = Server::start(Opts {
        parallel: 1,
        extra_args: vec![
            "--max-queue".into(),
            "0".into(),
            "--max-loaded-models".into(),
            "1".into(),
            "--metrics-open".into(),
        ],
        ..Opts::default()
    });
    // One long stream holds the only sequence; with no queue the next request gets 429.
    let resp = s
        .send(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 300, "stream": true, "logit_bias": no_eos(),
                    "messages": [{"role": "user", "content": "Tell a long story"}]}),
        )
        .await;
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    stream.next().await.unwrap().unwrap();
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(code, 429, "{v}");
    while stream.next().await.is_some() {}
    // Open for a scraper: no key needed.
    let (code, text) = scrape(&s, None).await;
    assert_eq!(code, 200);
    let m = Scrape::parse(&text);
    assert_eq!(
        m.get(
            "opta_lmx_rejected_requests_total",
            &[("model", MODEL), ("reason", "queue_full")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "opta_lmx_http_requests_total",
            &[
                ("route", "/v1/chat/completions"),
                ("method", "POST"),
                ("status", "429"),
                ("model", MODEL)
            ]
        ),
        1.0
    );
    // A second model past max_loaded_models evicts the first: counted with its reason.
    s.link_model("other.gguf");
    let (code, v) = s
        .post("/admin/models/load", &json!({"model_id": "other"}))
        .await;
    assert_eq!(code, 200, "{v}");
    let (_, text) = scrape(&s, None).await;
    let m = Scrape::parse(&text);
    assert_eq!(
        m.get(
            "opta_lmx_model_evictions_total",
            &[("model", MODEL), ("reason", "max_loaded_models")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "opta_lmx_model_unloads_total",
            &[("model", MODEL), ("reason", "evicted")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "opta_lmx_model_loads_total",
            &[("model", "other"), ("outcome", "loaded")]
        ),
        1.0
    );
}

/// Every admin action is one audit line naming the key by fingerprint; no key, token or
/// prompt appears in any log or in the audit file.
#[tokio::test]
async fn audit_log_records_admin_actions_and_no_secret_reaches_any_log() {
    const API_KEY: &str = "sk-planted-api-key-5f1c";
    const ADMIN_KEY: &str = "adm-planted-admin-key-9e2d";
    const HF_TOKEN: &str = "hf_plantedTokenValue7a3b";
    const PROMPT: &str = "planted-prompt-words-qz81";
    let hub = hub::FakeHub::start(
        vec![hub::FakeRepo::new(
            "acme/tiny-GGUF",
            vec![hub::FakeFile::lfs(
                "tiny-Q4_K_M.gguf",
                std::fs::read(model_file()).unwrap(),
            )],
        )],
        hub::HubOptions {
            token: HF_TOKEN.into(),
            ..hub::HubOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let json_log = dir.path().join("logs/server.jsonl");
    let s = Server::start(Opts {
        extra_args: vec![
            "--log-format".into(),
            "json".into(),
            "--log-file".into(),
            json_log.display().to_string(),
            "--log-level".into(),
            "debug".into(),
        ],
        env: vec![
            ("OPTA_LMX_API_KEY".into(), API_KEY.into()),
            ("OPTA_LMX_ADMIN_KEY".into(), ADMIN_KEY.into()),
            ("HF_TOKEN".into(), HF_TOKEN.into()),
            ("HF_ENDPOINT".into(), hub.base.clone()),
        ],
        ..Opts::default()
    });
    let client = reqwest::Client::new();
    // A chat with the planted prompt, with the right key and with a wrong one.
    let r = client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&json!({"model": MODEL, "max_tokens": 4,
                      "messages": [{"role": "user", "content": PROMPT}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .json(&json!({"messages": [{"role": "user", "content": PROMPT}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Admin actions: a refused unload, an unload, a load, a download to its end, a delete.
    let (code, _) = admin(
        &s,
        "adm-wrong",
        "/admin/models/unload",
        json!({"model_id": MODEL}),
    )
    .await;
    assert_eq!(code, 401);
    let (code, v) = admin(
        &s,
        ADMIN_KEY,
        "/admin/models/unload",
        json!({"model_id": MODEL}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = admin(
        &s,
        ADMIN_KEY,
        "/admin/models/load",
        json!({"model_id": MODEL}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = admin(
        &s,
        ADMIN_KEY,
        "/admin/models/download",
        json!({"repo_id": "acme/tiny-GGUF"}),
    )
    .await;
    assert!(code == 200 || code == 202, "{code} {v}");
    let job = v["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let installed = loop {
        let r = client
            .get(s.url(&format!("/admin/models/download/{job}")))
            .header("X-Admin-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        if v["state"] == "ready" {
            break v["models"][0].as_str().unwrap().to_string();
        }
        assert!(v["state"] == "downloading", "{v}");
        assert!(Instant::now() < deadline, "download did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = client
        .delete(s.url(&format!("/admin/models/{installed}")))
        .header("X-Admin-Key", ADMIN_KEY)
        .json(&json!({"confirm": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // The audit file: one JSON line per action, in order, keys by fingerprint.
    let fp = |k: &str| {
        use sha2::Digest;
        format!(
            "sha256:{}",
            &hex::encode(sha2::Sha256::digest(k.as_bytes()))[..12]
        )
    };
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        lines = s.audit_lines();
        if lines.iter().any(|l| l["action"] == "download_finish") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let summary: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["action"].as_str().unwrap().to_string(),
                l["outcome"].as_str().unwrap().to_string(),
                l["model"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expected = [
        ("auth_failure", "refused", ""),
        ("auth_failure", "refused", ""),
        ("model_unload", "ok", MODEL),
        ("model_load", "ok", MODEL),
        ("download_start", "ok", "acme/tiny-GGUF"),
        ("download_finish", "ready", "acme/tiny-GGUF"),
        ("model_delete", "ok", installed.as_str()),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, o, m)| (a.to_string(), o.to_string(), m.to_string()))
        .collect();
    assert_eq!(summary, expected, "{lines:#?}");
    assert_eq!(lines[0]["key"], fp("sk-wrong"), "{}", lines[0]);
    assert_eq!(lines[0]["route"], "/v1/chat/completions");
    assert_eq!(lines[1]["key"], fp("adm-wrong"));
    for l in &lines[2..] {
        if l["action"] != "download_finish" {
            assert_eq!(l["key"], fp(ADMIN_KEY), "{l}");
            assert_eq!(l["client"], "127.0.0.1", "{l}");
        }
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
    }

    // No secret and no prompt anywhere: the JSON log file, stderr, the audit file.
    let mut files = vec![
        json_log.clone(),
        s.log.clone(),
        s.models_dir.join(".audit.jsonl"),
    ];
    files.retain(|p| p.exists());
    assert_eq!(files.len(), 3, "{files:?}");
    let request_lines = std::fs::read_to_string(&json_log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("opta_lmx::http"))
        .count();
    assert!(request_lines >= 8, "one line per request: {request_lines}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for secret in [
            API_KEY,
            ADMIN_KEY,
            HF_TOKEN,
            PROMPT,
            "adm-wrong",
            "sk-wrong",
        ] {
            assert!(
                !text.contains(secret),
                "{} contains `{secret}`",
                f.display()
            );
        }
    }
    // The hub did get the token (so it really went through the server).
    assert!(hub
        .seen()
        .iter()
        .any(|r| r.authorization.as_deref() == Some(&format!("Bearer {HF_TOKEN}"))));
}

#[tokio::test]
async fn systemd_readiness_comes_after_the_port_and_the_models() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let sock_env = sock_path.display().to_string();
    let (mut child, port) = serve_in(
        dir.path(),
        &["--model", MODEL],
        &[("NOTIFY_SOCKET", &sock_env)],
        Stdio::null(),
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 from the server");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means ready: the port answers and the start-up model is loaded, no waiting.
    let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["models_loaded"], 1);
    // SIGTERM: the server says it is stopping, then exits cleanly.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
}

fn run_cli(args: &[&str]) -> std::process::Output {
    command().args(args).output().unwrap()
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "").unwrap();
    for extra in [vec![], vec!["--user"], vec!["--run-as", "root"]] {
        let mut args = vec![
            "service",
            "install",
            "--dry-run",
            "--manager",
            "systemd",
            "--config",
            config.to_str().unwrap(),
        ];
        args.extend(extra.iter());
        let out = run_cli(&args);
        assert!(out.status.success(), "{out:?}");
        let unit = String::from_utf8(out.stdout).unwrap();
        assert!(unit.contains("Type=notify"), "{unit}");
        assert!(unit.contains("Restart=on-failure"));
        assert!(unit.contains(&format!(
            "ExecStart={} serve --config {}",
            env!("CARGO_BIN_EXE_opta-lmx"),
            config.display()
        )));
        let path = dir.path().join("opta-lmx.service");
        std::fs::write(&path, &unit).unwrap();
        let verify = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian's systemd package; scripts/deps.sh installs it)");
        let stderr = String::from_utf8_lossy(&verify.stderr);
        // Warnings about this container not being booted with systemd are not about the unit.
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("opta-lmx.service"))
            .collect();
        assert!(
            verify.status.success() && complaints.is_empty(),
            "systemd-analyze verify {extra:?}: {stderr}\n{unit}"
        );
    }
}

#[test]
fn launchd_plist_is_a_valid_property_list_with_what_launchd_needs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("my config.yaml");
    let out = run_cli(&[
        "service",
        "install",
        "--dry-run",
        "--manager",
        "launchd",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let dict: plist::Dictionary = plist::from_bytes(&out.stdout).expect("XML property list");
    assert_eq!(dict["Label"].as_string(), Some("com.opta.lmx"));
    assert_eq!(dict["RunAtLoad"].as_boolean(), Some(true));
    let keep = dict["KeepAlive"].as_dictionary().unwrap();
    assert_eq!(keep["SuccessfulExit"].as_boolean(), Some(false));
    let args: Vec<&str> = dict["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            env!("CARGO_BIN_EXE_opta-lmx"),
            "serve",
            "--config",
            config.to_str().unwrap()
        ]
    );
    assert!(Path::new(args[0]).is_absolute());
    for k in ["StandardOutPath", "StandardErrorPath"] {
        assert!(
            dict[k]
                .as_string()
                .unwrap()
                .starts_with("/var/log/opta-lmx/"),
            "{k}"
        );
    }
    for k in ["SoftResourceLimits", "HardResourceLimits"] {
        let limits = dict[k].as_dictionary().unwrap();
        assert!(limits["NumberOfFiles"].as_signed_integer().unwrap() >= 10240);
    }
    let env = dict["EnvironmentVariables"].as_dictionary().unwrap();
    assert_eq!(
        env["OPTA_LMX_AUDIT_FILE"].as_string(),
        Some("/var/log/opta-lmx/audit.jsonl")
    );
    // A per-user agent logs in the user's Library, not /var/log.
    let out = run_cli(&[
        "service",
        "install",
        "--dry-run",
        "--manager",
        "launchd",
        "--user",
    ]);
    let dict: plist::Dictionary = plist::from_bytes(&out.stdout).unwrap();
    assert!(dict["StandardErrorPath"]
        .as_string()
        .unwrap()
        .ends_with("Library/Logs/opta-lmx/stderr.log"));
    // --run-as makes no sense for a per-user service.
    let out = run_cli(&["service", "install", "--dry-run", "--user", "--run-as", "x"]);
    assert!(!out.status.success());
}

/// `--url` of a test server for the CLI.
fn cli_url(s: &Server) -> String {
    format!("--url={}", s.base)
}

#[tokio::test]
async fn cli_prints_tables_json_and_fails_with_a_status() {
    let s = Server::start(Opts::default());
    let (code, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(code, 200);
    let url = cli_url(&s);
    let out = tokio::task::spawn_blocking(move || {
        (
            run_cli(&["status", &url]),
            run_cli(&["status", "--json", &url]),
            run_cli(&["models", &url]),
            run_cli(&["downloads", &url]),
            run_cli(&["load", "no-such-model", &url]),
            run_cli(&["status", "--url=http://127.0.0.1:1"]),
        )
    })
    .await
    .unwrap();
    let (status, json_status, models, downloads, bad_load, unreachable) = out;
    assert!(status.status.success(), "{status:?}");
    let text = String::from_utf8(status.stdout).unwrap();
    let header = text.lines().find(|l| l.starts_with("MODEL")).expect(&text);
    for col in ["FORMAT", "MEMORY", "OF LIMIT", "CONTEXT", "ACTIVE", "TOK/S"] {
        assert!(header.contains(col), "{header}");
    }
    let row = text.lines().find(|l| l.starts_with(MODEL)).expect(&text);
    assert!(
        row.contains("gguf") && row.contains("0/2") && row.contains("1024"),
        "{row}"
    );
    assert!(text.contains("limit 90%"), "{text}");
    let v: Value = serde_json::from_slice(&json_status.stdout).unwrap();
    assert_eq!(v["models"][0], MODEL);
    assert_eq!(v["performance"]["completions_total"], 1);
    let text = String::from_utf8(models.stdout).unwrap();
    let row = text.lines().find(|l| l.starts_with(MODEL)).expect(&text);
    assert!(row.contains("Q4_K_M") && row.contains("loaded"), "{row}");
    assert!(downloads.status.success());
    assert_eq!(String::from_utf8_lossy(&downloads.stdout), "no downloads\n");
    assert!(!bad_load.status.success());
    assert!(
        String::from_utf8_lossy(&bad_load.stderr).contains("404"),
        "{bad_load:?}"
    );
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach opta-lmx"));
}

#[tokio::test]
async fn cli_chat_streams_one_answer_and_keeps_history_in_a_conversation() {
    let s = Server::start(Opts::default());
    let url = cli_url(&s);
    let (one, convo, bad) = tokio::task::spawn_blocking(move || {
        let one = run_cli(&[
            "chat",
            &url,
            "-m",
            MODEL,
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "-v",
            "Name three colours.",
        ]);
        let mut child = command()
            .args([
                "chat",
                &url,
                "-m",
                MODEL,
                "--max-tokens",
                "10",
                "--temperature",
                "0",
                "-v",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n")
            .unwrap();
        let convo = child.wait_with_output().unwrap();
        let bad = run_cli(&["chat", &url, "-m", "no-such-model", "hi"]);
        (one, convo, bad)
    })
    .await
    .unwrap();
    assert!(one.status.success(), "{one:?}");
    assert!(!String::from_utf8_lossy(&one.stdout).trim().is_empty());
    let usage = |out: &std::process::Output| -> Vec<(u64, u64)> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("[prompt_tokens="))
            .map(|l| {
                let field = |name: &str| -> u64 {
                    l.split_whitespace()
                        .find_map(|w| w.trim_start_matches('[').strip_prefix(name))
                        .and_then(|v| v.trim_end_matches(']').parse().ok())
                        .unwrap()
                };
                (field("prompt_tokens="), field("completion_tokens="))
            })
            .collect()
    };
    assert_eq!(usage(&one).len(), 1, "{one:?}");
    assert!(convo.status.success(), "{convo:?}");
    let turns = usage(&convo);
    assert_eq!(turns.len(), 3, "{convo:?}");
    // The second turn carries the first question and answer; after /reset the third does not.
    assert!(
        turns[1].0 >= turns[0].0 + turns[0].1,
        "history was not sent: {turns:?}"
    );
    assert!(
        turns[2].0 < turns[1].0,
        "/reset kept the history: {turns:?}"
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-model"));
}

/// HTTPS with a certificate from a private CA: the CLI and a Rust client that trust the CA
/// get answers; plain HTTP on the port gets nothing.
#[tokio::test]
async fn https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::PrivateCa::new(dir.path());
    let (ca_pem, cert_pem, key_pem) = (ca.ca_pem.clone(), ca.cert_pem.clone(), ca.key_pem.clone());
    let (cert_arg, key_arg) = (
        cert_pem.display().to_string(),
        key_pem.display().to_string(),
    );
    let (mut child, port) = serve_in(
        dir.path(),
        &[
            "--model",
            MODEL,
            "--context",
            "512",
            "--tls-cert",
            &cert_arg,
            "--tls-key",
            &key_arg,
        ],
        &[],
        Stdio::null(),
    );
    let client = ca.reqwest();
    let base = format!("https://localhost:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        assert!(Instant::now() < deadline, "HTTPS server never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Without the CA the certificate is refused; plain HTTP gets no HTTP answer.
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
    assert!(reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .is_err());
    let out = tokio::task::spawn_blocking({
        let (base, ca) = (base.clone(), ca_pem.clone());
        move || {
            command()
                .args(["status", "--json", &format!("--url={base}")])
                .arg("--ca-cert")
                .arg(ca)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0], MODEL);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_non_loopback_address_without_an_admin_key_is_warned_about_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let started = |env: &[(&str, &str)]| {
        let stderr = std::fs::File::create(&log).unwrap();
        let (mut child, _) = serve_in(dir.path(), &["--host", "0.0.0.0"], env, stderr.into());
        wait_for_text(&log, "opta-lmx listening");
        let _ = child.kill();
        let _ = child.wait();
        std::fs::read_to_string(&log).unwrap()
    };
    let text = started(&[]);
    let warning = text
        .lines()
        .find(|l| l.contains("SECURITY"))
        .unwrap_or_else(|| panic!("no warning: {text}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("without an admin key"), "{warning}");
    // With an admin key there is nothing to warn about.
    assert!(!started(&[("OPTA_LMX_ADMIN_KEY", "k")]).contains("SECURITY"));
}
