//! A client of the Hugging Face Hub's HTTP protocol: the repository's commit and file list
//! (with each LFS file's SHA-256) from the JSON API, and file bytes from `resolve` URLs, with
//! redirects to the CDN and `Range` for resuming. The token goes in an `Authorization` header
//! that reqwest drops on redirects to another host, and is never logged.

use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, LINK, RANGE};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::config::HubConfig;

/// Why the Hub did not give what was asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum HubError {
    /// 401/403: private or gated, and no token or a token without access.
    #[error("the Hub refused access to `{repo}` (HTTP {status}): it is private or gated; {hint}")]
    Unauthorized {
        repo: String,
        status: u16,
        hint: &'static str,
    },
    /// The repository, revision or file does not exist (or is hidden from this token).
    #[error("not found on the Hub: {0}")]
    NotFound(String),
    /// Could not talk to the Hub at all.
    #[error("cannot reach the Hub at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// The Hub answered something this client does not understand.
    #[error("unexpected answer from the Hub: {0}")]
    Protocol(String),
}

/// One file of a repository at a commit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct RepoFile {
    pub path: String,
    pub size: u64,
    /// SHA-256 of the content, for files stored with LFS (all model weights).
    pub sha256: Option<String>,
    /// Git blob id (SHA-1 of `blob <len>\0<content>`), the check for small non-LFS files.
    pub git_oid: String,
}

/// A repository's files at one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoListing {
    pub commit: String,
    pub files: Vec<RepoFile>,
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    oid: String,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    oid: String,
    size: u64,
}

/// Talks to one Hub endpoint with one (optional) token.
#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    endpoint: String,
    token: Option<String>,
}

/// The token the Hub's own tools would use when none is configured: `$HF_HOME/token` or
/// `~/.cache/huggingface/token`.
fn stored_token() -> Option<String> {
    let home = std::env::var_os("HF_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                std::path::PathBuf::from(h)
                    .join(".cache")
                    .join("huggingface")
            })
        })?;
    let t = std::fs::read_to_string(home.join("token")).ok()?;
    Some(t.trim().to_string()).filter(|t| !t.is_empty())
}

impl HubClient {
    /// A client for the configured endpoint and token.
    pub fn new(cfg: &HubConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("opta-lmx/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        Self {
            http,
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
            token: cfg.token.clone().or_else(stored_token),
        }
    }

    /// Base URL (for messages; it holds no secret).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.get(url);
        if let Some(t) = &self.token {
            r = r.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        r
    }

    fn unreachable(&self, e: reqwest::Error) -> HubError {
        HubError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason: describe(e),
        }
    }

    /// Maps a non-success status to an error about `repo` / `what`.
    fn status_error(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        repo: &str,
        what: &str,
    ) -> HubError {
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let hint = if self.token.is_some() {
            "the configured HF token has no access to it"
        } else {
            "needs HF_TOKEN (or hub.token in the config) set to a token with access"
        };
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if code != "RepoNotFound" => {
                HubError::Unauthorized {
                    repo: repo.to_string(),
                    status: status.as_u16(),
                    hint,
                }
            }
            // The Hub answers 401 RepoNotFound both for repositories that do not exist and for
            // private ones the caller may not see.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::NotFound(format!(
                "{what} (HTTP {}: it does not exist, or it is private and {hint})",
                status.as_u16()
            )),
            StatusCode::NOT_FOUND => HubError::NotFound(what.to_string()),
            s => HubError::Protocol(format!("HTTP {} for {what}", s.as_u16())),
        }
    }

    /// A GET that must succeed; other answers become errors about `what` in `repo`.
    async fn get_ok(
        &self,
        url: &str,
        repo: &str,
        what: &str,
    ) -> Result<reqwest::Response, HubError> {
        let resp = self
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.status_error(resp.status(), resp.headers(), repo, what))
        }
    }

    /// The commit `revision` points at and every file in the repository there.
    pub async fn list(&self, repo: &str, revision: &str) -> Result<RepoListing, HubError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint,
            encode(revision)
        );
        let what = format!("repository `{repo}` at revision `{revision}`");
        let resp = self.get_ok(&url, repo, &what).await?;
        let info: RevisionInfo = resp
            .json()
            .await
            .map_err(|e| HubError::Protocol(format!("revision info: {}", describe(e))))?;
        if info.sha.is_empty() || !info.sha.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(HubError::Protocol(format!("bad commit id `{}`", info.sha)));
        }

        let mut files = Vec::new();
        let mut next = Some(format!(
            "{}/api/models/{repo}/tree/{}?recursive=true",
            self.endpoint, info.sha
        ));
        while let Some(url) = next.take() {
            let resp = self
                .get_ok(&url, repo, &format!("file list of `{repo}`"))
                .await?;
            // Only follow pages on the same Hub: the token must not go anywhere else.
            next = next_page(resp.headers());
            if let Some(u) = next.as_deref().filter(|u| !same_hub(&self.endpoint, u)) {
                // Never followed with the token; and a listing cut short would choose files
                // from half a repository.
                let host = reqwest::Url::parse(u)
                    .ok()
                    .and_then(|u| u.host_str().map(String::from))
                    .unwrap_or_else(|| "an unparsable address".into());
                return Err(HubError::Protocol(format!(
                    "the file list of `{repo}` continues on another host ({host}); not following it"
                )));
            }
            let page: Vec<TreeEntry> = resp
                .json()
                .await
                .map_err(|e| HubError::Protocol(format!("file list: {}", describe(e))))?;
            for e in page.into_iter().filter(|e| e.kind == "file") {
                if !safe_relative_path(&e.path) {
                    return Err(HubError::Protocol(format!(
                        "file path `{}` would leave the model folder",
                        e.path
                    )));
                }
                let (size, sha256) = match e.lfs {
                    Some(l) => (l.size, Some(l.oid.to_ascii_lowercase())),
                    None => (e.size, None),
                };
                files.push(RepoFile {
                    path: e.path,
                    size,
                    sha256,
                    git_oid: e.oid,
                });
            }
        }
        Ok(RepoListing {
            commit: info.sha,
            files,
        })
    }

    /// Starts fetching a file from byte `offset` on. The answer is 200 (whole file) or 206
    /// (from `offset`); the caller checks which.
    pub async fn fetch(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
        offset: u64,
    ) -> Result<reqwest::Response, HubError> {
        let url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            encode_path(path)
        );
        let mut req = self.get(&url);
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let s = resp.status();
        if s.is_success() || s == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        Err(self.status_error(s, resp.headers(), repo, &format!("`{path}` in `{repo}`")))
    }
}

/// A transport error with its causes (which say what actually failed) and without its URL.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Whether `url` is on the Hub at `endpoint`: the same scheme, host and port once both are
/// parsed, no user name or password, and a path under the endpoint's. A prefix test on the
/// text let `http://hub:80@evil:81/...` and `https://huggingface.co.evil/...` through, with
/// the token.
fn same_hub(endpoint: &str, url: &str) -> bool {
    let (Ok(base), Ok(next)) = (reqwest::Url::parse(endpoint), reqwest::Url::parse(url)) else {
        return false;
    };
    let base_path = base.path().trim_end_matches('/');
    next.scheme() == base.scheme()
        && next.host() == base.host()
        && next.port_or_known_default() == base.port_or_known_default()
        && next.username().is_empty()
        && next.password().is_none()
        && (next.path() == base_path || next.path().starts_with(&format!("{base_path}/")))
}

/// The `rel="next"` URL of a paginated answer.
fn next_page(h: &HeaderMap) -> Option<String> {
    let link = h.get(LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// A repository file path that stays inside its folder.
pub fn safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.chars().any(char::is_control)
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// Whether `repo` looks like `org/name` as the Hub spells repository ids.
pub fn valid_repo_id(repo: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with(['.', '-'])
            && !s.contains("..")
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    matches!(repo.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// Percent-encodes a revision (branch names may hold `/`).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes each segment of a file path, keeping the slashes.
fn encode_path(p: &str) -> String {
    p.split('/').map(encode).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_pages_must_be_on_the_same_hub() {
        let hub = "http://127.0.0.1:8080";
        assert!(same_hub(
            hub,
            "http://127.0.0.1:8080/api/models/a/b/tree/c?cursor=x"
        ));
        assert!(same_hub(
            "https://huggingface.co",
            "https://huggingface.co:443/api/models/a/b/tree/c"
        ));
        // Prefix tricks that a text comparison let through, with the token.
        assert!(!same_hub(hub, "http://127.0.0.1:8080@evil:9/api/models"));
        assert!(!same_hub(hub, "http://127.0.0.1:80801/api/models"));
        assert!(!same_hub(
            "https://huggingface.co",
            "https://huggingface.co.evil.example/api/models"
        ));
        assert!(!same_hub(
            "https://huggingface.co",
            "http://huggingface.co/api/models"
        ));
        assert!(!same_hub(hub, "http://user:pw@127.0.0.1:8080/api"));
        assert!(!same_hub(hub, "not a url"));
        // A mirror under a path keeps its pages under that path.
        assert!(same_hub("http://m/hf", "http://m/hf/api/models/x"));
        assert!(!same_hub("http://m/hf", "http://m/hfx/api/models/x"));
    }

    #[test]
    fn repo_ids_and_paths() {
        assert!(valid_repo_id("unsloth/gemma-3-270m-it-GGUF"));
        assert!(valid_repo_id("a/b.c_d-e"));
        for bad in [
            "noslash",
            "a/b/c",
            "../x",
            "a/..",
            "a/",
            "/b",
            "a/b c",
            "a/.hidden",
        ] {
            assert!(!valid_repo_id(bad), "{bad}");
        }
        assert!(safe_relative_path("sub/model-Q4_K_M.gguf"));
        for bad in ["../x", "a/../b", "/etc/passwd", "a//b", "a\\b", ""] {
            assert!(!safe_relative_path(bad), "{bad}");
        }
    }

    #[test]
    fn encodes_and_pages() {
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("dir/a b.gguf"), "dir/a%20b.gguf");
        let mut h = HeaderMap::new();
        h.insert(
            LINK,
            "<http://h/api/x?cursor=abc>; rel=\"next\"".parse().unwrap(),
        );
        assert_eq!(next_page(&h).as_deref(), Some("http://h/api/x?cursor=abc"));
        assert_eq!(next_page(&HeaderMap::new()), None);
    }
}
