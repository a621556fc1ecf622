//! Hub downloads through the admin API, against a local server speaking the Hub's protocol:
//! verified installs, private and gated repositories, missing repositories and files, a
//! tampered file, a connection cut mid-file, a restart mid-download, cancelling, the disk
//! check, and the Gemma model downloaded, loaded and chatted with.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fleet::model_ids;
use common::hub::{Access, FakeFile, FakeHub, FakeRepo, HubOptions};
use common::{error_fields, no_eos, Opts, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Bytes that look like nothing in particular, `n` long.
fn noise(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn server_for(hub: &FakeHub, extra_env: &[(&str, &str)]) -> Server {
    let mut env = vec![("HF_ENDPOINT".to_string(), hub.base.clone())];
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Server::start(Opts {
        load_model: false,
        env,
        ..Opts::default()
    })
}

/// Polls a job until it leaves `downloading`, failing after `limit`.
async fn wait_job(s: &Server, job: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (code, v) = s.get(&format!("/admin/model/download/{job}")).await;
        assert_eq!(code, 200, "{v}");
        if v["state"] != "downloading" {
            return v;
        }
        assert!(Instant::now() < deadline, "job still running: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every regular file under `dir`, relative, sorted (hidden ones included).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn download_verifies_every_file_and_installs_the_set() {
    let weights = noise(3_000_000, 7);
    let readme = b"# tiny\nA test model card.\n";
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "acme/tiny-GGUF",
            vec![
                FakeFile::git("README.md", readme),
                FakeFile::lfs("tiny-Q4_K_M.gguf", weights.clone()),
                FakeFile::lfs("tiny-Q8_0.gguf", noise(1000, 1)),
            ],
        )],
        HubOptions {
            page_size: 2,
            ..HubOptions::default()
        },
    );
    let s = server_for(&hub, &[]);

    // Several GGUF models and no choice: a clear 400 listing them.
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/tiny-GGUF"}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    let (msg, _, param, _) = error_fields(&v);
    assert_eq!(param, "pattern");
    assert!(
        msg.contains("tiny-Q8_0.gguf") && msg.contains("tiny-Q4_K_M.gguf"),
        "{msg}"
    );

    let r = s
        .send(
            "/admin/model/download",
            &json!({"model_id": "acme/tiny-GGUF", "pattern": "*Q4_K_M.gguf"}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    let id = job["job_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/admin/model/download/{id}"));
    assert_eq!(job["bytes_total"], 3_000_000);
    assert_eq!(job["files"].as_array().unwrap().len(), 1);

    let done = wait_job(&s, &id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(done["bytes_done"], 3_000_000);
    assert_eq!(done["progress"], 1.0);
    assert_eq!(done["models"], json!(["acme/tiny-GGUF/tiny-Q4_K_M"]));
    let expected = hex::encode(Sha256::digest(&weights));
    assert_eq!(done["files"][0]["sha256"], expected);
    assert_eq!(done["files"][0]["verified"], true);

    // The bytes on disk are the Hub's bytes, in <models>/<org>/<repo>/, and nothing else
    // outside the hidden staging folder.
    let installed = s.models_dir.join("acme/tiny-GGUF/tiny-Q4_K_M.gguf");
    assert_eq!(std::fs::read(&installed).unwrap(), weights);
    let visible: Vec<String> = files_under(&s.models_dir)
        .into_iter()
        .filter(|p| !p.starts_with('.'))
        .collect();
    assert_eq!(
        visible,
        [
            "acme/tiny-GGUF/tiny-Q4_K_M.gguf",
            "gemma-3-270m-q4_k_m.gguf"
        ]
    );
    assert_eq!(
        files_under(&s.models_dir.join(".downloads")),
        [format!("{id}/job.json")],
        "staging keeps only the record"
    );
    assert!(model_ids(&s)
        .await
        .contains(&"acme/tiny-GGUF/tiny-Q4_K_M".to_string()));

    // The tree listing was paged (two listings, two pages each); the weights came by
    // redirect from the CDN.
    let seen = hub.seen();
    assert_eq!(seen.iter().filter(|r| r.path.contains("/tree/")).count(), 4);
    assert!(seen
        .iter()
        .any(|r| r.cdn && r.path.ends_with("tiny-Q4_K_M.gguf") && r.status == 200));

    // A small git file is checked by its git blob hash; `org/repo/file` names one file.
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/tiny-GGUF/README.md"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let done = wait_job(&s, v["job_id"].as_str().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(
        std::fs::read(s.models_dir.join("acme/tiny-GGUF/README.md")).unwrap(),
        readme
    );

    // Both jobs are listed, newest first.
    let (_, list) = s.get("/admin/model/downloads").await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&id.as_str()));
    let log = s.log_text();
    assert!(
        log.contains("download_started") && log.contains("download_completed"),
        "{log}"
    );
}

#[tokio::test]
async fn private_repo_needs_the_token_and_the_token_stays_on_the_hub() {
    let token = "hf_test_secret_9f8e7d";
    let mut private = FakeRepo::new(
        "acme/private-GGUF",
        vec![FakeFile::lfs("p-Q4_K_M.gguf", noise(200_000, 3))],
    );
    private.access = Access::Private;
    let mut gated = FakeRepo::new(
        "acme/gated-GGUF",
        vec![FakeFile::lfs("g-Q4_K_M.gguf", noise(10, 3))],
    );
    gated.access = Access::Gated;
    let hub = FakeHub::start(
        vec![private, gated],
        HubOptions {
            token: token.into(),
            ..HubOptions::default()
        },
    );

    // No token: the Hub answers 401, and the error says what to do.
    {
        let s = server_for(&hub, &[]);
        let (code, v) = s
            .post(
                "/admin/model/download",
                &json!({"model_id": "acme/private-GGUF"}),
            )
            .await;
        assert_eq!(code, 404, "{v}");
        let (msg, _, _, c) = error_fields(&v);
        assert_eq!(c, "hub_not_found");
        assert!(msg.contains("private") && msg.contains("HF_TOKEN"), "{msg}");
        assert!(hub
            .seen()
            .iter()
            .any(|r| r.status == 401 && r.authorization.is_none()));
    }

    // With HF_TOKEN: downloaded; the token went to the Hub's API but not to the CDN it
    // redirects to, and never into the log.
    let s = server_for(&hub, &[("HF_TOKEN", token)]);
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/private-GGUF"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let done = wait_job(&s, v["job_id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(done["state"], "ready", "{done}");
    let seen = hub.seen();
    let bearer = format!("Bearer {token}");
    assert!(seen
        .iter()
        .any(|r| !r.cdn && r.authorization.as_deref() == Some(bearer.as_str())));
    let cdn: Vec<_> = seen.iter().filter(|r| r.cdn).collect();
    assert!(!cdn.is_empty());
    assert!(cdn.iter().all(|r| r.authorization.is_none()), "{cdn:?}");

    // Gated: 403 from the Hub becomes a 403 naming the repository.
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/gated-GGUF"}),
        )
        .await;
    assert_eq!(code, 403, "{v}");
    let (msg, _, _, c) = error_fields(&v);
    assert_eq!(c, "hub_access_denied");
    assert!(msg.contains("acme/gated-GGUF"), "{msg}");

    assert!(!s.log_text().contains(token), "token leaked into the log");
}

#[tokio::test]
async fn bad_requests_missing_repos_unreachable_hub_and_full_disk() {
    let mut huge = FakeFile::lfs("huge-Q4_K_M.gguf", noise(10, 0));
    huge.advertised_size = Some(10_000_000_000_000_000); // 10 PB
    let hub = FakeHub::start(
        vec![
            FakeRepo::new(
                "acme/tiny-GGUF",
                vec![FakeFile::lfs("t-Q4_K_M.gguf", noise(10, 1))],
            ),
            FakeRepo::new("acme/huge-GGUF", vec![huge]),
        ],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let dl = "/admin/model/download";

    let (code, v) = s.post(dl, &json!({"model_id": "acme/nope"})).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(error_fields(&v).3, "hub_not_found");

    for bad in ["../../etc", "no-slash", "acme/tiny-GGUF/../../x"] {
        let (code, v) = s.post(dl, &json!({"model_id": bad})).await;
        assert_eq!(code, 400, "{bad}: {v}");
        assert_eq!(error_fields(&v).2, "model_id");
    }
    let (code, v) = s
        .post(
            dl,
            &json!({"model_id": "acme/tiny-GGUF", "pattern": "*Q2_K*"}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert!(error_fields(&v).0.contains("t-Q4_K_M.gguf"), "{v}");
    let (code, v) = s
        .post(
            dl,
            &json!({"model_id": "acme/tiny-GGUF", "files": ["missing.gguf"]}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = s
        .post(dl, &json!({"model_id": "acme/tiny-GGUF", "revision": "v9"}))
        .await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = s.post(dl, &json!({"model": 5})).await;
    assert_eq!(code, 400, "{v}");

    // The disk is checked before anything is fetched.
    let (code, v) = s.post(dl, &json!({"model_id": "acme/huge-GGUF"})).await;
    assert_eq!(code, 507, "{v}");
    let (msg, _, _, c) = error_fields(&v);
    assert_eq!(c, "insufficient_storage");
    assert!(msg.contains("10000000000 MB"), "{msg}");
    assert!(!hub
        .seen()
        .iter()
        .any(|r| r.path.contains("huge-Q4_K_M.gguf")));

    let (code, _) = s.get("/admin/model/download/dl-doesnotexist").await;
    assert_eq!(code, 404);

    // A Hub that does not answer at all.
    let closed = common::free_port();
    let s2 = Server::start(Opts {
        load_model: false,
        env: vec![("HF_ENDPOINT".into(), format!("http://127.0.0.1:{closed}"))],
        ..Opts::default()
    });
    let (code, v) = s2.post(dl, &json!({"model_id": "acme/tiny-GGUF"})).await;
    assert_eq!(code, 502, "{v}");
    assert_eq!(error_fields(&v).3, "hub_unreachable");
}

#[tokio::test]
async fn a_file_that_does_not_match_its_hash_leaves_nothing_behind() {
    let good = FakeFile::lfs("set-00001-of-00002.gguf", noise(500_000, 1));
    let mut bad = FakeFile::lfs("set-00002-of-00002.gguf", noise(400_000, 2));
    let advertised = hex::encode(Sha256::digest(b"what the Hub says it is"));
    bad.advertised_sha256 = Some(advertised.clone());
    let actual = bad.sha256();
    let hub = FakeHub::start(
        vec![FakeRepo::new("acme/tampered-GGUF", vec![good, bad])],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/tampered-GGUF"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let done = wait_job(&s, &id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "verification_failed", "{done}");
    assert_eq!(done["verification"]["file"], "set-00002-of-00002.gguf");
    assert_eq!(done["verification"]["algorithm"], "sha256");
    assert_eq!(done["verification"]["expected"], advertised);
    assert_eq!(done["verification"]["actual"], actual);
    assert!(done["error"].as_str().unwrap().contains(&actual), "{done}");

    // Neither shard is anywhere: not installed, not staged (only the job's record stays).
    assert!(!s.models_dir.join("acme").exists());
    assert_eq!(
        files_under(&s.models_dir.join(".downloads")),
        [format!("{id}/job.json")]
    );
    assert!(!model_ids(&s).await.iter().any(|m| m.contains("tampered")));
    let (code, v) = s
        .post(
            "/admin/model/load",
            &json!({"model_id": "acme/tampered-GGUF/set"}),
        )
        .await;
    // Not on disk: a load only offers to download it again (the coding CLI's contract).
    assert_eq!(
        (code, v["status"].as_str()),
        (200, Some("download_required")),
        "{v}"
    );
    assert!(s.log_text().contains("download_verification_failed"));
    // Counted in the metrics (every byte of both files arrived) and in the audit log, once
    // the job's task has wrapped up (just after the state the client saw).
    let want = [
        "opta_lmx_download_verification_failures_total 1",
        "opta_lmx_download_bytes_total 900000",
        "opta_lmx_downloads_total{outcome=\"verification_failed\"} 1",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = s.metrics_text().await;
        let finish: Vec<Value> = s
            .audit_lines()
            .into_iter()
            .filter(|l| l["action"] == "download_finish")
            .collect();
        let counted = want.iter().all(|w| metrics.lines().any(|l| l == *w));
        if counted && finish.len() == 1 {
            assert_eq!(finish[0]["outcome"], "verification_failed");
            assert_eq!(finish[0]["model"], "acme/tampered-GGUF");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "want {want:?} and one download_finish: {finish:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A finished job cannot be resumed or cancelled.
    let (code, v) = s
        .post(&format!("/admin/model/download/{id}/resume"), &json!({}))
        .await;
    assert_eq!(code, 409, "{v}");
}

#[tokio::test]
async fn a_cut_connection_resumes_with_a_range_request() {
    let data = noise(2_000_000, 9);
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "acme/flaky-GGUF",
            vec![FakeFile::lfs("f-Q4_K_M.gguf", data.clone())],
        )],
        HubOptions {
            cut_once: vec!["f-Q4_K_M.gguf".into()],
            ..HubOptions::default()
        },
    );
    let s = server_for(&hub, &[]);
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/flaky-GGUF"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let done = wait_job(&s, v["job_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(
        std::fs::read(s.models_dir.join("acme/flaky-GGUF/f-Q4_K_M.gguf")).unwrap(),
        data
    );
    let cdn: Vec<_> = hub.seen().into_iter().filter(|r| r.cdn).collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[0].range, None);
    let from: u64 = cdn[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("second request was not a range request: {cdn:?}"));
    assert!(from > 0 && from <= 1_000_000, "resumed from {from}");
    assert_eq!(cdn[1].status, 206);
}

#[tokio::test]
async fn a_restart_mid_download_shows_no_half_model_and_the_job_resumes() {
    let data = noise(6_000_000, 4);
    let sha = hex::encode(Sha256::digest(&data));
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "acme/slow-GGUF",
            vec![FakeFile::lfs("s-Q4_K_M.gguf", data.clone())],
        )],
        HubOptions {
            // About 4 s for the whole file.
            slow: vec![("s-Q4_K_M.gguf".into(), Duration::from_millis(40))],
            ..HubOptions::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let opts = || Opts {
        load_model: false,
        models_dir: Some(dir.path().to_path_buf()),
        env: vec![("HF_ENDPOINT".into(), hub.base.clone())],
        ..Opts::default()
    };
    let mut s = Server::start(opts());
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/slow-GGUF"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = s.get(&format!("/admin/model/download/{id}")).await;
        let done = v["bytes_done"].as_u64().unwrap();
        if done >= 2_000_000 {
            assert!(done < 6_000_000, "finished before the test could stop it");
            assert!(v["rate_bytes_per_second"].as_f64().unwrap() > 0.0, "{v}");
            assert!(v["eta_seconds"].as_f64().unwrap() > 0.0, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.kill();
    let partial = std::fs::metadata(
        dir.path()
            .join(format!(".downloads/{id}/partial/s-Q4_K_M.gguf")),
    )
    .unwrap()
    .len();
    assert!(partial > 0);

    let s = Server::start(opts());
    // Nothing half-made is visible or loadable.
    assert_eq!(model_ids(&s).await, ["gemma-3-270m-q4_k_m"]);
    assert!(!dir.path().join("acme").exists());
    let (_, list) = s.get("/admin/model/downloads").await;
    let job = &list["data"][0];
    assert_eq!(job["job_id"], id);
    assert_eq!(job["state"], "interrupted", "{job}");
    assert_eq!(job["bytes_done"].as_u64().unwrap(), partial);

    let (code, v) = s
        .post(&format!("/admin/model/download/{id}/resume"), &json!({}))
        .await;
    assert_eq!(code, 200, "{v}");
    let done = wait_job(&s, &id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(done["files"][0]["sha256"], sha);
    let installed = std::fs::read(dir.path().join("acme/slow-GGUF/s-Q4_K_M.gguf")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&installed)), sha);
    let resumed = hub
        .seen()
        .into_iter()
        .filter(|r| r.cdn)
        .filter_map(|r| r.range)
        .collect::<Vec<_>>();
    assert_eq!(resumed, [format!("bytes={partial}-")]);
    assert!(s.log_text().contains("download_resumed"));
}

#[tokio::test]
async fn cancelling_stops_the_transfer_and_deletes_the_partial_file() {
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "acme/slow-GGUF",
            vec![FakeFile::lfs("s-Q4_K_M.gguf", noise(4_000_000, 5))],
        )],
        HubOptions {
            slow: vec![("s-Q4_K_M.gguf".into(), Duration::from_millis(40))],
            ..HubOptions::default()
        },
    );
    let s = server_for(&hub, &[]);
    let (_, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/slow-GGUF"}),
        )
        .await;
    let id = v["job_id"].as_str().unwrap().to_string();
    // Asking again for the same files joins the running job.
    let (code, again) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/slow-GGUF"}),
        )
        .await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["job_id"], id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, v) = s.delete(&format!("/admin/model/download/{id}")).await;
    assert_eq!(code, 200, "{v}");
    let done = wait_job(&s, &id, Duration::from_secs(10)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    let staging = s.models_dir.join(".downloads").join(&id);
    let deadline = Instant::now() + Duration::from_secs(5);
    assert!(staging.join("job.json").exists());
    while staging.join("partial/s-Q4_K_M.gguf").exists() {
        assert!(Instant::now() < deadline, "partial file not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!s.models_dir.join("acme").exists());
    let (code, _) = s.delete(&format!("/admin/model/download/{id}")).await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn gemma_downloads_from_the_local_hub_verifies_loads_and_chats() {
    let gemma = std::fs::read(common::model_file()).unwrap();
    let file = FakeFile::lfs("gemma-3-270m-Q4_K_M.gguf", gemma);
    assert_eq!(
        file.sha256(),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "google/gemma-3-270m-GGUF",
            vec![
                FakeFile::git("README.md", b"gemma"),
                file,
                FakeFile::lfs("gemma-3-270m-F16.gguf", noise(100, 0)),
            ],
        )],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "google/gemma-3-270m-GGUF:Q4_K_M"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["bytes_total"], 253_113_024);
    let done = wait_job(&s, v["job_id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(done["state"], "ready", "{done}");
    let id = done["models"][0].as_str().unwrap().to_string();
    assert_eq!(id, "google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M");

    let (code, v) = s
        .post(
            "/admin/model/load",
            &json!({"model_id": id, "context": 512, "parallel": 1}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    // The short `org/repo` id works too, as the folder holds one model.
    let text = s
        .chat_text(json!({
            "model": "google/gemma-3-270m-GGUF",
            "messages": [{"role": "user", "content": "The capital of France is"}],
            "max_tokens": 8,
            "temperature": 0,
            "logit_bias": no_eos(),
        }))
        .await;
    assert!(!text.trim().is_empty());
}

#[tokio::test]
async fn the_cli_downloads_with_progress_and_deletes_with_confirmation() {
    let data = noise(300_000, 6);
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "acme/cli-GGUF",
            vec![FakeFile::lfs("c-Q4_K_M.gguf", data.clone())],
        )],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let cli = |args: &[&str]| {
        let out = common::command()
            .args(args)
            .args(["--url", &s.base])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["download", "acme/cli-GGUF:Q4_K_M"]);
    assert!(ok, "{out}{err}");
    let job: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["state"], "ready");
    assert_eq!(
        std::fs::read(s.models_dir.join("acme/cli-GGUF/c-Q4_K_M.gguf")).unwrap(),
        data
    );

    // A refusal exits non-zero with the server's message.
    let (ok, _, err) = cli(&["download", "acme/none-GGUF"]);
    assert!(!ok);
    assert!(
        err.contains("404") && err.contains("acme/none-GGUF"),
        "{err}"
    );

    let (ok, _, err) = cli(&["delete", "acme/cli-GGUF/c-Q4_K_M"]);
    assert!(!ok);
    assert!(err.contains("confirm"), "{err}");
    let (ok, out, err) = cli(&["delete", "acme/cli-GGUF/c-Q4_K_M", "--yes"]);
    assert!(ok, "{out}{err}");
    assert!(!s.models_dir.join("acme").exists());
    let (ok, out, _) = cli(&["downloads"]);
    assert!(ok);
    assert!(out.contains(job["job_id"].as_str().unwrap()));
}

#[tokio::test]
async fn the_coding_cli_loads_a_hub_model_by_downloading_it_and_watches_the_progress() {
    let gemma = std::fs::read(common::model_file()).unwrap();
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "google/gemma-3-270m-GGUF",
            vec![
                FakeFile::git("README.md", b"gemma"),
                FakeFile::lfs("gemma-3-270m-Q4_K_M.gguf", gemma),
            ],
        )],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    // `download` in the first Opta-LMX's shape: repo_id and huggingface_hub patterns.
    let (code, v) = s
        .post(
            "/admin/models/download",
            &json!({"repo_id": "google/gemma-3-270m-GGUF", "allow_patterns": ["*.md"]}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["repo_id"], "google/gemma-3-270m-GGUF");
    assert_eq!(v["status"], "downloading");
    assert_eq!(v["bytes_total"], 5, "only README.md: {v}");
    let readme_job = v["download_id"].as_str().unwrap().to_string();
    assert_eq!(
        wait_job(&s, &readme_job, Duration::from_secs(60)).await["state"],
        "ready"
    );

    // The load the CLI sends for a model it does not have: it downloads, then loads.
    let (code, v) = s
        .post(
            "/admin/models/load",
            &json!({"model_id": "google/gemma-3-270m-GGUF", "auto_download": true}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], "downloading");
    let job = v["download_id"].as_str().unwrap().to_string();

    // Progress as server-sent events until the job ends; the last one says how.
    let body = reqwest::Client::new()
        .get(s.url(&format!("/admin/models/download/{job}/progress")))
        .send()
        .await
        .unwrap();
    assert_eq!(body.headers()["content-type"], "text/event-stream");
    let events: Vec<Value> = common::sse_data(&body.text().await.unwrap())
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = events.last().expect("at least one event");
    assert_eq!(last["status"], "ready", "{last}");
    assert_eq!(last["download_id"], job.as_str());
    assert_eq!(last["bytes_done"], 253_113_024);
    let done: Vec<u64> = events
        .iter()
        .map(|e| e["bytes_done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");

    // The CLI polls /admin/models until the model is in `loaded`.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = s.get("/admin/models").await;
        let ids: Vec<&str> = v["loaded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        if ids == ["google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M"] {
            break;
        }
        assert!(Instant::now() < deadline, "not loaded: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _) = s
        .get(&format!("/admin/models/download/{job}/progress"))
        .await;
    assert_eq!(code, 200, "a finished job's progress is its final state");
    let (code, _) = s.get("/admin/models/download/nope/progress").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn an_mlx_repository_downloads_whole_and_verified_and_is_listed_as_mlx() {
    let config = br#"{"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "vocab_size": 100, "quantization": {"group_size": 64, "bits": 4}}"#;
    let files = |tokenizer: FakeFile| {
        vec![
            FakeFile::git("README.md", b"an MLX model"),
            FakeFile::git("config.json", config),
            tokenizer,
            FakeFile::git("tokenizer_config.json", b"{}"),
            FakeFile::lfs("model.safetensors", noise(300_000, 7)),
        ]
    };
    let mut tampered = FakeFile::git("tokenizer.json", b"{\"model\": {}}");
    tampered.advertised_oid = Some("0".repeat(40));
    let hub = FakeHub::start(
        vec![
            FakeRepo::new(
                "mlx-community/tiny-4bit",
                files(FakeFile::git("tokenizer.json", b"{\"model\": {}}")),
            ),
            FakeRepo::new("mlx-community/bad-4bit", files(tampered)),
        ],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let (code, v) = s
        .post(
            "/admin/models/download",
            &json!({"repo_id": "mlx-community/tiny-4bit"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let mut paths: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let done = wait_job(
        &s,
        v["download_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(done["models"], json!(["mlx-community/tiny-4bit"]));
    let (_, inv) = s.get("/admin/models").await;
    let m = inv["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "mlx-community/tiny-4bit")
        .unwrap_or_else(|| panic!("{inv}"))
        .clone();
    assert_eq!(
        (m["format"].as_str(), m["quantization"].as_str()),
        (Some("mlx"), Some("4bit"))
    );
    assert_eq!(m["architecture"], "qwen2");
    assert!(!s
        .models_dir
        .join("mlx-community/tiny-4bit/README.md")
        .exists());

    // A small file whose git blob id does not match: nothing of the model is installed.
    let (code, v) = s
        .post(
            "/admin/models/download",
            &json!({"repo_id": "mlx-community/bad-4bit"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let done = wait_job(
        &s,
        v["download_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["state"], "verification_failed", "{done}");
    assert_eq!(done["verification"]["algorithm"], "git-sha1");
    assert_eq!(done["verification"]["file"], "tokenizer.json");
    assert!(!s.models_dir.join("mlx-community/bad-4bit").exists());
    assert!(!model_ids(&s).await.iter().any(|m| m.contains("bad-4bit")));
}

/// The server's view of a path inside its private mount namespace (see `small_disk`).
fn seen_by(s: &Server, path: &Path) -> std::path::PathBuf {
    Path::new(&format!("/proc/{}/root", s.pid())).join(path.strip_prefix("/").unwrap())
}

/// A server whose models folder is a `mb`-megabyte disk of its own.
fn server_on_small_disk(hub: &FakeHub, mb: u32) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(Opts {
        load_model: false,
        models_dir: Some(dir.path().to_path_buf()),
        wrap: common::small_disk(dir.path(), mb),
        env: vec![("HF_ENDPOINT".into(), hub.base.clone())],
        ..Opts::default()
    });
    (s, dir)
}

/// 40 MiB that takes a few seconds to arrive.
fn slow_big_repo(id: &str, file: &str, seed: u8) -> (FakeRepo, (String, Duration)) {
    let repo = FakeRepo::new(id, vec![FakeFile::lfs(file, noise(40 << 20, seed))]);
    (repo, (file.to_string(), Duration::from_millis(5)))
}

#[tokio::test]
async fn two_downloads_cannot_count_the_same_free_space() {
    let (a, slow_a) = slow_big_repo("acme/a-GGUF", "a-Q4_K_M.gguf", 1);
    let (b, _) = slow_big_repo("acme/b-GGUF", "b-Q4_K_M.gguf", 2);
    let hub = FakeHub::start(
        vec![a, b],
        HubOptions {
            slow: vec![slow_a],
            ..HubOptions::default()
        },
    );
    // Room for one 40 MiB download and the 64 MiB kept free, not for two.
    let (s, _dir) = server_on_small_disk(&hub, 124);
    let (code, first) = s
        .post("/admin/model/download", &json!({"model_id": "acme/a-GGUF"}))
        .await;
    assert_eq!(code, 202, "{first}");
    let (code, v) = s
        .post("/admin/model/download", &json!({"model_id": "acme/b-GGUF"}))
        .await;
    assert_eq!(code, 507, "{v}");
    let (msg, _, _, code_name) = error_fields(&v);
    assert_eq!(code_name, "insufficient_storage");
    assert!(msg.contains("held for downloads already running"), "{msg}");
    let done = wait_job(
        &s,
        first["job_id"].as_str().unwrap(),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done["state"], "ready", "{done}");
}

#[tokio::test]
async fn a_disk_that_fills_mid_download_leaves_a_true_record_and_resumes() {
    let (a, slow_a) = slow_big_repo("acme/a-GGUF", "a-Q4_K_M.gguf", 3);
    let sha = a.files[0].sha256();
    let hub = FakeHub::start(
        vec![a],
        HubOptions {
            slow: vec![slow_a],
            ..HubOptions::default()
        },
    );
    let (s, dir) = server_on_small_disk(&hub, 124);
    let (code, v) = s
        .post("/admin/model/download", &json!({"model_id": "acme/a-GGUF"}))
        .await;
    assert_eq!(code, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = s.get(&format!("/admin/model/download/{id}")).await;
        if v["bytes_done"].as_u64().unwrap() >= 1 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another program fills the disk.
    let filler = seen_by(&s, &dir.path().join("filler"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
    }
    let done = wait_job(&s, &id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "error", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("No space left"),
        "{done}"
    );
    // The record on disk says what happened, and nothing half-written is left beside it.
    let staging = seen_by(&s, &dir.path().join(format!(".downloads/{id}")));
    let record: Value =
        serde_json::from_slice(&std::fs::read(staging.join("job.json")).unwrap()).unwrap();
    assert_eq!(record["state"], "error", "{record}");
    assert!(!staging.join("job.json.tmp").exists());
    // Room again: the job resumes from its bytes and verifies.
    std::fs::remove_file(&filler).unwrap();
    let (code, v) = s
        .post(&format!("/admin/model/download/{id}/resume"), &json!({}))
        .await;
    assert_eq!(code, 200, "{v}");
    let done = wait_job(&s, &id, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(done["files"][0]["sha256"], sha);
}

#[tokio::test]
async fn repository_file_names_cannot_meet_the_staging_names() {
    let files = vec![
        FakeFile::git("x.gguf.part", b"not the model, a file of the repository"),
        FakeFile::lfs("x.gguf", noise(300_000, 4)),
        FakeFile::git("job.json", b"{\"state\": \"ready\"}"),
    ];
    let want: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| (f.path.clone(), f.data.to_vec()))
        .collect();
    let hub = FakeHub::start(
        vec![FakeRepo::new("acme/clash-GGUF", files)],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/clash-GGUF", "files": ["x.gguf.part", "x.gguf", "job.json"]}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let done = wait_job(&s, v["job_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(done["state"], "ready", "{done}");
    for (path, data) in want {
        let got = std::fs::read(s.models_dir.join("acme/clash-GGUF").join(&path)).unwrap();
        assert_eq!(got, data, "{path}");
    }
}

#[tokio::test]
async fn a_next_page_on_another_host_is_refused_and_never_gets_the_token() {
    let evil = FakeHub::start(Vec::new(), HubOptions::default());
    let port = evil.base.rsplit(':').next().unwrap().to_string();
    let repo = FakeRepo::new(
        "acme/paged-GGUF",
        vec![
            FakeFile::lfs("p-Q4_K_M.gguf", noise(10_000, 5)),
            FakeFile::git("README.md", b"readme"),
        ],
    );
    // A next page whose text starts with the Hub's own address (the user-info trick) but
    // goes to another port.
    let hub = FakeHub::start(
        vec![repo],
        HubOptions {
            token: "hf_secret_listing_token".into(),
            foreign_next: Some(format!(
                "{{hub}}@127.0.0.1:{port}/api/models/acme/paged-GGUF/tree/x?cursor=1"
            )),
            ..HubOptions::default()
        },
    );
    let s = server_for(&hub, &[("HF_TOKEN", "hf_secret_listing_token")]);
    let (code, v) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/paged-GGUF"}),
        )
        .await;
    assert_eq!(code, 502, "{v}");
    assert!(error_fields(&v).0.contains("another host"), "{v}");
    assert!(evil.seen().is_empty(), "{:?}", evil.seen());
    assert!(!hub.seen().is_empty());
}

#[tokio::test]
async fn a_download_s_progress_and_completion_arrive_as_admin_events() {
    let weights = noise(2_000_000, 3);
    let hub = FakeHub::start(
        vec![FakeRepo::new(
            "acme/evented-GGUF",
            vec![FakeFile::lfs("evented-Q4_K_M.gguf", weights)],
        )],
        HubOptions::default(),
    );
    let s = server_for(&hub, &[]);
    let mut events = common::events::EventReader::open(&s, None).await;
    let (code, job) = s
        .post(
            "/admin/model/download",
            &json!({"model_id": "acme/evented-GGUF"}),
        )
        .await;
    assert_eq!(code, 202, "{job}");
    let (done, seen) = events.until("download_completed").await;
    assert_eq!(done["data"]["download_id"], job["job_id"]);
    assert_eq!(done["data"]["repo_id"], "acme/evented-GGUF");
    assert_eq!(done["data"]["total_bytes"], 2_000_000);
    assert_eq!(done["data"]["downloaded_bytes"], 2_000_000);
    assert_eq!(
        done["data"]["models"],
        json!(["acme/evented-GGUF/evented-Q4_K_M"])
    );
    assert!(
        seen.iter()
            .all(|n| n == "download_progress" || n == "download_completed"),
        "{seen:?}"
    );
}
