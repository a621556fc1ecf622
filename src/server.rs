//! Server lifecycle: bind first (a busy port fails at once), load the start-up models, serve
//! until SIGTERM or Ctrl-C, let in-flight requests drain, then free every model.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::api::{router, AppState};
use crate::audit::Audit;
use crate::config::Config;
use crate::models::downloads::Downloads;
use crate::models::hub::HubClient;
use crate::models::registry::{LoadOverrides, Registry};
use crate::models::store::ModelStore;

/// Runs the server with a finished configuration until a shutdown signal. `reread` reads the
/// configuration again as it was made (for `POST /admin/config/reload` and SIGHUP).
pub async fn run(
    config: Config,
    reread: Option<Arc<crate::api::admin::reload::Reread>>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let addr = SocketAddr::new(config.server.host, config.server.port);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {addr}: the port is already in use (is another server running? choose another with --port)")
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })?;

    let shutdown = shutdown_signal()?;
    let tls = match &config.server.tls {
        Some(t) => Some(crate::api::http::tls::acceptor(t)?),
        None => None,
    };
    warn_if_exposed(&config);
    apply_engine_settings(&config);
    let audit = Arc::new(match config.audit_path() {
        Some(path) => Audit::open(&path)
            .with_context(|| format!("cannot open the audit log {}", path.display()))?,
        None => Audit::disabled(),
    });
    let registry = Arc::new(Registry::new(Arc::clone(&config)));
    registry.spawn_reaper();
    let downloads = Downloads::new(
        ModelStore::new(&config.models.directory).preferring(config.models.prefer.as_str()),
        HubClient::new(&config.hub),
        registry.metrics().clone(),
        Arc::clone(&audit),
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

    let mut state = AppState::new(Arc::clone(&registry), downloads, Arc::clone(&audit));
    state.reread = reread;
    // Kept until the server stops: dropping it withdraws the advertisement.
    let advert = {
        use crate::api::http::mdns::{advertise, Outcome};
        let hostname = sysinfo::System::host_name().unwrap_or_default();
        let auth =
            crate::api::auth::inference_key_required(&config) || config.server.admin_key.is_some();
        match advertise(&config.server, &hostname, auth) {
            Outcome::Advertised(a) => {
                tracing::info!(instance = %a.fullname, "advertised on the LAN (mDNS)");
                state.mdns = Some(a.fullname.clone());
                Some(a)
            }
            Outcome::Off(why) => {
                tracing::debug!(reason = why, "not advertised on the LAN");
                None
            }
            Outcome::Failed(e) => {
                tracing::warn!(error = %e, "could not advertise on the LAN (mDNS); serving without it");
                None
            }
        }
    };
    reload_on_sighup(state.clone());
    tracing::info!(
        address = %listener.local_addr()?,
        scheme = if tls.is_some() { "https" } else { "http" },
        models_directory = %store_root.display(),
        audit_log = %audit.path().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into()),
        version = env!("CARGO_PKG_VERSION"),
        "opta-lmx listening"
    );
    if let Some(n) = crate::system::raise_open_files_limit() {
        tracing::debug!(open_files = n, "open-files limit");
    }
    // systemd's Type=notify: ready once the port is bound and the start-up models are in.
    // Outside systemd (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd the server is ready");
    }
    crate::api::http::serve::serve(listener, router(state), &config.server, tls, shutdown).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    drop(advert);
    tracing::info!("draining done; unloading models");
    registry.unload_all().await;
    Ok(())
}

/// The engine-wide settings the configuration holds (process globals the schedulers read),
/// at start and after every reload.
pub fn apply_engine_settings(config: &Config) {
    crate::engine::llama::set_pick_limit(std::time::Duration::from_millis(
        config.requests.grammar_ms_per_token,
    ));
    crate::engine::admission::set_age_step(std::time::Duration::from_secs_f64(
        config.requests.priority_aging_seconds,
    ));
    crate::engine::admission::set_priorities(config.requests.priorities);
}

/// SIGHUP reloads the configuration, as daemons do (`systemctl reload`, `kill -HUP`); the
/// outcome goes to the log, the audit log and `/admin/events`.
fn reload_on_sighup(state: AppState) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/config/reload");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let ok = crate::api::admin::reload::run(&state, "sighup")
                    .await
                    .is_ok();
                let mut e = crate::audit::AuditEvent::now(
                    "config_reload",
                    if ok { "ok" } else { "refused" },
                );
                e.route = Some("SIGHUP".into());
                state.audit.record(&e);
            }
        });
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// A server reachable from other machines with no admin key lets anyone on the network use
/// it; loopback-only admin still holds, but say so loudly at every start.
fn warn_if_exposed(config: &Config) {
    let s = &config.server;
    if !s.host.is_loopback() && s.admin_key.is_none() {
        tracing::warn!(
            host = %s.host,
            api_key_set = s.api_key.is_some(),
            "SECURITY: listening on a non-loopback address without an admin key; anyone who can reach this port can use the models{}. Set server.admin_key (OPTA_LMX_ADMIN_KEY) or bind 127.0.0.1.",
            if s.api_key.is_none() { " without any key" } else { "" }
        );
    }
}

/// Listeners for SIGTERM and SIGINT, installed when this is called: a signal that arrives
/// between the readiness notice and the serve loop's first poll must drain the server, not
/// kill it (systemd may send SIGTERM right after READY). The future completes on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::info!("shutdown requested; finishing in-flight requests");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown requested; finishing in-flight requests");
        })
    }
}
