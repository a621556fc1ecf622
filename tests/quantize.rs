//! `/admin/quantize` with the real quantizers: a GGUF requantised by llama.cpp in a child
//! process, verified, placed beside its source, loaded and asked a question; a cancel that
//! leaves nothing behind; bad requests and a disk that cannot hold the result refused with
//! the numbers. (The MLX path is tested in tests/mlx.rs, with the MLX test model.)

mod common;

use common::events::EventReader;
use common::{error_fields, qwen_file, Opts, Server, QWEN};
use serde_json::json;
use sha2::Digest;

fn server_with_qwen() -> Server {
    let s = Server::start(Opts {
        load_model: false,
        ..Opts::default()
    });
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    s
}

use common::{quantize_ended as ended, wait_quantize_job as wait_job};

#[tokio::test]
async fn a_gguf_becomes_a_smaller_verified_gguf_that_loads_and_answers() {
    let s = server_with_qwen();
    let mut events = EventReader::open(&s, None).await;
    let (code, start) = s
        .post(
            "/admin/quantize",
            &json!({"source_model": QWEN, "quantization": "Q4_0"}),
        )
        .await;
    assert_eq!(code, 200, "{start}");
    // The coding CLI's LmxQuantizeStartResult fields, with their types.
    for (field, string) in [
        ("job_id", true),
        ("source_model", true),
        ("output_path", true),
        ("bits", false),
        ("mode", true),
        ("status", true),
    ] {
        assert_eq!(start[field].is_string(), string, "{field}: {start}");
    }
    assert_eq!(start["source_model"], QWEN);
    let out = s.models_dir.join("qwen2.5-coder-0.5b-instruct-Q4_0.gguf");
    assert_eq!(start["output_path"], out.display().to_string());
    let id = start["job_id"].as_str().unwrap().to_string();

    let done = wait_job(&s, &id, ended).await;
    assert_eq!(done["status"], "completed", "{done}");
    let total = done["tensors_total"].as_u64().unwrap();
    assert!(total > 100, "{done}");
    assert_eq!(done["tensors_done"].as_u64(), Some(total));
    assert_eq!(done["progress_percent"], 100.0);
    for field in [
        "started_at",
        "completed_at",
        "duration_sec",
        "output_size_gb",
    ] {
        assert!(done[field].as_f64().is_some(), "{field}: {done}");
    }
    // Smaller than its source, and the hash the job reports is the file's.
    let bytes = std::fs::read(&out).unwrap();
    let source_len = std::fs::metadata(qwen_file()).unwrap().len();
    assert_eq!(done["output_size_bytes"].as_u64(), Some(bytes.len() as u64));
    assert!(
        (bytes.len() as u64) < source_len,
        "{} >= {source_len}",
        bytes.len()
    );
    assert_eq!(
        done["sha256"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    // Nothing of the work is left, and the result is listed under the id it reports.
    let work = s.models_dir.join(".quantize");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    let new_id = done["output_model_id"].as_str().unwrap();
    assert_eq!(new_id, "qwen2.5-coder-0.5b-instruct-Q4_0");
    let (_, available) = s.get("/admin/models/available").await;
    assert!(
        available
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["repo_id"] == new_id && m["size_bytes"] == bytes.len() as u64),
        "{available}"
    );
    let (code, listed) = s.get("/admin/quantize").await;
    assert_eq!(code, 200);
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["jobs"][0]["job_id"], id.as_str());

    let mut seen = Vec::new();
    while !seen.iter().any(|n| n == "quantize_completed") {
        let (name, data) = events.next().await;
        if name.starts_with("quantize_") {
            assert_eq!(data["data"]["job_id"], id.as_str(), "{name}: {data}");
            seen.push(name);
        }
    }
    assert_eq!(seen.first().map(String::as_str), Some("quantize_started"));

    // It loads and answers.
    common::loads_and_answers(&s, new_id, json!({})).await;

    // The same output again would overwrite it: refused.
    let (code, v) = s
        .post(
            "/admin/quantize",
            &json!({"source_model": QWEN, "quantization": "Q4_0"}),
        )
        .await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(error_fields(&v).3, "output_exists");
    assert_eq!(std::fs::read(&out).unwrap().len(), bytes.len());
}

#[tokio::test]
async fn a_cancelled_job_stops_and_leaves_nothing() {
    let s = server_with_qwen();
    let start = |q: &'static str| {
        let s = &s;
        async move {
            let (code, v) = s
                .post(
                    "/admin/quantize",
                    &json!({"source_model": QWEN, "quantization": q}),
                )
                .await;
            assert_eq!(code, 200, "{v}");
            v["job_id"].as_str().unwrap().to_string()
        }
    };
    let running = start("Q8_0").await;
    let waiting = start("Q5_K_M").await;
    // One at a time: the second waits its turn and, cancelled, never starts.
    let (_, v) = s.get(&format!("/admin/quantize/{waiting}")).await;
    assert_eq!(v["status"], "queued", "{v}");
    assert_eq!(v["queue_position"], 1, "{v}");
    let r = reqwest::Client::new()
        .post(s.url(&format!("/admin/quantize/{waiting}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v = wait_job(&s, &waiting, ended).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(v["started_at"].is_null(), "{v}");

    // The first is cancelled mid-way: its child is killed and its partial file removed.
    wait_job(&s, &running, |v| v["tensors_done"].as_u64() > Some(0)).await;
    let r = reqwest::Client::new()
        .post(s.url(&format!("/admin/quantize/{running}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v = wait_job(&s, &running, ended).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["cancel_requested"], true);
    assert!(v["output_size_bytes"].is_null(), "{v}");
    for name in ["Q8_0", "Q5_K_M"] {
        let out = s
            .models_dir
            .join(format!("qwen2.5-coder-0.5b-instruct-{name}.gguf"));
        assert!(!out.exists(), "{}", out.display());
    }
    assert_eq!(
        std::fs::read_dir(s.models_dir.join(".quantize"))
            .unwrap()
            .count(),
        0
    );
    // An ended job cannot be cancelled again; an unknown one is a 404.
    let (code, v) = s
        .post(&format!("/admin/quantize/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (code, error_fields(&v).3.as_str().unwrap_or("")),
        (409, "job_finished"),
        "{v}"
    );
    let (code, _) = s.post("/admin/quantize/nope/cancel", &json!({})).await;
    assert_eq!(code, 404);
    let (code, _) = s.get("/admin/quantize/nope").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_field_that_is_wrong() {
    let s = server_with_qwen();
    // A folder link inside the models directory that leads out of it.
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), s.models_dir.join("elsewhere")).unwrap();
    let cases = [
        (json!({"source_model": "no-such-model"}), 404, "model"),
        (
            json!({"source_model": QWEN, "quantization": "Q9_X"}),
            400,
            "quantization",
        ),
        (json!({"source_model": QWEN, "bits": 7}), 400, "bits"),
        (
            json!({"source_model": QWEN, "bits": 4}),
            400,
            "quantization",
        ),
        (
            json!({"source_model": QWEN, "bits": 8, "group_size": 64}),
            400,
            "group_size",
        ),
        (
            json!({"source_model": QWEN, "bits": 8, "output_path": "../escape.gguf"}),
            400,
            "output_path",
        ),
        (
            json!({"source_model": QWEN, "bits": 8, "output_path": "/etc/x.gguf"}),
            400,
            "output_path",
        ),
        (
            json!({"source_model": QWEN, "bits": 8, "output_path": ".hidden/x.gguf"}),
            400,
            "output_path",
        ),
        (
            json!({"source_model": QWEN, "bits": 8, "output_path": "elsewhere/x.gguf"}),
            400,
            "output_path",
        ),
        (
            json!({"source_model": "../../etc/passwd"}),
            400,
            "source_model",
        ),
        (json!({"source_model": QWEN, "colour": "red"}), 400, ""),
    ];
    for (body, want, param) in cases {
        let (code, v) = s.post("/admin/quantize", &body).await;
        assert_eq!(code, want, "{body}: {v}");
        if want == 400 && !param.is_empty() {
            assert_eq!(error_fields(&v).2, param, "{body}: {v}");
        }
    }
    let (_, listed) = s.get("/admin/quantize").await;
    assert_eq!(listed["count"], 0, "{listed}");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(&s.models_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".gguf")
            })
            .count(),
        2,
        "nothing was written"
    );
}

#[tokio::test]
async fn a_disk_that_cannot_hold_the_result_refuses_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(qwen_file(), dir.path().join(format!("{QWEN}.gguf"))).unwrap();
    // The source stays where the link points; the models directory is 64 MB.
    let s = Server::start(Opts {
        load_model: false,
        models_dir: Some(dir.path().to_path_buf()),
        wrap: common::small_disk(dir.path(), 64),
        ..Opts::default()
    });
    let (code, v) = s
        .post(
            "/admin/quantize",
            &json!({"source_model": QWEN, "quantization": "Q4_0"}),
        )
        .await;
    assert_eq!(code, 507, "{v}");
    let (msg, _, _, c) = error_fields(&v);
    assert_eq!(c, "insufficient_storage");
    assert!(
        msg.contains("MB are free") && msg.contains("needs about"),
        "{msg}"
    );
    let (_, listed) = s.get("/admin/quantize").await;
    assert_eq!(listed["count"], 0, "{listed}");
}
