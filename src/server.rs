//! Server lifecycle: bind first (a busy port fails at once), load the start-up models, serve
//! until SIGTERM or Ctrl-C, let in-flight requests drain, then free every model.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::models::downloads::Downloads;
use crate::models::hub::HubClient;
use crate::models::registry::{LoadOverrides, Registry};
use crate::models::store::ModelStore;

/// Runs the server with a finished configuration until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let addr = SocketAddr::new(config.server.host, config.server.port);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {addr}: the port is already in use (is another server running? choose another with --port)")
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })?;

    let registry = Arc::new(Registry::new(Arc::clone(&config)));
    registry.spawn_reaper();
    let downloads = Downloads::new(
        ModelStore::new(&config.models.directory).preferring(config.models.prefer.as_str()),
        HubClient::new(&config.hub),
    );
    let store_root = registry.store().root().to_path_buf();
    registry
        .store()
        .scan()
        .with_context(|| format!("cannot read models directory {}", store_root.display()))?;
    for id in &config.models.load_at_start {
        match registry.load(id, &LoadOverrides::default()).await {
            Ok(r) => tracing::info!(model = %r.model_id, "loaded at start"),
            Err(e) => {
                tracing::error!(model = %id, error = %e, "could not load model at start; serving without it")
            }
        }
    }

    let state = AppState::new(Arc::clone(&config), Arc::clone(&registry), downloads);
    tracing::info!(
        address = %listener.local_addr()?,
        models_directory = %store_root.display(),
        version = env!("CARGO_PKG_VERSION"),
        "opta-lmx listening"
    );
    if let Some(n) = crate::system::raise_open_files_limit() {
        tracing::debug!(open_files = n, "open-files limit");
    }
    crate::api::serve::serve(listener, router(state), &config.server, shutdown_signal()).await?;
    tracing::info!("draining done; unloading models");
    registry.unload_all().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
