//! The audit log: one JSON line per admin action (load, unload, download start, cancel and
//! finish, delete) and per refused key, appended to a file that nothing in the server ever
//! rewrites. It answers "who loaded or deleted what, and when" for a server that runs
//! unattended. A line names the client's address and which key it used by a short
//! fingerprint; keys, tokens and request bodies never reach it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// One audited action.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEvent {
    /// RFC 3339, UTC.
    pub time: String,
    /// `model_load`, `model_unload`, `model_delete`, `download_start`, `download_cancel`,
    /// `download_resume`, `download_finish`, `auth_failure`, `config_reload` (over HTTP, or
    /// `config_reload` with route `SIGHUP`); for configured clients,
    /// `client_key_used` (a key's first request since start: which client it is) and
    /// `client_limited` (a request refused by its client's caps).
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `ok`, `refused` (4xx), `failed` (5xx), or a download's final state.
    pub outcome: String,
    /// The HTTP status answered, for actions that came over HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The route that was called.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The client's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Fingerprint of the key the client presented (see [`fingerprint`]), never the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The configured client (`clients[].name`) that key belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// Refusals of this client not written since its last line (see [`RefusalLimiter`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

impl AuditEvent {
    /// An event stamped now.
    pub fn now(action: &'static str, outcome: impl Into<String>) -> Self {
        Self {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            action,
            model: None,
            outcome: outcome.into(),
            status: None,
            route: None,
            client: None,
            key: None,
            caller: None,
            suppressed: None,
        }
    }
}

/// A short, stable name for a key: the first 12 hex digits of its SHA-256. Enough to tell
/// which of a household's keys was used, useless for recovering one.
pub fn fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..12])
}

/// Refused-key lines written per client per minute; past it they are counted, and the
/// client's next written line says how many were left out. A client without a key cannot
/// then fill the disk with audit lines (the metrics still count every refusal).
pub const REFUSALS_PER_MINUTE: u64 = 20;

/// Clients whose refusals are tracked one by one; past it the rest share one count.
const TRACKED_CLIENTS: usize = 4096;

/// Decides which refusals get an audit line: at most [`REFUSALS_PER_MINUTE`] per client.
#[derive(Default)]
pub struct RefusalLimiter {
    /// client -> (minute it counts in, lines written in it, refusals left out since the last
    /// written line).
    clients: Mutex<std::collections::HashMap<String, (u64, u64, u64)>>,
}

impl RefusalLimiter {
    /// Whether a refusal of `client` at `minute` gets its line; `Some(n)`: yes, with `n`
    /// refusals left out before it.
    pub fn admit(&self, client: &str, minute: u64) -> Option<u64> {
        let mut clients = self.clients.lock().expect("limiter lock");
        if clients.len() >= TRACKED_CLIENTS && !clients.contains_key(client) {
            clients.retain(|_, e| e.0 == minute);
        }
        let key = if clients.len() >= TRACKED_CLIENTS && !clients.contains_key(client) {
            "other"
        } else {
            client
        };
        let e = clients.entry(key.to_string()).or_insert((minute, 0, 0));
        if e.0 != minute {
            e.0 = minute;
            e.1 = 0;
        }
        if e.1 >= REFUSALS_PER_MINUTE {
            e.2 += 1;
            return None;
        }
        e.1 += 1;
        Some(std::mem::take(&mut e.2))
    }
}

/// The append-only audit file (or nowhere, when disabled).
pub struct Audit {
    file: Option<Mutex<File>>,
    path: Option<PathBuf>,
    refusals: RefusalLimiter,
}

impl Audit {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Some(Mutex::new(file)),
            path: Some(path.to_path_buf()),
            refusals: RefusalLimiter::default(),
        })
    }

    /// An audit that records nothing (`audit.enabled: false`, and unit tests).
    pub fn disabled() -> Self {
        Self {
            file: None,
            path: None,
            refusals: RefusalLimiter::default(),
        }
    }

    /// Where the lines go.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends the line of a refused key, unless its client has had its share of lines this
    /// minute (see [`RefusalLimiter`]).
    pub fn record_refusal(&self, mut event: AuditEvent) {
        let client = event.client.clone().unwrap_or_default();
        let minute = chrono::Utc::now().timestamp().max(0) as u64 / 60;
        if let Some(left_out) = self.refusals.admit(&client, minute) {
            event.suppressed = (left_out > 0).then_some(left_out);
            self.record(&event);
        }
    }

    /// Appends one line. Each line is written with one `write` on an `O_APPEND` file, so lines
    /// never interleave; a failed write is logged, never fatal to the request.
    pub fn record(&self, event: &AuditEvent) {
        let Some(file) = &self.file else { return };
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut f = file.lock().expect("audit lock");
        if let Err(e) = f.write_all(&line).and_then(|()| f.flush()) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_are_bounded_per_client_and_minute() {
        let l = RefusalLimiter::default();
        for _ in 0..REFUSALS_PER_MINUTE {
            assert_eq!(l.admit("10.0.0.1", 7), Some(0));
        }
        assert_eq!(l.admit("10.0.0.1", 7), None);
        assert_eq!(l.admit("10.0.0.1", 7), None);
        // Another client has its own share.
        assert_eq!(l.admit("10.0.0.2", 7), Some(0));
        // The next minute's first line says how many were left out.
        assert_eq!(l.admit("10.0.0.1", 8), Some(2));
        assert_eq!(l.admit("10.0.0.1", 8), Some(0));
        // Past the tracked clients, newcomers share one count.
        for i in 0..TRACKED_CLIENTS * 2 {
            l.admit(&format!("c{i}"), 8);
        }
        assert!(l.clients.lock().unwrap().len() <= TRACKED_CLIENTS + 1);
    }

    #[test]
    fn lines_append_and_never_hold_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
        let audit = Audit::open(&path).unwrap();
        let mut e = AuditEvent::now("model_load", "ok");
        e.model = Some("m".into());
        e.key = Some(fingerprint("sk-secret-key"));
        audit.record(&e);
        audit.record(&AuditEvent::now("auth_failure", "refused"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "{\"earlier\":true}");
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["action"], "model_load");
        assert_eq!(v["model"], "m");
        assert_eq!(v["key"].as_str().unwrap().len(), "sha256:".len() + 12);
        assert!(!text.contains("sk-secret-key"));
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
