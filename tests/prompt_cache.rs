//! The prefix cache's disk tier against the real server and the real Gemma model: a long
//! prompt's KV written at shutdown is restored after a restart (usage says how many tokens)
//! and continues exactly as a cold run does; truncated and foreign files are refused and
//! deleted; the directory stays under its bound.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A prompt of about 700 tokens that no other test sends; `tag` makes it distinct.
fn long_prompt(tag: &str) -> String {
    let words = [
        "harbor", "lantern", "orchard", "copper", "meadow", "violet", "granite", "willow",
        "saffron", "thunder", "glacier", "ember",
    ];
    let body: Vec<String> = (0..600)
        .map(|i| words[(i * 7 + tag.len()) % words.len()].to_string())
        .collect();
    format!("Notes ({tag}): {}\n\nSummary:", body.join(" "))
}

fn start(models: &Path, cache: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--prompt-cache-dir".to_string(),
        cache.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start(Opts {
        models_dir: Some(models.to_path_buf()),
        context: 2048,
        parallel: 1,
        extra_args: args,
        ..Opts::default()
    })
}

/// Stops a server as systemd or Ctrl-C does, and waits for it to finish writing.
fn stop(mut s: Server) {
    unsafe { libc::kill(s.pid() as i32, libc::SIGTERM) };
    assert!(s.wait_exit(Duration::from_secs(60)).success());
}

async fn complete(s: &Server, prompt: &str) -> (String, u64, u64) {
    let (code, v) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    )
}

/// Polls `/admin/status` until the model's disk tier is open and holds `files` prefixes.
async fn wait_for_files(s: &Server, files: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = s.get("/admin/status").await;
        let n = v["loaded_models"][0]["scheduler"]["prompt_cache_files"].as_u64();
        if n == Some(files) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "disk tier never held {files} files: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kv_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if d.path().is_dir() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                if f.path().extension().is_some_and(|x| x == "kv") {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_prefix_saved_at_shutdown_is_restored_after_a_restart_and_bad_files_are_deleted() {
    let models = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let prompt = long_prompt("restart");

    // Cold: nothing cached. Stopping writes the prefix.
    let s = start(models.path(), cache.path(), &[]);
    wait_for_files(&s, 0).await;
    let (cold, prompt_tokens, cached) = complete(&s, &prompt).await;
    assert_eq!(cached, 0);
    assert!(prompt_tokens > 500, "{prompt_tokens}");
    stop(s);
    let files = kv_files(cache.path());
    assert_eq!(files.len(), 1, "{files:?}");

    // After a restart: restored from disk, and the same greedy continuation.
    let s = start(models.path(), cache.path(), &[]);
    wait_for_files(&s, 1).await;
    let (warm, _, cached) = complete(&s, &prompt).await;
    assert!(
        cached + 1 >= prompt_tokens && cached < prompt_tokens,
        "cached {cached} of {prompt_tokens}"
    );
    assert_eq!(warm, cold);
    // A server with no disk tier computes it all and agrees too.
    stop(s);
    let s = start(models.path(), cache.path(), &["--no-prompt-cache"]);
    let (again, _, cached) = complete(&s, &prompt).await;
    assert_eq!((again.as_str(), cached), (cold.as_str(), 0));
    stop(s);

    // A truncated file is refused when a request would use it, and deleted.
    let file = kv_files(cache.path()).remove(0);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // A foreign file in the same directory is deleted when the directory is opened.
    let foreign = file.with_file_name("foreign.kv");
    std::fs::write(&foreign, vec![7u8; 4096]).unwrap();
    let s = start(models.path(), cache.path(), &[]);
    wait_for_files(&s, 1).await;
    assert!(!foreign.exists());
    let (text, _, cached) = complete(&s, &prompt).await;
    assert_eq!((text.as_str(), cached), (cold.as_str(), 0));
    assert!(!file.exists(), "the truncated file is still there");
    assert!(s
        .log_text()
        .contains("prompt cache: deleting an unusable file"));
    drop(s);
}

#[tokio::test]
async fn evicted_prefixes_go_to_disk_and_the_directory_stays_under_its_bound() {
    let models = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Measure one prefix's file, then bound the directory to two and a half of them.
    let s = start(models.path(), cache.path(), &[]);
    wait_for_files(&s, 0).await;
    complete(&s, &long_prompt("a")).await;
    // One sequence: the next prompt evicts the first one's cache, which goes to disk.
    complete(&s, &long_prompt("bb")).await;
    wait_for_files(&s, 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while kv_files(cache.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the evicted prefix was not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let size = std::fs::metadata(&kv_files(cache.path())[0]).unwrap().len();
    drop(s);
    let bound = size as f64 * 2.5;
    let bound_gb = (bound / 1e9).to_string();
    for f in kv_files(cache.path()) {
        std::fs::remove_file(f).unwrap();
    }
    let s = start(
        models.path(),
        cache.path(),
        &["--prompt-cache-max-gb", &bound_gb],
    );
    wait_for_files(&s, 0).await;
    for tag in ["c", "dd", "eee", "ffff"] {
        complete(&s, &long_prompt(tag)).await;
    }
    // Three evictions wrote three files; the bound keeps two (the newest).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files = kv_files(cache.path());
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
        if files.len() == 2 && total as f64 <= bound {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} files, {total} bytes, bound {bound}",
            files.len(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The third prompt's prefix is kept (the oldest went), and it is used. (Its request
    // evicts the fourth one's cache, which is written and pushes out the second's file.)
    let (_, prompt_tokens, cached) = complete(&s, &long_prompt("eee")).await;
    assert!(
        cached + 1 >= prompt_tokens,
        "cached {cached} of {prompt_tokens}"
    );
    // (Only the few tokens before the tag are shared with what the sequence holds.)
    let (_, _, cached) = complete(&s, &long_prompt("c")).await;
    assert!(
        cached < 10,
        "the oldest prefix should have been deleted: {cached}"
    );
}
