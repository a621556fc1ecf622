//! A local stand-in for the Hugging Face Hub, speaking its HTTP protocol over real sockets:
//! `GET /api/models/{repo}/revision/{rev}` (commit id), `GET /api/models/{repo}/tree/{rev}`
//! (paginated with `Link`, LFS SHA-256 per file), `GET /{repo}/resolve/{rev}/{path}` (302 to a
//! CDN on another port for LFS files), byte ranges, 401/403 with `X-Error-Code` for private and
//! gated repositories, 404 for unknown ones. Faults on demand: a file whose advertised hash is
//! wrong, a connection cut halfway through the first transfer of a file, and slow files.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// One file of a fake repository.
#[derive(Clone)]
pub struct FakeFile {
    pub path: String,
    pub data: Bytes,
    /// SHA-256, worked out once (weights are large and every listing and answer names it).
    digest: Arc<std::sync::OnceLock<String>>,
    /// Stored with LFS (served through the CDN, listed with a SHA-256).
    pub lfs: bool,
    /// Advertise this SHA-256 instead of the real one (a tampered or corrupted file).
    pub advertised_sha256: Option<String>,
    /// Advertise this size instead of the real one.
    pub advertised_size: Option<u64>,
    /// Advertise this git blob id instead of the real one (a tampered small file).
    pub advertised_oid: Option<String>,
}

impl FakeFile {
    /// An LFS file (weights).
    pub fn lfs(path: &str, data: Vec<u8>) -> Self {
        Self {
            path: path.into(),
            data: Bytes::from(data),
            digest: Arc::default(),
            lfs: true,
            advertised_sha256: None,
            advertised_size: None,
            advertised_oid: None,
        }
    }

    /// A small file kept in git (README, config).
    pub fn git(path: &str, data: &[u8]) -> Self {
        Self {
            lfs: false,
            ..Self::lfs(path, data.to_vec())
        }
    }

    pub fn sha256(&self) -> String {
        self.digest
            .get_or_init(|| hex::encode(Sha256::digest(&self.data)))
            .clone()
    }

    fn git_oid(&self) -> String {
        if let Some(oid) = &self.advertised_oid {
            return oid.clone();
        }
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", self.data.len()));
        h.update(&self.data);
        hex::encode(h.finalize())
    }
}

/// Who may read a repository.
#[derive(Clone, Copy, PartialEq)]
pub enum Access {
    Public,
    /// Needs the hub's token; without it the Hub answers 401 RepoNotFound, as the real one does.
    Private,
    /// Answers 403 GatedRepo whatever the token.
    Gated,
}

/// A fake repository.
#[derive(Clone)]
pub struct FakeRepo {
    pub id: String,
    pub access: Access,
    pub commit: String,
    pub files: Vec<FakeFile>,
}

impl FakeRepo {
    pub fn new(id: &str, files: Vec<FakeFile>) -> Self {
        Self {
            id: id.into(),
            access: Access::Public,
            commit: hex::encode(Sha1::digest(id.as_bytes())),
            files,
        }
    }
}

/// A request the hub saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    /// Served on the CDN port.
    pub cdn: bool,
    pub status: u16,
}

struct HubState {
    repos: HashMap<String, FakeRepo>,
    token: String,
    page_size: usize,
    cut_once: Mutex<HashSet<String>>,
    slow: HashMap<String, Duration>,
    seen: Mutex<Vec<Seen>>,
    cdn_base: String,
    hub_base: String,
    foreign_next: Option<String>,
}

/// Faults and settings.
#[derive(Default)]
pub struct HubOptions {
    pub token: String,
    /// Files (by path) whose first transfer is cut halfway.
    pub cut_once: Vec<String>,
    /// Files sent 64 KiB at a time with this pause between pieces.
    pub slow: Vec<(String, Duration)>,
    /// Tree entries per page (the real Hub pages large repositories).
    pub page_size: usize,
    /// A `rel="next"` URL the file list's first page names instead of the Hub's own (a Hub
    /// that would send the client, and its token, elsewhere); `{hub}` stands for the Hub's
    /// own base URL.
    pub foreign_next: Option<String>,
}

/// A running fake hub; stops when dropped.
pub struct FakeHub {
    pub base: String,
    state: Arc<HubState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FakeHub {
    /// Starts the hub (and its CDN on a second port) on loopback.
    pub fn start(repos: Vec<FakeRepo>, opts: HubOptions) -> FakeHub {
        let hub = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        hub.set_nonblocking(true).unwrap();
        cdn.set_nonblocking(true).unwrap();
        let hub_base = format!("http://{}", hub.local_addr().unwrap());
        let cdn_base = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(HubState {
            repos: repos.into_iter().map(|r| (r.id.clone(), r)).collect(),
            token: opts.token,
            page_size: opts.page_size.max(1),
            cut_once: Mutex::new(opts.cut_once.into_iter().collect()),
            slow: opts.slow.into_iter().collect(),
            seen: Mutex::new(Vec::new()),
            cdn_base,
            hub_base: hub_base.clone(),
            foreign_next: opts.foreign_next,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let hub = tokio::net::TcpListener::from_std(hub).unwrap();
                let cdn = tokio::net::TcpListener::from_std(cdn).unwrap();
                let hub_app = router(Arc::clone(&st), false);
                let cdn_app = router(st, true);
                let a = tokio::spawn(async move { axum::serve(hub, hub_app).await });
                let b = tokio::spawn(async move { axum::serve(cdn, cdn_app).await });
                let _ = stop_rx.await;
                a.abort();
                b.abort();
            });
        });
        FakeHub {
            base: hub_base,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

type Shared = (Arc<HubState>, bool);

fn router(state: Arc<HubState>, cdn: bool) -> Router {
    let shared = (state, cdn);
    Router::new()
        .route("/api/models/{org}/{name}/revision/{*rev}", get(revision))
        .route("/api/models/{org}/{name}/tree/{*rev}", get(tree))
        .route("/cdn/{org}/{name}/{*path}", get(cdn_file))
        .route("/{org}/{name}/resolve/{rev}/{*path}", get(resolve))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
}

/// Notes every routed request (path, range, authorization, status) for the tests.
async fn record(
    State((st, cdn)): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let h = req.headers();
    let text = |k: header::HeaderName| h.get(k).and_then(|v| v.to_str().ok()).map(String::from);
    let (range, authorization) = (text(header::RANGE), text(header::AUTHORIZATION));
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    st.seen.lock().unwrap().push(Seen {
        path,
        range,
        authorization,
        cdn,
        status: resp.status().as_u16(),
    });
    resp
}

/// The repository if the request may see it, else the Hub's error answer.
fn repo_for<'a>(st: &'a HubState, id: &str, h: &HeaderMap) -> Result<&'a FakeRepo, Box<Response>> {
    let err = |status: StatusCode, code: &str, msg: &str| {
        Box::new(
            (
                status,
                [("x-error-code", code.to_string())],
                axum::Json(serde_json::json!({ "error": msg })),
            )
                .into_response(),
        )
    };
    let Some(repo) = st.repos.get(id) else {
        return Err(err(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        ));
    };
    let authorized = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", st.token).as_str());
    match repo.access {
        Access::Public => Ok(repo),
        Access::Private if authorized && !st.token.is_empty() => Ok(repo),
        Access::Private => Err(err(
            StatusCode::UNAUTHORIZED,
            "RepoNotFound",
            "Invalid username or password.",
        )),
        Access::Gated => Err(err(
            StatusCode::FORBIDDEN,
            "GatedRepo",
            "Access to this model is restricted.",
        )),
    }
}

async fn revision(
    State((st, _)): State<Shared>,
    Path((org, name, rev)): Path<(String, String, String)>,
    h: HeaderMap,
) -> Response {
    let id = format!("{org}/{name}");
    match repo_for(&st, &id, &h) {
        Err(r) => *r,
        Ok(_) if rev != "main" && rev.len() != 40 => (
            StatusCode::NOT_FOUND,
            [("x-error-code", "RevisionNotFound")],
            "Invalid rev id",
        )
            .into_response(),
        Ok(repo) => axum::Json(serde_json::json!({
            "id": id,
            "sha": repo.commit,
            "siblings": repo.files.iter().map(|f| serde_json::json!({"rfilename": f.path})).collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

async fn tree(
    State((st, _)): State<Shared>,
    Path((org, name, rev)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    let id = format!("{org}/{name}");
    match repo_for(&st, &id, &h) {
        Err(r) => *r,
        Ok(repo) => {
            let start: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
            let end = (start + st.page_size).min(repo.files.len());
            let page: Vec<_> = repo.files[start..end]
                .iter()
                .map(|f| {
                    let size = f.advertised_size.unwrap_or(f.data.len() as u64);
                    let mut e = serde_json::json!({
                        "type": "file", "oid": f.git_oid(), "size": size, "path": f.path,
                    });
                    if f.lfs {
                        e["lfs"] = serde_json::json!({
                            "oid": f.advertised_sha256.clone().unwrap_or_else(|| f.sha256()),
                            "size": size,
                            "pointerSize": 134,
                        });
                        e["size"] = serde_json::json!(size);
                    }
                    e
                })
                .collect();
            let mut r = axum::Json(page).into_response();
            if let Some(url) = st.foreign_next.as_ref().filter(|_| start == 0) {
                let next = format!("<{}>; rel=\"next\"", url.replace("{hub}", &st.hub_base));
                r.headers_mut().insert(header::LINK, next.parse().unwrap());
            } else if end < repo.files.len() {
                let next = format!(
                    "<{}/api/models/{id}/tree/{rev}?recursive=true&cursor={end}>; rel=\"next\"",
                    st.hub_base
                );
                r.headers_mut().insert(header::LINK, next.parse().unwrap());
            }
            r
        }
    }
}

async fn resolve(
    State((st, _)): State<Shared>,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    h: HeaderMap,
) -> Response {
    let id = format!("{org}/{name}");
    match repo_for(&st, &id, &h) {
        Err(r) => *r,
        Ok(repo) if rev != repo.commit && rev != "main" => {
            (StatusCode::NOT_FOUND, "Invalid rev id").into_response()
        }
        Ok(repo) => match repo.files.iter().find(|f| f.path == path) {
            None => (
                StatusCode::NOT_FOUND,
                [("x-error-code", "EntryNotFound")],
                "Entry not found",
            )
                .into_response(),
            Some(f) if f.lfs => Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, format!("{}/cdn/{id}/{path}", st.cdn_base))
                .header("x-linked-etag", format!("\"{}\"", f.sha256()))
                .header("x-linked-size", f.data.len())
                .header("x-repo-commit", &repo.commit)
                .body(Body::empty())
                .unwrap(),
            Some(f) => serve_bytes(&st, f, &h),
        },
    }
}

async fn cdn_file(
    State((st, _)): State<Shared>,
    Path((org, name, path)): Path<(String, String, String)>,
    h: HeaderMap,
) -> Response {
    let id = format!("{org}/{name}");
    let file = st
        .repos
        .get(&id)
        .and_then(|r| r.files.iter().find(|f| f.path == path));
    match file {
        None => (StatusCode::NOT_FOUND, "no such object").into_response(),
        Some(f) => serve_bytes(&st, f, &h),
    }
}

/// The file's bytes, honouring `Range: bytes=N-[M]`, with the configured faults.
fn serve_bytes(st: &HubState, f: &FakeFile, h: &HeaderMap) -> Response {
    let len = f.data.len() as u64;
    let range = h
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            let start: u64 = a.parse().ok()?;
            let end: u64 = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                b.parse().ok()?
            };
            Some((start, end))
        });
    let (start, end, status) = match range {
        Some((s, _)) if s >= len => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap()
        }
        Some((s, e)) => (s, e.min(len - 1), StatusCode::PARTIAL_CONTENT),
        None => (0, len.saturating_sub(1), StatusCode::OK),
    };
    let body = if len == 0 {
        Bytes::new()
    } else {
        f.data.slice(start as usize..=end as usize)
    };
    let cut = st.cut_once.lock().unwrap().remove(&f.path);
    let pause = st.slow.get(&f.path).copied();
    let total = body.len();
    let stream = async_stream(body, cut, pause);
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, total)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{}\"", f.sha256()));
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
    }
    b.body(Body::from_stream(stream)).unwrap()
}

/// The body in 64 KiB pieces; `cut` ends it with an error halfway (the connection drops
/// with bytes missing), `pause` sleeps between pieces.
fn async_stream(
    body: Bytes,
    cut: bool,
    pause: Option<Duration>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let stop_at = if cut { body.len() / 2 } else { usize::MAX };
    futures_util::stream::unfold(0usize, move |pos| {
        let body = body.clone();
        async move {
            if pos >= body.len() {
                return None;
            }
            if pos >= stop_at {
                return Some((
                    Err(std::io::Error::other("connection cut by the test")),
                    usize::MAX,
                ));
            }
            if let Some(p) = pause {
                tokio::time::sleep(p).await;
            }
            let end =
                (pos + 65536)
                    .min(body.len())
                    .min(if stop_at > pos { stop_at } else { body.len() });
            Some((Ok(body.slice(pos..end)), end))
        }
    })
}
