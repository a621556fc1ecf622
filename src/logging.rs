//! Log setup: text or JSON lines, to standard error or a file. Request bodies, prompts and
//! keys are never logged anywhere in the server; this module only decides where lines go.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. llama.cpp's own chatter is kept at `warn` unless the
/// filter names it.
pub fn init(cfg: &LoggingConfig) -> anyhow::Result<()> {
    let mut filter = cfg.level.clone();
    if !filter.contains("llama_cpp_2") {
        filter.push_str(",llama_cpp_2=warn");
    }
    let filter = EnvFilter::try_new(&filter)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match (&cfg.file, cfg.format) {
        (Some(path), format) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let b = builder.with_writer(Mutex::new(file)).with_ansi(false);
            match format {
                LogFormat::Json => b.json().try_init(),
                LogFormat::Text => b.try_init(),
            }
        }
        (None, LogFormat::Json) => builder.json().with_writer(std::io::stderr).try_init(),
        (None, LogFormat::Text) => builder
            .with_writer(std::io::stderr)
            // Colour codes only for a terminal; a redirected log stays greppable.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("could not set up logging: {e}"))
}
