//! The memory guard's estimate (worked out from the GGUF header before loading) against the
//! buffers llama.cpp then really allocates, as it logs them, for every KV cache type: the KV
//! cache to llama.cpp's logged precision, the whole load within 2 %.

mod common;

use common::*;
use serde_json::json;

/// llama.cpp's logged buffer sizes (MiB) in a stretch of log, by kind: model, KV, output,
/// compute.
fn buffers(log: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find(" buffer size =") else {
            continue;
        };
        let kind = line[..at].split_whitespace().last().unwrap().to_string();
        let mib: f64 = line[at + " buffer size =".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        *out.entry(kind).or_insert(0.0) += mib;
    }
    out
}

#[tokio::test]
async fn the_estimate_matches_llama_cpp_buffers_for_every_kv_type() {
    let s = Server::start(Opts {
        load_model: false,
        extra_args: vec!["--log-level".into(), "info,llama_cpp_2=info".into()],
        ..Opts::default()
    });
    std::os::unix::fs::symlink(qwen_file(), s.models_dir.join(format!("{QWEN}.gguf"))).unwrap();
    let types = ["f16", "q8_0", "q4_0"];
    for model in [MODEL, QWEN] {
        for k in types {
            for v in types {
                let before = s.log_text().len();
                let (code, rep) = s
                    .post(
                        "/admin/model/load",
                        &json!({"model_id": model, "context": 2048, "parallel": 4,
                                "cache_type_k": k, "cache_type_v": v}),
                    )
                    .await;
                assert_eq!(code, 200, "{rep}");
                let (code, _) = s
                    .post("/admin/model/unload", &json!({"model_id": model}))
                    .await;
                assert_eq!(code, 200);
                let log = s.log_text()[before..].to_string();
                let b = buffers(&log);
                assert!(
                    log.contains(&format!("K ({k})")) && log.contains(&format!("V ({v})")),
                    "llama.cpp did not use {k}/{v}: {log}"
                );
                for part in ["model", "KV", "output", "compute"] {
                    assert!(b.contains_key(part), "no {part} buffer logged: {log}");
                }
                let m = &rep["memory"];
                let mib = |f: &str| m[f].as_u64().unwrap() as f64 / 1048576.0;
                // To the logged precision (two decimals of a MiB, per layer kind).
                assert!(
                    (mib("kv_cache_bytes") - b["KV"]).abs() < 0.02,
                    "{model} {k}/{v}: {rep} vs {b:?}"
                );
                // Everything llama.cpp allocates, against the estimate without the fixed
                // allowance for the scheduler thread and bookkeeping (16 MiB).
                let logged: f64 = b.values().sum();
                let ours = mib("total_bytes") - 16.0;
                let off = ours / logged - 1.0;
                assert!(
                    off.abs() < 0.02,
                    "{model} {k}/{v}: estimate {ours:.1} MiB vs llama.cpp {logged:.1} MiB ({b:?})"
                );
            }
        }
    }
    // A quantised V without flash attention is refused before anything is allocated.
    let (code, v) = s
        .post(
            "/admin/model/load",
            &json!({"model_id": MODEL, "cache_type_v": "q4_0", "flash_attention": "off"}),
        )
        .await;
    assert_eq!(code, 400, "{v}");
}
