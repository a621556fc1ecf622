//! The models directory on disk: which GGUF files are there and what they are called.
//!
//! Ids are derived from paths relative to the directory (`file-stem` at the top level,
//! `org/repo/file-stem` in LM Studio's nested layout, with `org/repo` also accepted when the
//! folder holds one model). Lookups only ever return paths found by the scan, so a request can
//! never name a file outside the directory; ids that try are rejected up front with a clear error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Why a model id cannot even be looked up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidModelId {
    #[error("model id is empty")]
    Empty,
    #[error("model id `{0}` is not a relative name inside the models directory")]
    Escapes(String),
    #[error("model id `{0}` contains characters that are not allowed")]
    BadCharacters(String),
}

/// Why a client's lookup found nothing to say about a name.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Invalid(#[from] InvalidModelId),
    #[error("models directory: {0}")]
    Io(#[from] std::io::Error),
}

/// A model file found on disk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskModel {
    /// Stable id clients use in `model` fields.
    pub id: String,
    /// Other names that resolve to this model (the `org/repo` short form).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alternate_ids: Vec<String>,
    /// Path of the (first) GGUF file; llama.cpp finds further shards beside it.
    #[serde(skip)]
    pub path: PathBuf,
    /// Bytes on disk, all shards together.
    pub size_bytes: u64,
    /// Quantisation read from the file name (`Q4_K_M`, `F16`, ...), when it says.
    pub quantization: Option<String>,
    /// Backend that serves this format.
    pub format: &'static str,
}

/// Bytes of the files directly in `dir` (an MLX model folder's weights, config and
/// tokenizer); 0 when it cannot be read.
pub fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Rejects ids that could only be an attempt to leave the models directory.
pub fn validate_id(id: &str) -> Result<(), InvalidModelId> {
    if id.trim().is_empty() {
        return Err(InvalidModelId::Empty);
    }
    if id.chars().any(|c| c.is_control() || c == '\\') {
        return Err(InvalidModelId::BadCharacters(id.to_string()));
    }
    let has_drive = id.len() >= 2 && id.as_bytes()[1] == b':';
    if id.starts_with('/') || id.starts_with('~') || has_drive {
        return Err(InvalidModelId::Escapes(id.to_string()));
    }
    if id
        .split('/')
        .any(|seg| seg == ".." || seg == "." || seg.is_empty())
    {
        return Err(InvalidModelId::Escapes(id.to_string()));
    }
    Ok(())
}

/// Reads `general.file_type`-style quantisation names out of file names.
fn quantization_from_name(stem: &str) -> Option<String> {
    stem.split(['-', '.'])
        .map(str::to_ascii_uppercase)
        .find(|part| {
            let b = part.as_bytes();
            let q = (b.first() == Some(&b'Q') && b.get(1).is_some_and(u8::is_ascii_digit))
                || (part.starts_with("IQ") && b.get(2).is_some_and(u8::is_ascii_digit));
            q || matches!(part.as_str(), "F16" | "F32" | "BF16")
        })
}

/// Splits `name-00001-of-00003` into (`name`, shard number) for multi-file GGUFs.
pub fn shard_of(stem: &str) -> Option<(&str, u32)> {
    let (head, total) = stem.rsplit_once("-of-")?;
    let (base, idx) = head.rsplit_once('-')?;
    let ok = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    (ok(idx) && ok(total)).then(|| (base, idx.parse().unwrap_or(0)))
}

/// How old the index may be when a client's request names a model that is not loaded (an
/// unknown name, a load on demand) or lists the disk: one walk of the folder a second at most,
/// whatever the number of such requests.
pub const INDEX_MAX_AGE: Duration = Duration::from_secs(1);

/// The last walk of the directory, shared by every clone of a store.
#[derive(Debug, Default)]
struct Index {
    /// When the walk began, and what it found.
    last: std::sync::RwLock<Option<(Instant, Arc<Vec<DiskModel>>)>>,
    /// Held while a walk for [`ModelStore::indexed`] runs, so callers that find the index
    /// stale together wait for one walk instead of each making their own.
    walking: tokio::sync::Mutex<()>,
}

/// The models directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    /// The format a name means when models of both formats answer to it.
    prefer: &'static str,
    index: Arc<Index>,
}

impl ModelStore {
    /// A store over `root`; the folder is created on first scan if missing.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            prefer: "gguf",
            index: Arc::default(),
        }
    }

    /// The models on disk as of a walk at most `max_age` old. A stale index is walked again
    /// on the blocking pool, once for every caller waiting then. Client requests resolve
    /// names through this: a walk per request let a stream of unknown names keep the disk
    /// and the runtime busy (1,000 folders: 1,626 -> 22 requests/s).
    pub async fn indexed(&self, max_age: Duration) -> std::io::Result<Arc<Vec<DiskModel>>> {
        let now = Instant::now();
        self.indexed_since(now.checked_sub(max_age).unwrap_or(now))
            .await
    }

    /// The models on disk as of a walk that began at `since` or later: a listing sees a file
    /// copied in just before it was asked for. Callers that ask while a walk runs share the
    /// next one.
    pub async fn fresh_index(&self) -> std::io::Result<Arc<Vec<DiskModel>>> {
        self.indexed_since(Instant::now()).await
    }

    async fn indexed_since(&self, since: Instant) -> std::io::Result<Arc<Vec<DiskModel>>> {
        if let Some(models) = self.walked_since(since) {
            return Ok(models);
        }
        let _walking = self.index.walking.lock().await;
        if let Some(models) = self.walked_since(since) {
            return Ok(models);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.walk())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    fn walked_since(&self, since: Instant) -> Option<Arc<Vec<DiskModel>>> {
        let last = self.index.last.read().expect("index lock");
        last.as_ref()
            .filter(|(began, _)| *began >= since)
            .map(|(_, m)| Arc::clone(m))
    }

    /// [`Self::find_as`] over the index (see [`Self::indexed`]), for client requests.
    pub async fn lookup(
        &self,
        id: &str,
        format: Option<&str>,
    ) -> Result<Option<DiskModel>, LookupError> {
        validate_id(id)?;
        let models = self.indexed(INDEX_MAX_AGE).await?;
        Ok(self.pick(&models, id, format))
    }

    /// The format (`gguf` or `mlx`) a name means when a folder holds the model in both.
    pub fn preferring(mut self, format: &'static str) -> Self {
        self.prefer = format;
        self
    }

    /// The directory this store reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every model on disk, sorted by id. Hidden folders (downloads in progress, quarantine)
    /// and projector files are skipped, so nothing half-made is ever listed.
    pub fn scan(&self) -> std::io::Result<Vec<DiskModel>> {
        self.walk().map(|found| found.to_vec())
    }

    /// [`Self::scan`], kept as the index (unless a walk that began later is kept already) and
    /// returned as the same shared list.
    fn walk(&self) -> std::io::Result<Arc<Vec<DiskModel>>> {
        let began = Instant::now();
        if !self.root.exists() {
            std::fs::create_dir_all(&self.root)?;
        }
        let mut found: Vec<DiskModel> = Vec::new();
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            // An MLX model is a whole folder (`name/` or `org/repo/`): listed as one model under
            // its folder's path, and not looked into further.
            // GGUF files beside it are listed too (the same model in both formats; the
            // folder's name then means the preferred one).
            let mlx_folder = depth >= 1 && crate::engine::mlx::config::is_model_dir(&dir);
            if mlx_folder {
                found.push(self.mlx_model(&dir));
            }
            let mut files: Vec<DiskModel> = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') {
                    continue;
                }
                // Follow links: models are often symlinked in from another disk.
                let Ok(meta) = std::fs::metadata(entry.path()) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth < 4 && !mlx_folder {
                        stack.push((entry.path(), depth + 1));
                    }
                    continue;
                }
                let Some(stem) = name.strip_suffix(".gguf") else {
                    continue;
                };
                if stem.to_ascii_lowercase().starts_with("mmproj") {
                    continue;
                }
                let (stem, shard) = match shard_of(stem) {
                    Some((base, n)) => (base, Some(n)),
                    None => (stem, None),
                };
                let size = meta.len();
                if let Some(existing) = files
                    .iter_mut()
                    .find(|m| m.id.rsplit('/').next() == Some(stem))
                {
                    if shard.is_some() {
                        existing.size_bytes += size;
                        if shard == Some(1) {
                            existing.path = entry.path();
                        }
                        continue;
                    }
                }
                let rel_dir = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
                let mut id = String::new();
                for c in rel_dir.components() {
                    id.push_str(&c.as_os_str().to_string_lossy());
                    id.push('/');
                }
                id.push_str(stem);
                files.push(DiskModel {
                    id,
                    alternate_ids: Vec::new(),
                    path: entry.path(),
                    size_bytes: size,
                    quantization: quantization_from_name(stem),
                    format: "gguf",
                });
            }
            if files.len() == 1 && depth >= 1 {
                let rel = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
                let short = rel.to_string_lossy().replace('\\', "/");
                files[0].alternate_ids.push(short);
            }
            found.extend(files);
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        let found = Arc::new(found);
        let mut last = self.index.last.write().expect("index lock");
        // A walk that began earlier than the one already kept (two ran at once) is older news.
        if last.as_ref().is_none_or(|(b, _)| *b <= began) {
            *last = Some((began, Arc::clone(&found)));
        }
        Ok(found)
    }

    /// An MLX model folder as a model: id from its path, size of every file in it.
    fn mlx_model(&self, dir: &Path) -> DiskModel {
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        let id = rel.to_string_lossy().replace('\\', "/");
        let size_bytes = folder_bytes(dir);
        DiskModel {
            quantization: None,
            id,
            alternate_ids: Vec::new(),
            path: dir.to_path_buf(),
            size_bytes,
            format: "mlx",
        }
    }

    /// Finds a model by id or alternate id, case-insensitively (clients lower-case ids); when
    /// both formats answer, the preferred one.
    pub fn find(&self, id: &str) -> Result<Option<DiskModel>, InvalidModelId> {
        self.find_as(id, None)
    }

    /// [`Self::find`] limited to one format (`gguf`, `mlx`) when `format` names one.
    pub fn find_as(
        &self,
        id: &str,
        format: Option<&str>,
    ) -> Result<Option<DiskModel>, InvalidModelId> {
        validate_id(id)?;
        let models = self.scan().unwrap_or_default();
        Ok(self.pick(&models, id, format))
    }

    /// The model `id` names among `models`: exact before case-insensitive, the preferred
    /// format before the other.
    fn pick(&self, models: &[DiskModel], id: &str, format: Option<&str>) -> Option<DiskModel> {
        let mut models: Vec<&DiskModel> = models
            .iter()
            .filter(|m| format.is_none_or(|f| m.format == f))
            .collect();
        // The preferred format first, so it wins a name both answer to.
        models.sort_by_key(|m| m.format != self.prefer);
        let matches = |m: &DiskModel, exact: bool| {
            let eq = |a: &str| {
                if exact {
                    a == id
                } else {
                    a.eq_ignore_ascii_case(id)
                }
            };
            eq(&m.id) || m.alternate_ids.iter().any(|a| eq(a))
        };
        models
            .iter()
            .find(|m| matches(m, true))
            .or_else(|| models.iter().find(|m| matches(m, false)))
            .map(|m| (*m).clone())
    }
}

/// Why a delete did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The model's folder is a link that other models are listed under too.
    #[error("`{model}` is reached through the linked folder `{link}`, which also holds {others}; remove the link yourself")]
    SharedLink {
        model: String,
        link: String,
        others: String,
    },
    /// A path that resolves outside the models directory (never touched).
    #[error("`{0}` resolves outside the models directory; nothing was deleted")]
    Outside(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ModelStore {
    /// Deletes an MLX model's folder (only the link, when the folder is a link).
    fn delete_folder(&self, model: &DiskModel) -> Result<Vec<PathBuf>, DeleteError> {
        let dir = &model.path;
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(dir)?;
            return Ok(vec![dir.clone()]);
        }
        if !self.resolves_inside(dir)? || self.linked_folder(dir).is_some() {
            return Err(DeleteError::Outside(model.id.clone()));
        }
        std::fs::remove_dir_all(dir)?;
        Ok(vec![dir.clone()])
    }

    /// Whether `path` (or, when it does not exist yet, its nearest existing ancestor) is
    /// inside the models directory once every link is resolved.
    pub fn resolves_inside(&self, path: &Path) -> std::io::Result<bool> {
        let root = std::fs::canonicalize(&self.root)?;
        let mut p = path;
        loop {
            match std::fs::canonicalize(p) {
                Ok(real) => return Ok(real.starts_with(&root)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                    Some(parent) => p = parent,
                    None => return Ok(false),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// The first folder between the models directory and `dir` that is a symbolic link.
    fn linked_folder(&self, dir: &Path) -> Option<PathBuf> {
        let rel = dir.strip_prefix(&self.root).ok()?;
        let mut p = self.root.clone();
        for c in rel.components() {
            p.push(c);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                return Some(p);
            }
        }
        None
    }

    /// Deletes a scanned model's files (every shard of a split model), then the folders it
    /// leaves empty, up to the models directory. Links are removed, never what they point to:
    /// a linked model file loses its link, and a model inside a linked folder loses that
    /// folder link (refused when other models are listed under the same link).
    pub fn delete(&self, model: &DiskModel) -> Result<Vec<PathBuf>, DeleteError> {
        if model.format == "mlx" {
            return self.delete_folder(model);
        }
        let dir = model.path.parent().unwrap_or(&self.root).to_path_buf();
        let shown = |p: &Path| {
            p.strip_prefix(&self.root)
                .unwrap_or(p)
                .display()
                .to_string()
        };
        if let Some(link) = self.linked_folder(&dir) {
            let others: Vec<String> = self
                .scan()?
                .into_iter()
                .filter(|m| m.id != model.id && m.path.starts_with(&link))
                .map(|m| m.id)
                .collect();
            if !others.is_empty() {
                return Err(DeleteError::SharedLink {
                    model: model.id.clone(),
                    link: shown(&link),
                    others: others.join(", "),
                });
            }
            std::fs::remove_file(&link)?;
            return Ok(vec![link]);
        }
        if !self.resolves_inside(&dir)? {
            return Err(DeleteError::Outside(shown(&dir)));
        }
        let name = model
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let stem = name.as_deref().and_then(|n| n.strip_suffix(".gguf"));
        let base = stem.and_then(shard_of).map(|(b, _)| b.to_string());
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let n = entry.file_name().to_string_lossy().into_owned();
            let Some(s) = n.strip_suffix(".gguf") else {
                continue;
            };
            let same = match &base {
                Some(b) => shard_of(s).is_some_and(|(x, _)| x == b),
                None => Some(n.as_str()) == name.as_deref(),
            };
            if same {
                // `remove_file` on a link removes the link itself.
                std::fs::remove_file(entry.path())?;
                removed.push(entry.path());
            }
        }
        let mut d = dir.as_path();
        while d != self.root && d.starts_with(&self.root) {
            if std::fs::remove_dir(d).is_err() {
                break; // not empty
            }
            d = d.parent().unwrap_or(&self.root);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path, bytes: usize) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, vec![0u8; bytes]).unwrap();
    }

    #[test]
    fn rejects_escaping_ids() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "~/x",
            "C:/x",
            "a\\b",
            "a//b",
            "./a",
        ] {
            assert!(validate_id(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(validate_id(""), Err(InvalidModelId::Empty));
        for good in ["gemma-3-270m-q4_k_m", "org/repo", "org/repo/model.Q4"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_folder_with_both_formats_answers_with_the_preferred_one() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        touch(&r.join("qwen/config.json"), 2);
        touch(&r.join("qwen/tokenizer.json"), 2);
        touch(&r.join("qwen/model.safetensors"), 100);
        touch(&r.join("qwen/qwen-Q4_K_M.gguf"), 50);
        let ids: Vec<(String, &str)> = ModelStore::new(r)
            .scan()
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.format))
            .collect();
        assert_eq!(
            ids,
            [("qwen".into(), "mlx"), ("qwen/qwen-Q4_K_M".into(), "gguf")]
        );
        let gguf = ModelStore::new(r);
        assert_eq!(gguf.find("qwen").unwrap().unwrap().format, "gguf");
        let mlx = ModelStore::new(r).preferring("mlx");
        assert_eq!(mlx.find("qwen").unwrap().unwrap().format, "mlx");
        assert_eq!(
            gguf.find_as("qwen", Some("mlx")).unwrap().unwrap().id,
            "qwen"
        );
        assert!(gguf
            .find_as("qwen/qwen-Q4_K_M", Some("mlx"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn scans_flat_and_nested_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        touch(&r.join("gemma-3-270m-q4_k_m.gguf"), 10);
        touch(
            &r.join("lmstudio-community/Llama-3-GGUF/Llama-3-Q8_0.gguf"),
            20,
        );
        touch(&r.join("org/multi/a-Q4_K_M.gguf"), 1);
        touch(&r.join("org/multi/a-Q8_0.gguf"), 2);
        touch(&r.join("org/multi/mmproj-a-f16.gguf"), 3);
        touch(&r.join("org/split/big-00001-of-00002.gguf"), 5);
        touch(&r.join("org/split/big-00002-of-00002.gguf"), 6);
        touch(&r.join(".downloads/x/half.gguf"), 1);
        touch(&r.join("notes.txt"), 1);
        let store = ModelStore::new(r);
        let models = store.scan().unwrap();
        let ids: Vec<_> = models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "gemma-3-270m-q4_k_m",
                "lmstudio-community/Llama-3-GGUF/Llama-3-Q8_0",
                "org/multi/a-Q4_K_M",
                "org/multi/a-Q8_0",
                "org/split/big"
            ]
        );
        let gemma = &models[0];
        assert_eq!(gemma.size_bytes, 10);
        assert_eq!(gemma.quantization.as_deref(), Some("Q4_K_M"));
        assert_eq!(models[1].alternate_ids, ["lmstudio-community/Llama-3-GGUF"]);
        assert!(models[2].alternate_ids.is_empty());
        let split = &models[4];
        assert_eq!(split.size_bytes, 11);
        assert!(split.path.ends_with("big-00001-of-00002.gguf"));

        let found = store
            .find("lmstudio-community/llama-3-gguf")
            .unwrap()
            .unwrap();
        assert_eq!(found.id, "lmstudio-community/Llama-3-GGUF/Llama-3-Q8_0");
        assert!(store.find("missing").unwrap().is_none());
        assert!(store.find("../gemma-3-270m-q4_k_m").is_err());

        let removed = store.delete(&models[4]).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!r.join("org/split").exists(), "empty folder left behind");
        store.delete(&models[2]).unwrap();
        assert!(r.join("org/multi/a-Q8_0.gguf").exists());
        assert!(!r.join("org/multi/a-Q4_K_M.gguf").exists());
        assert!(r.join("org").exists());
    }

    #[test]
    fn deleting_a_link_keeps_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("real.gguf");
        touch(&target, 4);
        std::os::unix::fs::symlink(&target, dir.path().join("linked.gguf")).unwrap();
        let store = ModelStore::new(dir.path());
        let m = store.find("linked").unwrap().unwrap();
        store.delete(&m).unwrap();
        assert!(target.exists());
        assert!(store.scan().unwrap().is_empty());
    }

    #[test]
    fn a_model_in_a_linked_folder_loses_the_link_never_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("real.gguf");
        touch(&target, 4);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("evil")).unwrap();
        let store = ModelStore::new(dir.path());
        let m = store.find("evil/real").unwrap().unwrap();
        assert!(!store.resolves_inside(&m.path).unwrap());
        let removed = store.delete(&m).unwrap();
        assert_eq!(removed, [dir.path().join("evil")]);
        assert!(target.exists(), "the target outside was deleted");
        assert!(store.scan().unwrap().is_empty());

        // Two models behind one link: neither delete may take the other with it.
        touch(&outside.path().join("second.gguf"), 4);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("shared")).unwrap();
        let m = store.find("shared/real").unwrap().unwrap();
        let err = store.delete(&m).unwrap_err();
        assert!(matches!(err, DeleteError::SharedLink { .. }), "{err}");
        assert!(err.to_string().contains("shared/second"), "{err}");
        assert!(target.exists() && dir.path().join("shared").exists());
    }
}
