//! The tests' local Hugging Face Hub as a program, for `bench/download.sh` and for trying
//! downloads by hand where the real Hub cannot be reached:
//!
//! `fake_hub ORG/REPO FILE...` serves the files (by their base names, LFS-style with real
//! SHA-256s) and prints its base URL; point `HF_ENDPOINT` at it.

#[path = "../tests/common/hub.rs"]
mod hub;

use hub::{FakeFile, FakeHub, FakeRepo, HubOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let repo = args.next().expect("usage: fake_hub ORG/REPO FILE...");
    let files: Vec<FakeFile> = args
        .map(|p| {
            let name = std::path::Path::new(&p)
                .file_name()
                .expect("a file path")
                .to_string_lossy()
                .into_owned();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
            FakeFile::lfs(&name, data)
        })
        .collect();
    for f in &files {
        eprintln!("{} {} bytes sha256 {}", f.path, f.data.len(), f.sha256());
    }
    let hub = FakeHub::start(vec![FakeRepo::new(&repo, files)], HubOptions::default());
    println!("{}", hub.base);
    loop {
        std::thread::park();
    }
}
