//! The disk tier of the prefix cache: a sequence's KV state for a token prefix, kept in a file
//! so that an agent's long system prompt and tool list survive an eviction, an unload or a
//! restart, and a later request that starts with the same tokens skips computing them.
//!
//! Files live under `<root>/<layout>/<prefix>.kv`. `<layout>` is a hash of everything that
//! makes a saved state loadable: the engine's state format, the model's SHA-256, the context
//! per sequence and the KV cache types. llama.cpp's files are read and written here; the MLX
//! worker writes the same format itself (its state is mlx-lm's safetensors form of a cache),
//! under a layout this module keys, and both sit under one bound. A file holds a header (magic, the layout hash,
//! the tokens, the state's length and SHA-256) and the state; one that is truncated, altered
//! or made under another layout is deleted, never loaded. The whole root is kept under a size
//! bound, least recently used files first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::engine::TokenId;

const MAGIC: &[u8; 8] = b"OPTAKV01";
/// Bumped when the state format llama.cpp writes may change (the crate pins llama.cpp).
pub const STATE_FORMAT: &str = "llama-cpp-sys-2=0.1.161 state-seq-v4";

/// Settings of the disk tier.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskCacheConfig {
    pub root: PathBuf,
    /// Bound on every file under `root`, all models together.
    pub max_bytes: u64,
    /// Shorter prefixes are not worth a file.
    pub min_tokens: usize,
}

/// What a saved state must match to be loaded into a context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Who wrote the state and in what form ([`STATE_FORMAT`] for llama.cpp; the MLX worker
    /// has its own), so one engine never reads the other's files.
    pub state_format: &'static str,
    pub model_sha256: String,
    pub context_per_sequence: u32,
    pub type_k: String,
    pub type_v: String,
}

impl Layout {
    /// The layout's hash, which names its directory and is stored in each file.
    pub fn key(&self) -> [u8; 32] {
        // The state format first, as when it was a constant: llama.cpp's files keep their keys.
        let mut h = Sha256::new();
        for part in [
            self.state_format,
            &self.model_sha256,
            &self.context_per_sequence.to_string(),
            &self.type_k,
            &self.type_v,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }
}

/// One saved prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    pub tokens: Vec<TokenId>,
}

/// The files of one model's layout, indexed by their tokens.
#[derive(Debug)]
pub struct DiskCache {
    cfg: DiskCacheConfig,
    dir: PathBuf,
    key: [u8; 32],
    entries: Vec<Entry>,
}

/// Why a file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a prompt-cache file of this layout")]
    Foreign,
    #[error("truncated or altered: {0}")]
    Corrupt(&'static str),
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads a file's header: its tokens, after checking magic and layout.
fn read_header(r: &mut impl Read, key: &[u8; 32]) -> Result<Vec<TokenId>, CacheFileError> {
    let mut magic = [0u8; 8];
    let mut layout = [0u8; 32];
    r.read_exact(&mut magic)
        .map_err(|_| CacheFileError::Corrupt("no header"))?;
    r.read_exact(&mut layout)
        .map_err(|_| CacheFileError::Corrupt("no header"))?;
    if &magic != MAGIC || &layout != key {
        return Err(CacheFileError::Foreign);
    }
    let n = read_u32(r).map_err(|_| CacheFileError::Corrupt("no token count"))? as usize;
    if n > 1 << 24 {
        return Err(CacheFileError::Corrupt("absurd token count"));
    }
    let mut raw = vec![0u8; n * 4];
    r.read_exact(&mut raw)
        .map_err(|_| CacheFileError::Corrupt("tokens cut short"))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The bytes of a file: header, then state length, state SHA-256 and state.
fn encode(key: &[u8; 32], tokens: &[TokenId], state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(state.len() + tokens.len() * 4 + 128);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(key);
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(state));
    out.extend_from_slice(state);
    out
}

/// A file's tokens and state, after every check.
pub fn read_file(path: &Path, key: &[u8; 32]) -> Result<(Vec<TokenId>, Vec<u8>), CacheFileError> {
    let mut f = File::open(path)?;
    let tokens = read_header(&mut f, key)?;
    let mut len = [0u8; 8];
    let mut digest = [0u8; 32];
    f.read_exact(&mut len)
        .map_err(|_| CacheFileError::Corrupt("no state length"))?;
    f.read_exact(&mut digest)
        .map_err(|_| CacheFileError::Corrupt("no state hash"))?;
    let len = u64::from_le_bytes(len);
    let rest = f.metadata()?.len();
    let header = (8 + 32 + 4 + tokens.len() * 4 + 8 + 32) as u64;
    if rest != header + len {
        return Err(CacheFileError::Corrupt("length does not match"));
    }
    let mut state = vec![0u8; len as usize];
    f.read_exact(&mut state)
        .map_err(|_| CacheFileError::Corrupt("state cut short"))?;
    if Sha256::digest(&state).as_slice() != digest {
        return Err(CacheFileError::Corrupt("state hash does not match"));
    }
    Ok((tokens, state))
}

/// Name of the file for a token prefix.
fn file_name(tokens: &[TokenId]) -> String {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    format!("{}.kv", &hex::encode(h.finalize())[..24])
}

impl DiskCache {
    /// Opens the layout's directory, indexing its files; files of another layout, and ones
    /// whose header cannot be read, are deleted.
    pub fn open(cfg: DiskCacheConfig, layout: &Layout) -> std::io::Result<Self> {
        let key = layout.key();
        let dir = layout_dir(&cfg.root, &key);
        std::fs::create_dir_all(&dir)?;
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&path); // a write cut short by a crash
                continue;
            }
            let header = File::open(&path)
                .map_err(CacheFileError::from)
                .and_then(|mut f| read_header(&mut f, &key));
            match header {
                Ok(tokens) => entries.push(Entry { path, tokens }),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "prompt cache: deleting an unusable file");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            cfg,
            dir,
            key,
            entries,
        })
    }

    /// Files indexed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no file is indexed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Prefixes shorter than this are not saved.
    pub fn min_tokens(&self) -> usize {
        self.cfg.min_tokens
    }

    /// The file whose tokens share the longest prefix with `prompt`, and that length (capped
    /// at `cap`).
    pub fn best(&self, prompt: &[TokenId], cap: usize) -> Option<(Entry, usize)> {
        self.entries
            .iter()
            .map(|e| {
                (
                    e,
                    crate::engine::scheduler::common_prefix(&e.tokens, prompt).min(cap),
                )
            })
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(_, n)| n)
            .map(|(e, n)| (e.clone(), n))
    }

    /// Whether `tokens` is already held (by a file with these tokens or more). Entries whose
    /// file the size bound removed (any model's save trims the whole root) are forgotten
    /// first, so a trimmed prefix is written again rather than taken as held.
    pub fn holds(&mut self, tokens: &[TokenId]) -> bool {
        self.prune_missing();
        self.entries
            .iter()
            .any(|e| e.tokens.len() >= tokens.len() && e.tokens[..tokens.len()] == *tokens)
    }

    /// Loads a file's state for a restore, marking it used; a bad or missing file is deleted
    /// and forgotten.
    pub fn load(&mut self, entry: &Entry) -> Option<Vec<u8>> {
        match read_file(&entry.path, &self.key) {
            Ok((tokens, state)) if tokens == entry.tokens => {
                if let Ok(f) = File::options().append(true).open(&entry.path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(state)
            }
            Ok(_) => {
                self.drop_entry(&entry.path, "tokens differ from the index");
                None
            }
            Err(e) => {
                self.drop_entry(&entry.path, &e.to_string());
                None
            }
        }
    }

    /// Deletes and forgets a file that turned out unusable.
    pub fn drop_entry(&mut self, path: &Path, why: &str) {
        tracing::warn!(file = %path.display(), reason = why, "prompt cache: deleting an unusable file");
        let _ = std::fs::remove_file(path);
        self.entries.retain(|e| e.path != path);
    }

    /// Saves `state` for `tokens` and returns the writer's handle (the caller may wait on it).
    /// Files whose tokens the new one extends are superseded and deleted. The write goes to a
    /// temporary name first, so a crash never leaves a half file under a real name; then the
    /// root is trimmed to its bound.
    pub fn save(&mut self, tokens: Vec<TokenId>, state: Vec<u8>) -> std::thread::JoinHandle<()> {
        let path = self.dir.join(file_name(&tokens));
        let superseded: Vec<PathBuf> = self
            .entries
            .iter()
            .filter(|e| e.tokens.len() < tokens.len() && tokens[..e.tokens.len()] == e.tokens[..])
            .map(|e| e.path.clone())
            .collect();
        self.entries.retain(|e| !superseded.contains(&e.path));
        self.entries.retain(|e| e.path != path);
        let bytes = encode(&self.key, &tokens, &state);
        self.entries.push(Entry {
            path: path.clone(),
            tokens,
        });
        let (root, max) = (self.cfg.root.clone(), self.cfg.max_bytes);
        std::thread::spawn(move || {
            let tmp = path.with_extension("tmp");
            let written = File::create(&tmp)
                .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
                .and_then(|()| std::fs::rename(&tmp, &path));
            match written {
                Ok(()) => {
                    tracing::debug!(file = %path.display(), bytes = bytes.len(), "prompt cache: saved");
                    for old in superseded {
                        let _ = std::fs::remove_file(old);
                    }
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::warn!(file = %path.display(), error = %e, "prompt cache: could not save");
                }
            }
            trim(&root, max);
        })
    }

    /// Forgets index entries whose files trimming removed.
    fn prune_missing(&mut self) {
        self.entries.retain(|e| e.path.exists());
    }
}

/// Deletes the least recently used files under `root` until the rest fit in `max` bytes.
pub fn trim(root: &Path, max: u64) {
    let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root) else {
        return;
    };
    for d in dirs.flatten() {
        let Ok(inner) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in inner.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|x| x != "kv") {
                continue;
            }
            if let Ok(m) = f.metadata() {
                files.push((
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    path,
                ));
            }
        }
    }
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            tracing::debug!(file = %path.display(), "prompt cache: evicted to stay under its bound");
            total -= len;
        }
    }
}

/// The directory a layout's files live in.
pub fn layout_dir(root: &Path, key: &[u8; 32]) -> PathBuf {
    root.join(&hex::encode(key)[..16])
}

/// One hash for a model folder's weights (an MLX model's `*.safetensors` files, in name
/// order), each file's hash remembered as [`model_sha256`] remembers it.
pub fn weights_sha256(root: &Path, dir: &Path) -> std::io::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(std::io::Error::other("no .safetensors files"));
    }
    let mut h = Sha256::new();
    for f in files {
        h.update(model_sha256(root, &f)?.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// SHA-256 of a model file, remembered in `<root>/model-hashes.json` by path, size and
/// modification time so a restart does not read the whole file again.
pub fn model_sha256(root: &Path, model: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(model)?;
    let stamp = format!(
        "{}:{}:{}",
        std::fs::canonicalize(model)?.display(),
        meta.len(),
        meta.modified()?
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let index = root.join("model-hashes.json");
    let mut known: HashMap<String, String> = std::fs::read(&index)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(h) = known.get(&stamp) {
        return Ok(h.clone());
    }
    let mut f = File::open(model)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = hex::encode(h.finalize());
    known.insert(stamp, digest.clone());
    std::fs::create_dir_all(root)?;
    let tmp = index.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&known)?)?;
    std::fs::rename(tmp, index)?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(ctx: u32) -> Layout {
        Layout {
            state_format: STATE_FORMAT,
            model_sha256: "abc".into(),
            context_per_sequence: ctx,
            type_k: "f16".into(),
            type_v: "f16".into(),
        }
    }

    fn cfg(root: &Path, max: u64) -> DiskCacheConfig {
        DiskCacheConfig {
            root: root.to_path_buf(),
            max_bytes: max,
            min_tokens: 4,
        }
    }

    #[test]
    fn saved_prefixes_reload_and_bad_files_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = DiskCache::open(cfg(dir.path(), 1 << 30), &layout(1024)).unwrap();
        c.save(vec![1, 2, 3, 4, 5], vec![7u8; 1000]).join().unwrap();
        // A longer prefix supersedes the shorter one.
        c.save(vec![1, 2, 3, 4, 5, 6, 7], vec![8u8; 1000])
            .join()
            .unwrap();
        assert_eq!(c.entries.len(), 1);
        assert!(c.holds(&[1, 2, 3]));
        assert!(!c.holds(&[1, 2, 9]));
        let (e, n) = c.best(&[1, 2, 3, 4, 9], 4).unwrap();
        assert_eq!(n, 4);
        assert_eq!(c.load(&e), Some(vec![8u8; 1000]));

        // Reopened: indexed again. Another layout sees none of it.
        let mut c = DiskCache::open(cfg(dir.path(), 1 << 30), &layout(1024)).unwrap();
        assert_eq!(c.entries.len(), 1);
        let other = DiskCache::open(cfg(dir.path(), 1 << 30), &layout(2048)).unwrap();
        assert!(other.entries.is_empty());

        // Truncated: refused at load, and deleted.
        let e = c.entries[0].clone();
        let len = std::fs::metadata(&e.path).unwrap().len();
        let f = File::options().write(true).open(&e.path).unwrap();
        f.set_len(len - 10).unwrap();
        assert_eq!(c.load(&e), None);
        assert!(!e.path.exists());
        assert!(c.entries.is_empty());

        // A foreign file in the directory is deleted when the directory is opened.
        let foreign = c.dir.join("x.kv");
        std::fs::write(&foreign, b"not ours at all, not at all").unwrap();
        let c = DiskCache::open(cfg(dir.path(), 1 << 30), &layout(1024)).unwrap();
        assert!(c.entries.is_empty());
        assert!(!foreign.exists());
    }

    #[test]
    fn an_altered_state_is_caught_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = DiskCache::open(cfg(dir.path(), 1 << 30), &layout(64)).unwrap();
        c.save(vec![5; 10], vec![1u8; 500]).join().unwrap();
        let e = c.entries[0].clone();
        let mut bytes = std::fs::read(&e.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&e.path, bytes).unwrap();
        assert_eq!(c.load(&e), None);
        assert!(!e.path.exists());
    }

    #[test]
    fn the_root_stays_under_its_bound_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = DiskCache::open(cfg(dir.path(), 2500), &layout(64)).unwrap();
        for i in 0..5 {
            c.save(vec![i; 8], vec![0u8; 1000]).join().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let total: u64 = std::fs::read_dir(&c.dir)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(total <= 2500, "{total}");
        // The newest survive; the trimmed ones are no longer taken as held.
        assert!(c.holds(&[4; 8]));
        assert!(!c.holds(&[0; 8]));
    }

    #[test]
    fn model_hashes_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let h = model_sha256(dir.path(), &model).unwrap();
        assert_eq!(h, hex::encode(Sha256::digest(b"weights")));
        assert!(dir.path().join("model-hashes.json").exists());
        assert_eq!(model_sha256(dir.path(), &model).unwrap(), h);
    }
}
