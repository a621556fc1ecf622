//! Readable tables for `status`, `models` and `downloads`, made from the admin API's JSON
//! (the same JSON `--json` prints), like `lms ps` and `ollama ps`.

use serde_json::Value;

/// Aligned columns: a header row, then rows; the last column is not padded.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as titles).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, columns two spaces apart.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths = vec![0; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i + 1 == n {
                        c.clone()
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// Bytes as GB (or MB under one GB).
pub fn bytes(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} GB", n as f64 / 1e9)
    } else {
        format!("{:.0} MB", n as f64 / 1e6)
    }
}

/// A bar of `width` cells filled to `share` (0..=1).
pub fn bar(share: f64, width: usize) -> String {
    let filled = ((share.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

fn u(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, p: &str) -> f64 {
    v.pointer(p).and_then(Value::as_f64).unwrap_or(0.0)
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `opta-lmx status`: memory against the threshold, loaded models, performance, downloads.
pub fn status(st: &Value) -> String {
    let total = u(st, "/memory/total_bytes");
    let used = u(st, "/memory/used_bytes");
    let threshold = f(st, "/memory/threshold_percent");
    let limit = (total as f64 * threshold / 100.0) as u64;
    let mut out = format!(
        "opta-lmx {} · up {}\n",
        s(st, "/version"),
        duration(u(st, "/uptime_seconds"))
    );
    out.push_str(&format!(
        "memory  {} {} of {} used ({:.0}%), limit {:.0}% = {}; models {}\n",
        bar(used as f64 / limit.max(1) as f64, 20),
        bytes(used),
        bytes(total),
        100.0 * used as f64 / total.max(1) as f64,
        threshold,
        bytes(limit),
        bytes(u(st, "/memory/models_bytes")),
    ));
    let p = &st["performance"];
    out.push_str(&format!(
        "load    {} active, {} queued · decode {:.1} tok/s · prompt {:.1} tok/s · TTFT p50 {:.0} ms · {} requests\n\n",
        u(p, "/active_requests"),
        u(p, "/queued_requests"),
        f(p, "/decode_tokens_per_second"),
        f(p, "/prompt_tokens_per_second"),
        f(p, "/p50_time_to_first_token_ms"),
        u(p, "/completions_total"),
    ));
    let models = st["loaded_models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        out.push_str("no model loaded\n");
    } else {
        let mut t = Table::new(&[
            "MODEL", "FORMAT", "MEMORY", "OF LIMIT", "CONTEXT", "ACTIVE", "QUEUED", "TOK/S",
            "REQUESTS", "PINNED",
        ]);
        for m in &models {
            let mem = u(m, "/memory_bytes");
            t.row(vec![
                s(m, "/id").to_string(),
                s(m, "/format").to_string(),
                bytes(mem),
                format!(
                    "{} {:.0}%",
                    bar(mem as f64 / limit.max(1) as f64, 10),
                    100.0 * mem as f64 / limit.max(1) as f64
                ),
                u(m, "/context").to_string(),
                format!("{}/{}", u(m, "/active_sequences"), u(m, "/parallel")),
                u(m, "/queued_requests").to_string(),
                format!("{:.1}", f(m, "/scheduler/decode_tokens_per_second")),
                u(m, "/request_count").to_string(),
                if m["pinned"] == true { "yes" } else { "" }.to_string(),
            ]);
        }
        out.push_str(&t.render());
        let clients = clients_table(&models);
        if !clients.is_empty() {
            out.push('\n');
            out.push_str(&clients);
        }
    }
    let downloads = st["downloads"].as_array().cloned().unwrap_or_default();
    if !downloads.is_empty() {
        out.push('\n');
        out.push_str(&downloads_table(&downloads));
    }
    out
}

/// Who is running and waiting on each model (empty when nobody is).
fn clients_table(models: &[Value]) -> String {
    let mut t = Table::new(&["CLIENT", "MODEL", "RUNNING", "QUEUED", "PRIORITY"]);
    let mut any = false;
    for m in models {
        for c in m["clients"].as_array().into_iter().flatten() {
            any = true;
            let name = s(c, "/client");
            t.row(vec![
                if name.is_empty() { "-" } else { name }.to_string(),
                s(m, "/id").to_string(),
                u(c, "/running").to_string(),
                u(c, "/queued").to_string(),
                c["priority"].as_i64().unwrap_or(0).to_string(),
            ]);
        }
    }
    if any {
        t.render()
    } else {
        String::new()
    }
}

/// `opta-lmx models`: what is on disk, and what of it is loaded.
pub fn models(v: &Value) -> String {
    let list = v["models"].as_array().cloned().unwrap_or_default();
    let mut out = format!("models in {}\n", s(v, "/models_directory"));
    if list.is_empty() {
        out.push_str("none; `opta-lmx download ORG/REPO` fetches one\n");
        return out;
    }
    let mut t = Table::new(&[
        "MODEL", "TYPE", "FORMAT", "QUANT", "SIZE", "STATE", "MEMORY", "CONTEXT", "REQUESTS",
    ]);
    for m in &list {
        let loaded = m["loaded"] == true;
        let memory = if loaded {
            bytes(u(m, "/memory_bytes"))
        } else {
            m.pointer("/estimated_memory/total_bytes")
                .and_then(Value::as_u64)
                .map_or(String::new(), |b| format!("~{}", bytes(b)))
        };
        t.row(vec![
            s(m, "/id").to_string(),
            s(m, "/type").to_string(),
            s(m, "/format").to_string(),
            s(m, "/quantization").to_string(),
            bytes(u(m, "/size_bytes")),
            if loaded { "loaded" } else { "on disk" }.to_string(),
            memory,
            u(m, "/context").to_string(),
            u(m, "/request_count").to_string(),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// Download jobs with their progress.
pub fn downloads_table(jobs: &[Value]) -> String {
    if jobs.is_empty() {
        return "no downloads\n".into();
    }
    let mut t = Table::new(&["DOWNLOAD", "REPO", "STATE", "PROGRESS", "RATE", "ETA"]);
    for j in jobs {
        let progress = f(j, "/progress");
        t.row(vec![
            s(j, "/job_id").to_string(),
            s(j, "/repo").to_string(),
            s(j, "/state").to_string(),
            format!(
                "{} {:.0}% of {}",
                bar(progress, 10),
                progress * 100.0,
                bytes(u(j, "/bytes_total"))
            ),
            format!("{}/s", bytes(f(j, "/rate_bytes_per_second") as u64)),
            j.pointer("/eta_seconds")
                .and_then(Value::as_f64)
                .map_or(String::new(), |e| duration(e as u64)),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide cell  x\n");
        assert_eq!(bar(0.5, 4), "[##--]");
        assert_eq!(bar(7.0, 2), "[##]");
        assert_eq!(bytes(850_000_000), "850 MB");
        assert_eq!(bytes(2_500_000_000), "2.50 GB");
    }

    #[test]
    fn status_shows_models_against_the_limit() {
        let st = json!({
            "version": "0.1.0", "uptime_seconds": 3725,
            "memory": {"total_bytes": 10_000_000_000u64, "used_bytes": 4_000_000_000u64,
                       "threshold_percent": 80.0, "models_bytes": 800_000_000u64},
            "performance": {"active_requests": 1, "queued_requests": 0,
                            "decode_tokens_per_second": 42.5, "completions_total": 3},
            "loaded_models": [{"id": "qwen", "format": "gguf", "memory_bytes": 800_000_000u64,
                               "context": 4096, "active_sequences": 1, "parallel": 4,
                               "queued_requests": 0, "request_count": 3,
                               "scheduler": {"decode_tokens_per_second": 42.5},
                               "clients": [{"client": "opta-cli", "running": 1,
                                            "queued": 2, "priority": -10}]}],
            "downloads": [],
        });
        let text = status(&st);
        assert!(text.contains("up 1h 02m"), "{text}");
        assert!(text.contains("limit 80% = 8.00 GB"), "{text}");
        assert!(text.contains("qwen"), "{text}");
        // 0.8 GB of an 8 GB limit.
        assert!(text.contains("[#---------] 10%"), "{text}");
        assert!(text.contains("1/4"), "{text}");
        assert!(text.contains("42.5"), "{text}");
        // The clients table: name, model, running, queued, best priority.
        let row = text
            .lines()
            .find(|l| l.starts_with("opta-cli"))
            .unwrap_or_else(|| panic!("{text}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["opta-cli", "qwen", "1", "2", "-10"], "{text}");
    }
}
