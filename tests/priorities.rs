//! Priorities between clients (issue 24): with every sequence busy, a waiting request with a
//! better priority (the body's `priority`, vLLM's meaning, or the `x-priority` header) is
//! admitted before older ones; equal priorities keep arrival order.

mod common;

use std::time::{Duration, Instant};

use common::{Opts, Server};
use serde_json::{json, Value};

/// A request's label, headers and extra body fields.
type Arrival = (&'static str, &'static [(&'static str, &'static str)], Value);

fn server() -> Server {
    Server::start(Opts {
        parallel: 1,
        ..Opts::default()
    })
}

/// Sends a short greedy chat with these extra headers and body fields; returns when it ended.
fn spawn_chat(
    s: &Server,
    label: &'static str,
    headers: &[(&'static str, &'static str)],
    extra: Value,
) -> tokio::task::JoinHandle<(&'static str, u16, Instant)> {
    let mut body = json!({"model": common::MODEL, "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": format!("Say {label}.")}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let mut req = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::spawn(async move {
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        let _ = r.text().await;
        (label, code, Instant::now())
    })
}

#[tokio::test]
async fn with_every_sequence_busy_the_better_priority_is_admitted_first() {
    let s = server();
    // One sequence, held by a long stream.
    let holder = tokio::spawn({
        let url = s.url("/v1/chat/completions");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&{
                    // End of text is banned: it holds the sequence until it is cancelled.
                    let mut body = common::fleet::chat(common::MODEL, 2000);
                    body["stream"] = json!(true);
                    body
                })
                .send()
                .await
                .unwrap();
            let _ = r.text().await;
        }
    });
    s.wait_for("active_requests", 1, Duration::from_secs(30))
        .await;
    // Queued in this order: two bots' ordinary requests, a cron job's low one, then the
    // person's turn (header) and an OpenClaw interactive turn (body priority).
    let mut handles = Vec::new();
    let arrivals: [Arrival; 5] = [
        ("first-bot", &[("x-client-id", "bot-1")], json!({})),
        ("second-bot", &[("x-client-id", "bot-2")], json!({})),
        ("cron", &[("x-client-id", "cron")], json!({"priority": 5})),
        ("keyboard", &[("x-priority", "high")], json!({})),
        (
            "interactive",
            &[("x-openclaw-agent-id", "main")],
            json!({"priority": -1}),
        ),
    ];
    for (i, (label, headers, extra)) in arrivals.into_iter().enumerate() {
        handles.push(spawn_chat(&s, label, headers, extra));
        s.wait_for("queued_requests", i as u64 + 1, Duration::from_secs(30))
            .await;
    }
    // The status shows each client's running and queued requests and best priority.
    // The scheduler publishes them when it next looks at its queue: wait for that state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let clients = loop {
        let (_, st) = s.get("/admin/status").await;
        let clients = st["loaded_models"][0]["clients"]
            .as_array()
            .unwrap()
            .clone();
        let queued: u64 = clients.iter().map(|c| c["queued"].as_u64().unwrap()).sum();
        if queued == 5 || Instant::now() > deadline {
            break clients;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let of = |name: &str| {
        clients
            .iter()
            .find(|c| c["client"] == name)
            .unwrap_or_else(|| panic!("no {name} in {clients:?}"))
            .clone()
    };
    assert_eq!(of("anonymous")["running"], 1, "{clients:?}"); // the long stream
    assert_eq!(of("anonymous")["queued"], 1, "{clients:?}"); // the keyboard's turn
    assert_eq!(of("anonymous")["priority"], -10, "{clients:?}");
    assert_eq!(
        (of("cron")["queued"].clone(), of("cron")["priority"].clone()),
        (json!(1), json!(5))
    );
    assert_eq!(of("main")["priority"], -1, "{clients:?}");
    assert_eq!(clients.len(), 5, "{clients:?}");
    // And `opta-lmx status` shows them: client, model, running, queued, priority.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_opta-lmx"))
        .args(["status", &format!("--url={}", s.base)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in {text}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(
        row("cron"),
        ["cron", common::MODEL, "0", "1", "5"],
        "{text}"
    );
    assert_eq!(row("anonymous")[2..], ["1", "1", "-10"], "{text}");
    // Free the sequence: the client of the long stream hangs up.
    holder.abort();
    let mut ended = Vec::new();
    for h in handles {
        let (label, code, at) = h.await.unwrap();
        assert_eq!(code, 200, "{label}");
        ended.push((at, label));
    }
    ended.sort();
    let order: Vec<&str> = ended.iter().map(|(_, l)| *l).collect();
    assert_eq!(
        order,
        ["keyboard", "interactive", "first-bot", "second-bot", "cron"]
    );
    // Metrics count requests by client.
    let text = s.metrics_text().await;
    for name in ["bot-1", "bot-2", "cron", "main", "anonymous"] {
        assert!(
            text.contains(&format!(
                "opta_lmx_client_requests_total{{client=\"{name}\"}}"
            )),
            "{name}: {text}"
        );
    }
    // The request log names each client (bounded names; none named: anonymous).
    let log = s.log_text();
    for name in ["bot-1", "bot-2", "cron", "main", "anonymous"] {
        assert!(
            log.lines()
                .any(|l| l.contains("opta_lmx::http") && l.contains(&format!("caller=\"{name}\""))),
            "{name} not in {log}"
        );
    }
}

#[tokio::test]
async fn a_priority_that_is_not_an_integer_is_a_400() {
    let s = server();
    let (code, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": common::MODEL, "max_tokens": 1, "priority": "urgent",
                "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
}

const CLIENTS: &str = "
clients:
  - name: opta-cli
    key: key-cli
    priority: -10
  - name: bot
    key: key-bot
    best_priority: 0
    max_requests: 1
";

#[tokio::test]
async fn configured_clients_have_their_keys_priorities_and_caps() {
    let s = Server::start(Opts {
        parallel: 1,
        config: CLIENTS.into(),
        ..Opts::default()
    });
    let chat = |key: &str, max_tokens: u32, extra: Value| {
        let mut body = json!({"model": common::MODEL, "max_tokens": max_tokens,
            "temperature": 0, "stream": true,
            "messages": [{"role": "user", "content": "Count to a thousand."}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        tokio::spawn(async move {
            let r = req.send().await.unwrap();
            let code = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let text = r.text().await.unwrap();
            (code, retry, text, Instant::now())
        })
    };
    // A key nobody has (or a client's removed one) is refused; each client's key works.
    let (code, _, text, _) = chat("key-gone", 1, json!({})).await.unwrap();
    assert_eq!(code, 401, "{text}");
    // The bot holds the one sequence with a long stream; a second bot request at once is a
    // 429 for the bot alone, with Retry-After.
    let holder = chat("key-bot", 2000, json!({"logit_bias": common::no_eos()}));
    s.wait_for("active_requests", 1, Duration::from_secs(30))
        .await;
    let (code, retry, text, _) = chat("key-bot", 1, json!({})).await.unwrap();
    assert_eq!(code, 429, "{text}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(text.contains("client `bot`"), "{text}");
    // The person's CLI queues behind the holder with its configured -10; a later bot request
    // could not ask for better than 0 anyway (and is capped while the holder runs).
    let cli = chat("key-cli", 2, json!({}));
    s.wait_for("queued_requests", 1, Duration::from_secs(30))
        .await;
    holder.abort();
    let (code, _, text, _) = cli.await.unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The bot's place was freed by its stream's end: it may send again.
    s.wait_for("active_requests", 0, Duration::from_secs(30))
        .await;
    let (code, _, text, _) = chat("key-bot", 1, json!({"priority": -100})).await.unwrap();
    assert_eq!(code, 200, "{text}");
    // Each key's requests are logged under its client's name.
    let log = s.log_text();
    for name in ["opta-cli", "bot"] {
        assert!(
            log.lines()
                .any(|l| l.contains("opta_lmx::http") && l.contains(&format!("caller=\"{name}\""))),
            "{name} not in {log}"
        );
    }
}

#[test]
fn a_client_listed_twice_or_with_the_admin_key_is_a_config_error() {
    for (config, key) in [
        (
            "clients:\n  - {name: a}\n  - {name: a}\n",
            "clients[1].name",
        ),
        ("clients:\n  - {name: 'a b'}\n", "clients[0].name"),
        (
            "clients:\n  - {name: a, tokens_per_minute: 0}\n",
            "clients[0].tokens_per_minute",
        ),
        (
            "server: {admin_key: k}\nclients:\n  - {name: a, key: k}\n",
            "clients[0].key",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_opta-lmx"))
            .args(["serve", "--config"])
            .arg(&path)
            .args(["--port", "0"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{config}: {err}");
    }
}

#[tokio::test]
async fn ten_thousand_client_names_keep_the_labels_bounded() {
    let s = server();
    let client = reqwest::Client::new();
    for i in 0..10_000 {
        // A cheap route that still names its client: an unknown model is a 404.
        let r = client
            .post(s.url("/v1/chat/completions"))
            .header("x-client-id", format!("made-up-{i}"))
            .json(
                &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let text = client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("opta_lmx_client_requests_total{"))
        .collect();
    // The first 64 names, then everything else as `other`.
    assert_eq!(series.len(), 65, "{series:?}");
    let other = series
        .iter()
        .find(|l| l.contains("client=\"other\""))
        .unwrap();
    assert!(other.ends_with(" 9936"), "{other}");
}

/// A two-token greedy "Hi" with this `x-priority`.
fn hi(client: &reqwest::Client, s: &Server, priority: &str) -> reqwest::RequestBuilder {
    client
        .post(s.url("/v1/chat/completions"))
        .header("x-priority", priority)
        .json(
            &json!({"model": common::MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}),
        )
}

#[tokio::test]
async fn a_low_priority_request_is_aged_up_under_constant_high_priority_load() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    // One step of aging per 100 ms: `low` (10) against fresh `high` (-10) requests catches
    // up after about two seconds of waiting.
    let s = Arc::new(Server::start(Opts {
        parallel: 1,
        env: vec![("OPTA_LMX_PRIORITY_AGING_SECONDS".into(), "0.1".into())],
        ..Opts::default()
    }));
    let low_done = Arc::new(AtomicBool::new(false));
    let highs_done = Arc::new(AtomicU32::new(0));
    const HIGHS: u32 = 150;
    // Three senders, each sending high-priority requests one after another: one runs, two
    // always wait, each fresh.
    let senders: Vec<_> = (0..3)
        .map(|_| {
            let (s, low_done, highs_done) = (s.clone(), low_done.clone(), highs_done.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !low_done.load(Ordering::SeqCst) && highs_done.load(Ordering::SeqCst) < HIGHS
                {
                    let r = hi(&client, &s, "high").send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let _ = r.text().await;
                    highs_done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // The load is on: the low one arrives into a queue that never empties.
    s.wait_for("queued_requests", 2, Duration::from_secs(30))
        .await;
    let r = hi(&reqwest::Client::new(), &s, "low").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let behind = highs_done.load(Ordering::SeqCst);
    low_done.store(true, Ordering::SeqCst);
    for t in senders {
        t.await.unwrap();
    }
    // Served while the high-priority load still ran (strict priorities would have made it
    // wait for all of it).
    assert!(
        behind < HIGHS,
        "served only after {behind} high-priority requests"
    );
    println!("the low-priority request was served after {behind} high-priority ones");
}

#[tokio::test]
async fn a_flooding_client_does_not_take_the_next_sequence_from_a_quiet_one() {
    let s = server_with_parallel(2);
    let send = |client: &'static str, n: usize, max_tokens: u32| {
        let mut body = common::fleet::chat(common::MODEL, max_tokens);
        body["messages"][0]["content"] = json!(format!("Count with me ({client} {n}): one, two,"));
        let req = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .header("x-client-id", client)
            .json(&body);
        tokio::spawn(async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let _ = r.text().await;
            Instant::now()
        })
    };
    // The flooder's four: two run, two wait. Then the quiet client's one.
    let mut flood = Vec::new();
    for n in 0..4 {
        flood.push(send("flood", n, 40));
        if n >= 2 {
            s.wait_for("queued_requests", n as u64 - 1, Duration::from_secs(30))
                .await;
        } else {
            s.wait_for("active_requests", n as u64 + 1, Duration::from_secs(30))
                .await;
        }
    }
    let quiet = send("quiet", 0, 2);
    s.wait_for("queued_requests", 3, Duration::from_secs(30))
        .await;
    let quiet_done = quiet.await.unwrap();
    let flood_done: Vec<Instant> = futures_util::future::join_all(flood)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // The first sequence to free goes to the client running none, though the flooder's third
    // request is older: the quiet one ends before the flooder's third and fourth.
    assert!(
        quiet_done < flood_done[2],
        "the quiet client waited for the flooder"
    );
    assert!(quiet_done < flood_done[3]);
}

fn server_with_parallel(parallel: u32) -> Server {
    Server::start(Opts {
        parallel,
        ..Opts::default()
    })
}

/// A long greedy stream (end of text banned) at low priority: its text (from the chunks, in
/// order), its usage, and the instant it ended. `ready` is told after `after` content chunks.
fn long_low_stream(
    s: &Server,
    ready: Option<(usize, tokio::sync::oneshot::Sender<()>)>,
) -> tokio::task::JoinHandle<(String, Value, Instant)> {
    let mut body = common::fleet::chat(common::MODEL, 96);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["priority"] = json!(10);
    let req = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-client-id", "cron")
        .json(&body);
    tokio::spawn(async move { common::read_chat_stream(req.send().await.unwrap(), ready).await })
}

#[tokio::test]
async fn a_paused_and_resumed_stream_equals_an_uninterrupted_one() {
    let s = server();
    // Uninterrupted, alone.
    let (alone, alone_usage, _) = long_low_stream(&s, None).await.unwrap();
    assert_eq!(alone_usage["completion_tokens"], 96, "{alone_usage}");
    let status = |v: &Value| v["loaded_models"][0]["scheduler"]["preemption"].clone();
    let (_, st) = s.get("/admin/status").await;
    assert_eq!(status(&st)["paused_total"], 0, "{st}");
    // Again; once it has streamed a while, the person's turn arrives with every sequence
    // (the one) busy: the low stream is paused, the turn runs, the stream resumes.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let low = long_low_stream(&s, Some((8, tx)));
    rx.await.unwrap();
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-priority", "high")
        .json(
            &json!({"model": common::MODEL, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let turn_done = Instant::now();
    let (resumed, usage, low_done) = low.await.unwrap();
    assert!(turn_done < low_done);
    // Greedy output equal, token for token, and the same usage.
    assert_eq!(resumed, alone);
    assert_eq!(usage["completion_tokens"], 96, "{usage}");
    assert_eq!(usage["prompt_tokens"], alone_usage["prompt_tokens"]);
    // It was paused once, and its resume computed nothing again: every token it had
    // (its prompt and at least the 8 streamed but the last) came back from the saved state.
    let (_, st) = s.get("/admin/status").await;
    let p = status(&st);
    assert_eq!(p["paused_total"], 1, "{p}");
    assert_eq!(p["recomputed_tokens_total"], 0, "{p}");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let restored = p["restored_tokens_total"].as_u64().unwrap();
    assert!(
        restored >= prompt + 7 && restored < prompt + 96,
        "restored {restored} of a {prompt}-token prompt"
    );
    let log = s.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("sequence paused for a higher-priority request")
                && l.contains("client=cron")
        ),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("paused sequence resumed")
            && l.contains(&format!("restored={restored}"))
            && l.contains("recomputed=0")),
        "{log}"
    );
    // And the metric says the same.
    let m = s.scrape().await;
    assert_eq!(
        m.get("opta_lmx_preemptions", &[("model", common::MODEL)]),
        1.0
    );
}

#[tokio::test]
async fn a_client_sees_its_own_place_in_the_queue() {
    let s = server();
    let send = |client: &'static str, priority: Option<i32>, max_tokens: u32| {
        let mut body = common::fleet::chat(common::MODEL, max_tokens);
        if let Some(p) = priority {
            body["priority"] = json!(p);
        }
        let req = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .header("x-client-id", client)
            .json(&body);
        tokio::spawn(async move {
            let r = req.send().await.unwrap();
            let _ = r.text().await;
        })
    };
    // The one sequence is held by a high-priority stream nothing preempts.
    let holder = send("holder", Some(-10), 2000);
    s.wait_for("active_requests", 1, Duration::from_secs(30))
        .await;
    let mut waiting = Vec::new();
    for (i, client) in ["flood", "flood", "flood", "quiet"].into_iter().enumerate() {
        waiting.push(send(client, None, 2));
        s.wait_for("queued_requests", i as u64 + 1, Duration::from_secs(30))
            .await;
    }
    let queue_of = |client: &'static str| {
        let url = s.url("/v1/queue");
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .header("x-client-id", client)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    // The scheduler publishes what it holds when it next looks at its queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    let quiet = loop {
        let q = queue_of("quiet").await;
        if q["data"].as_array().unwrap().len() == 1 || Instant::now() > deadline {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(quiet["client"], "quiet", "{quiet}");
    // The flooder's oldest goes first; then the quiet client's one, since the flooder would
    // then run one and it none; then the flooder's others.
    let places = |q: &Value| -> Vec<(String, Value)> {
        q["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["state"].as_str().unwrap().to_string(),
                    r["position"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        places(&quiet),
        [("queued".to_string(), json!(2))],
        "{quiet}"
    );
    let flood = queue_of("flood").await;
    assert_eq!(
        places(&flood),
        [
            ("queued".to_string(), json!(1)),
            ("queued".to_string(), json!(3)),
            ("queued".to_string(), json!(4))
        ],
        "{flood}"
    );
    let holder_view = queue_of("holder").await;
    assert_eq!(places(&holder_view), [("running".to_string(), Value::Null)]);
    assert_eq!(holder_view["data"][0]["priority"], -10);
    let m = &quiet["models"][0];
    assert_eq!(
        (
            m["model"].as_str(),
            m["running"].as_u64(),
            m["queued"].as_u64(),
            m["parallel"].as_u64()
        ),
        (Some(common::MODEL), Some(1), Some(4), Some(1)),
        "{quiet}"
    );
    // Someone with nothing in flight sees no requests of theirs.
    assert_eq!(queue_of("nobody").await["data"], json!([]));
    holder.abort();
    for w in waiting {
        w.await.unwrap();
    }
}

const METERED: &str = "
clients:
  - name: metered
    key: key-metered
    tokens_per_minute: 30
  - name: other
    key: key-other
";

#[tokio::test]
async fn a_client_past_its_tokens_per_minute_gets_429_and_keys_are_audited() {
    let s = Server::start(Opts {
        parallel: 1,
        config: METERED.into(),
        ..Opts::default()
    });
    let chat = |key: &'static str| {
        let req = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&common::fleet::chat(common::MODEL, 24));
        async move {
            let r = req.send().await.unwrap();
            let code = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u32>().unwrap());
            (code, retry, r.json::<Value>().await.unwrap())
        }
    };
    // The first request is served: its prompt and 24 tokens pass the 30 of the minute.
    let (code, _, v) = chat("key-metered").await;
    assert_eq!(code, 200, "{v}");
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used >= 30, "{v}");
    // The next is refused for this client, until the first ages out of the minute.
    let (code, retry, v) = chat("key-metered").await;
    assert_eq!(code, 429, "{v}");
    let retry = retry.expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    let (message, kind, _, _) = common::error_fields(&v);
    assert!(
        message.contains("client `metered`")
            && message.contains(&format!("used {used} tokens"))
            && message.contains("tokens_per_minute"),
        "{message}"
    );
    assert_eq!(kind, "rate_limit_exceeded");
    // Another client is not held by it; the metered one may still read its queue.
    let (code, _, v) = chat("key-other").await;
    assert_eq!(code, 200, "{v}");
    let r = reqwest::Client::new()
        .get(s.url("/v1/queue"))
        .bearer_auth("key-metered")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["client"], "metered");
    // A key nobody has (a removed one) is refused.
    let (code, _, _) = chat("key-removed").await;
    assert_eq!(code, 401);
    // The audit log maps each key (by fingerprint) to its client, once per key, and records
    // the refusals.
    let fp = |k: &str| {
        use sha2::Digest;
        format!(
            "sha256:{}",
            &hex::encode(sha2::Sha256::digest(k.as_bytes()))[..12]
        )
    };
    let lines = s.audit_lines();
    let used_lines: Vec<(String, String)> = lines
        .iter()
        .filter(|l| l["action"] == "client_key_used")
        .map(|l| {
            (
                l["caller"].as_str().unwrap().into(),
                l["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        used_lines,
        [
            ("metered".to_string(), fp("key-metered")),
            ("other".to_string(), fp("key-other"))
        ],
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l["action"] == "client_limited"
            && l["caller"] == "metered"
            && l["status"] == 429
            && l["key"] == fp("key-metered").as_str()),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l["action"] == "auth_failure"
            && l["key"] == fp("key-removed").as_str()
            && l.get("caller").is_none()),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_client_past_its_queued_requests_gets_429_while_others_queue() {
    let s = Server::start(Opts {
        parallel: 1,
        config: "clients:\n  - {name: queuer, key: key-q, max_queued: 1}\n  - {name: other, key: key-o}\n"
            .into(),
        ..Opts::default()
    });
    let send = |key: &'static str, max_tokens: u32| {
        let mut body = common::fleet::chat(common::MODEL, max_tokens);
        body["stream"] = json!(true);
        let req = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        tokio::spawn(async move {
            let r = req.send().await.unwrap();
            let code = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            (code, retry, r.text().await.unwrap())
        })
    };
    // The one sequence is busy with someone else's long stream.
    let holder = send("key-o", 2000);
    s.wait_for("active_requests", 1, Duration::from_secs(30))
        .await;
    // The client's first waits; its second would be its second waiting: 429 at once.
    let first = send("key-q", 2);
    s.wait_for("queued_requests", 1, Duration::from_secs(30))
        .await;
    // The scheduler publishes what it holds when it next looks: wait for that state.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = s.get("/admin/status").await;
        let clients = st["loaded_models"][0]["clients"]
            .as_array()
            .unwrap()
            .clone();
        if clients
            .iter()
            .any(|c| c["client"] == "queuer" && c["queued"] == 1)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, retry, text) = send("key-q", 2).await.unwrap();
    assert_eq!(code, 429, "{text}");
    assert_eq!(retry.unwrap(), "1");
    assert!(
        text.contains("client `queuer`") && text.contains("max_queued"),
        "{text}"
    );
    // Anyone else still queues.
    let other = send("key-o", 2);
    s.wait_for("queued_requests", 2, Duration::from_secs(30))
        .await;
    holder.abort();
    let (code, _, text) = first.await.unwrap();
    assert_eq!(code, 200, "{text}");
    assert_eq!(other.await.unwrap().0, 200);
    let m = s.scrape().await;
    assert!(m.get("opta_lmx_client_rejected_total", &[("client", "queuer")]) >= 1.0);
}
