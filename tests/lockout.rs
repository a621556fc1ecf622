//! Nobody without a key can lock everyone out (the second hardening round): made-up methods
//! and paths stay bounded in metrics and logs; HTTP/2 connections with a zero window cannot
//! hold the connection cap, plain or over TLS, and the cap's 503 is written in the
//! connection's own protocol; a grammar bomb is refused or takes only its share of the
//! model's steps; LM Studio's load and unload take the admin check; unknown model names are
//! resolved from an index, not a walk of the models folder per request.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::metrics::Scrape;
use common::{error_fields, Opts, Server, MODEL};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw request bytes on a new connection; gives the response's head (status line and
/// headers) as text.
async fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn made_up_methods_and_paths_stay_bounded_in_metrics_and_logs() {
    let s = Server::start(Opts {
        load_model: false,
        env: vec![("OPTA_LMX_METRICS_OPEN".into(), "true".into())],
        ..Opts::default()
    });
    let before = s.metrics_text().await.len();
    let log_before = s.log_text().len();
    for i in 0..50 {
        let method = format!("M{i:04}{}", "Y".repeat(10_000));
        let path = format!("/nope/{}", "p".repeat(5_000));
        let head = raw(
            s.port,
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    }
    let text = s.metrics_text().await;
    assert!(
        text.len() < before + 4_000,
        "/metrics grew from {before} to {} bytes",
        text.len()
    );
    let scrape = Scrape::parse(&text);
    let known = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "other",
    ];
    for m in scrape.label_values("opta_lmx_http_requests_total", "method") {
        assert!(known.contains(&m.as_str()), "method label {m:.40}");
    }
    let other = scrape.sum("opta_lmx_http_requests_total", &[("method", "other")]);
    assert_eq!(other, 50.0, "{text}");
    // Each request's log line is one short line, whatever the client sent.
    let log = s.log_text();
    let added = &log[log_before..];
    assert!(
        added.len() < 50 * 1_000,
        "{} bytes of log for 50 requests",
        added.len()
    );
    assert!(!added.contains(&"Y".repeat(100)));
}

#[tokio::test]
async fn lm_studio_load_and_unload_take_the_admin_check() {
    let s = Server::start(Opts {
        env: vec![
            ("OPTA_LMX_API_KEY".into(), "sk-api".into()),
            ("OPTA_LMX_ADMIN_KEY".into(), "sk-admin".into()),
        ],
        ..Opts::default()
    });
    let client = reqwest::Client::new();
    let call = |path: &str, body: Value, auth: &str| {
        let req = client.post(s.url(path)).json(&body);
        let req = if auth.is_empty() {
            req
        } else {
            req.header("authorization", auth)
        };
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let loaded = || async {
        let r = client
            .get(s.url("/v1/models"))
            .header("authorization", "Bearer sk-api")
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL && m["loaded"] == true)
    };
    // The inference key cannot unload, under either API's name for it.
    let (code, v) = call(
        "/api/v1/models/unload",
        json!({"instance_id": MODEL}),
        "Bearer sk-api",
    )
    .await;
    assert_eq!(code, 401, "{v}");
    assert!(loaded().await);
    // It may "load" a model already loaded (OpenClaw's preload), which changes nothing.
    let (code, v) = call(
        "/api/v1/models/load",
        json!({"model": MODEL}),
        "Bearer sk-api",
    )
    .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("loaded")), "{v}");
    assert_eq!(v["instance_id"], MODEL);
    // The admin key unloads, and the audit line names the model.
    let (code, v) = call(
        "/api/v1/models/unload",
        json!({"instance_id": MODEL}),
        "Bearer sk-admin",
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert!(!loaded().await);
    let line = s
        .audit_lines()
        .into_iter()
        .rev()
        .find(|l| l["action"] == "model_unload")
        .expect("an audit line");
    assert_eq!(
        (line["model"].as_str(), line["status"].as_u64()),
        (Some(MODEL), Some(200)),
        "{line}"
    );
    // A load that would change what is in memory needs the admin key.
    let (code, v) = call(
        "/api/v1/models/load",
        json!({"model": MODEL}),
        "Bearer sk-api",
    )
    .await;
    assert_eq!(code, 401, "{v}");
    assert!(!loaded().await);
    // And takes the admin load's range checks.
    let (code, v) = call(
        "/api/v1/models/load",
        json!({"model": MODEL, "context_length": 1}),
        "Bearer sk-admin",
    )
    .await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(error_fields(&v).2, "context_length", "{v}");
    assert!(!loaded().await);
    let (code, v) = call(
        "/api/v1/models/load",
        json!({"model": MODEL, "context_length": 512}),
        "Bearer sk-admin",
    )
    .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("loaded")), "{v}");
    // The Bearer scheme is case-insensitive (RFC 9110); a wrong key is still a wrong key.
    for (auth, want) in [
        ("bearer sk-api", 200),
        ("BEARER sk-api", 200),
        ("bearer sk-nope", 401),
    ] {
        let r = client
            .get(s.url("/v1/models"))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{auth}");
    }
    // Refused keys are all counted, but one client gets a bounded number of audit lines.
    let refused_before = s
        .audit_lines()
        .iter()
        .filter(|l| l["action"] == "auth_failure")
        .count();
    for _ in 0..60 {
        let r = client
            .get(s.url("/v1/models"))
            .header("authorization", "Bearer wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let lines = s.audit_lines();
    let refused = lines
        .iter()
        .filter(|l| l["action"] == "auth_failure")
        .count()
        - refused_before;
    // 20 a minute: at most two minutes' worth, however the minutes fall.
    assert!(
        (1..=40).contains(&refused),
        "{refused} refused-key lines for 61 refusals"
    );
    let (code, m) = {
        let r = client
            .get(s.url("/metrics"))
            .header("x-admin-key", "sk-admin")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(code, 200);
    let counted = Scrape::parse(&m).sum("opta_lmx_auth_failures_total", &[("scope", "api")]);
    assert!(counted >= 61.0, "auth failures counted: {counted}");
}

/// A response held open (never read) by a client that gives the server a zero window.
struct Held {
    _resp: http::Response<h2::RecvStream>,
    send: h2::client::SendRequest<bytes::Bytes>,
    /// Ends when the server closes the connection (taken by [`all_closed`]'s caller while
    /// the response and sender stay held: dropping them would end it from this side).
    conn: Option<tokio::task::JoinHandle<()>>,
}

/// An HTTP/2 request on `io` from a client that gives the server a zero window: the server can
/// send headers but no body byte. Returns once the response's headers are in (200 asserted).
async fn zero_window_request<T>(io: T, path: &str) -> Held
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(format!("http://localhost{path}"))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.expect("response headers");
    assert_eq!(resp.status(), 200);
    Held {
        _resp: resp,
        send,
        conn: Some(conn),
    }
}

/// Waits until every handle has ended (the server closed its connection), failing after `limit`.
async fn all_closed(conns: Vec<tokio::task::JoinHandle<()>>, limit: Duration) {
    let deadline = Instant::now() + limit;
    for c in conns {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, c)
            .await
            .expect("the server kept a connection that took no data past its write timeout")
            .unwrap();
    }
}

/// GETs `/healthz` over new connections until it answers 200; every other answer on the way
/// must be the cap's 503 in OpenAI's shape.
async fn served_despite(client: &reqwest::Client, url: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let r = client.get(url).send().await.expect("an answer");
        match r.status().as_u16() {
            200 => return,
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                let v: Value = r.json().await.unwrap();
                assert_eq!(error_fields(&v).3, "too_many_connections", "{v}");
            }
            other => panic!("unexpected status {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "never served beside the stalled connections"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn zero_window_http2_connections_cannot_hold_the_connection_cap() {
    let s = Server::start(Opts {
        load_model: false,
        env: vec![
            ("OPTA_LMX_MAX_CONNECTIONS".into(), "8".into()),
            ("OPTA_LMX_WRITE_TIMEOUT".into(), "3".into()),
            ("OPTA_LMX_H2_MAX_STREAMS".into(), "4".into()),
        ],
        ..Opts::default()
    });
    let mut held = Vec::new();
    for _ in 0..8 {
        let io = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        held.push(zero_window_request(io, "/openapi.json").await);
    }
    // The server bounds the streams of one connection (its SETTINGS say so, and h2 keeps to it).
    assert_eq!(held[0].send.current_max_send_streams(), 4);
    // A good client is served although all 8 places are held (a stalled connection makes
    // room once it has taken nothing for a second)...
    served_despite(
        &reqwest::Client::new(),
        &s.url("/healthz"),
        Duration::from_secs(30),
    )
    .await;
    // ...and every zero-window connection is closed by the write timeout.
    let conns = held.iter_mut().map(|h| h.conn.take().unwrap()).collect();
    all_closed(conns, Duration::from_secs(30)).await;
    drop(held);
    assert!(s.log_text().contains("took no data"), "{}", s.log_text());
}

#[tokio::test]
async fn over_tls_the_cap_answers_in_the_connections_protocol_and_stalls_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::PrivateCa::new(dir.path());
    let s = Server::start(Opts {
        load_model: false,
        extra_args: ca.server_args(),
        env: vec![
            ("OPTA_LMX_MAX_CONNECTIONS".into(), "2".into()),
            ("OPTA_LMX_WRITE_TIMEOUT".into(), "3".into()),
            ("OPTA_LMX_BODY_TIMEOUT".into(), "600".into()),
        ],
        ..Opts::default()
    });
    let base = format!("https://localhost:{}", s.port);
    let client = ca.reqwest();
    // Two connections busy on the server's side (each waits for the rest of a body): the cap
    // is full and nothing can be closed.
    let h1 = ca.connector(&[b"http/1.1"]);
    let mut busy = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        let mut tls = h1
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"m")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        busy.push(tls);
    }
    // (the cap counts them once the server has read their first bytes)
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let r = client.get(format!("{base}/healthz")).send().await;
        match r {
            Ok(r) if r.status() == 503 => break r,
            Ok(r) => assert_eq!(r.status(), 200),
            Err(e) => panic!("the refusal was not HTTPS: {e}"),
        }
        assert!(Instant::now() < deadline, "the cap never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // HTTP/1.1 over TLS: a real 503 with OpenAI's error body.
    assert_eq!(refused.headers()["retry-after"], "1");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(error_fields(&v).3, "too_many_connections", "{v}");
    // HTTP/2 by ALPN: the 503 comes as an HTTP/2 response.
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let tls = ca
        .connector(&[b"h2"])
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.expect("h2 over TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("https://localhost/healthz")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.expect("an HTTP/2 answer");
    assert_eq!(resp.status(), 503);
    drop(busy);
    // A zero-window HTTP/2 connection over TLS is closed by the write timeout, too.
    served_despite(&client, &format!("{base}/healthz"), Duration::from_secs(30)).await;
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let tls = ca
        .connector(&[b"h2"])
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut held = zero_window_request(tls, "/openapi.json").await;
    all_closed(vec![held.conn.take().unwrap()], Duration::from_secs(30)).await;
    drop(held);
    assert!(s.log_text().contains("took no data"), "{}", s.log_text());
}

/// A request for a JSON object whose one field is an enum of `n` strings.
fn enum_bomb(n: usize, stream: bool) -> Value {
    let values: Vec<String> = (0..n)
        .map(|i| format!("value-{i:06}-{}", "x".repeat(i % 7)))
        .collect();
    json!({"model": MODEL, "max_tokens": 64, "temperature": 0, "stream": stream,
           "messages": [{"role": "user", "content": "Pick one."}],
           "response_format": {"type": "json_schema", "json_schema": {"name": "pick",
               "schema": {"type": "object", "properties": {"v": {"type": "string", "enum": values}},
                          "required": ["v"]}}}})
}

/// Times one short greedy completion.
async fn short_request(s: &Server) -> Duration {
    let t = Instant::now();
    let (code, v) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Once upon a time",
                                         "max_tokens": 16, "temperature": 0}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    t.elapsed()
}

#[tokio::test]
async fn a_grammar_bomb_is_refused_or_takes_only_its_share_of_the_steps() {
    let s = Server::start(Opts {
        parallel: 4,
        ..Opts::default()
    });
    short_request(&s).await;
    let alone = short_request(&s).await.min(short_request(&s).await);
    // Too large to build: a 400 naming the limit, at once.
    let (code, v) = s
        .post("/v1/chat/completions", &enum_bomb(20_000, false))
        .await;
    assert_eq!(code, 400, "{v}");
    let (msg, _, param, _) = error_fields(&v);
    assert_eq!(param, "response_format");
    assert!(msg.contains("KB"), "{msg}");
    // Within the size limit but slow to enforce: two of them run beside a normal client.
    let stop = Arc::new(AtomicBool::new(false));
    let mut bombs = Vec::new();
    for _ in 0..2 {
        let url = s.url("/v1/chat/completions");
        bombs.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&enum_bomb(5_000, true))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let mut r = r;
            // Hold the stream open until told to go (dropping it cancels the request).
            while r.chunk().await.ok().flatten().is_some() {}
        }));
    }
    s.wait_for("active_requests", 2, Duration::from_secs(60))
        .await;
    let health = {
        let url = s.url("/healthz");
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            worst
        })
    };
    for _ in 0..3 {
        let beside = short_request(&s).await;
        // Each grammar takes about one share of a step: the others slow by a small factor,
        // never by the grammar's whole cost (before: 69 s against 0.5 s).
        assert!(
            beside < alone * 8 + Duration::from_secs(2),
            "{beside:?} beside two grammar bombs against {alone:?} alone"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let worst = health.await.unwrap();
    assert!(worst < Duration::from_secs(2), "/healthz took {worst:?}");
    // Their clients leave: the model is back to itself at once.
    for b in &bombs {
        b.abort();
    }
    s.wait_for("active_requests", 0, Duration::from_secs(30))
        .await;
    let after = short_request(&s).await;
    assert!(
        after < alone * 3 + Duration::from_secs(1),
        "{after:?} after the bombs left, {alone:?} before"
    );
}

#[tokio::test]
async fn a_grammar_too_slow_for_one_token_ends_its_request_with_a_400() {
    let s = Server::start(Opts {
        env: vec![("OPTA_LMX_GRAMMAR_MS_PER_TOKEN".into(), "50".into())],
        ..Opts::default()
    });
    // 10,000 short values: within the size limit, far more than 50 ms a token to enforce.
    let values: Vec<String> = (0..10_000).map(|i| format!("v{i:05}")).collect();
    let body = json!({"model": MODEL, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "Pick one."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p",
            "schema": {"type": "object", "properties": {"v": {"type": "string", "enum": values}},
                       "required": ["v"]}}}});
    let (code, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(code, 400, "{v}");
    let (msg, _, param, _) = error_fields(&v);
    assert_eq!(param, "response_format");
    assert!(msg.contains("grammar_ms_per_token"), "{msg}");
    // The model serves on.
    short_request(&s).await;
}

/// Counts the times the models directory itself is opened for listing, with inotify.
struct DirOpens {
    fd: i32,
}

impl DirOpens {
    fn watch(dir: &std::path::Path) -> Self {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: plain syscalls on a descriptor this struct owns.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0);
            assert!(libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN) >= 0);
            Self { fd }
        }
    }

    /// Opens of the directory since the last call.
    fn take(&self) -> usize {
        let mut buf = [0u8; 65536];
        let mut n = 0;
        loop {
            // SAFETY: reads into a buffer of the given length.
            let got = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                return n;
            }
            let mut at = 0;
            while at < got as usize {
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
                if mask & libc::IN_OPEN != 0 && len == 0 {
                    n += 1;
                }
                at += 16 + len;
            }
        }
    }
}

impl Drop for DirOpens {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor opened in `watch`.
        unsafe { libc::close(self.fd) };
    }
}

#[tokio::test]
async fn unknown_model_names_are_looked_up_in_an_index_not_a_walk_per_request() {
    let s = Server::start(Opts::default());
    for i in 0..200 {
        let d = s.models_dir.join(format!("org{i}/repo"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("README.md"), "x").unwrap();
    }
    let opens = DirOpens::watch(&s.models_dir);
    opens.take();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let url = s.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..25 {
                let r = client
                    .post(&url)
                    .json(&json!({"model": format!("no-such-model-{c}-{i}"),
                                  "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 404);
                let v: Value = r.json().await.unwrap();
                assert_eq!(error_fields(&v).3, "model_not_found", "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let walks = opens.take();
    let seconds = started.elapsed().as_secs_f64();
    // One walk a second at most (200 requests walked 200 times before).
    assert!(
        (walks as f64) <= seconds.ceil() + 1.0,
        "{walks} walks of the models folder for 200 requests in {seconds:.1} s"
    );
    // A model copied in is found within the index's age.
    s.link_model("late/late-model.gguf");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = s.get("/v1/models/late/late-model").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a new model never showed up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
