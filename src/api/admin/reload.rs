//! Config reload (`POST /admin/config/reload`, SIGHUP): the configuration is read again the
//! way the server was started (the file, then the environment, then the command line's
//! flags) and put in effect whole, so keys, client limits, aliases, presets and per-model
//! settings for future loads change without a restart and without touching what is loaded. A
//! file that does not parse or check is refused with the file, the key and the reason, and the
//! running configuration stays. Settings read only at start (the listener, TLS, the models
//! folder, logging) are reported as needing a restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::config::Config;

/// Reads the configuration again (the file, the environment and the start's flags).
pub type Reread = dyn Fn() -> Result<Config, String> + Send + Sync;

/// What a reload changed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// The coding CLI's `LmxConfigReloadResult`: `success` and the keys `updated`.
    pub success: bool,
    /// Dotted keys whose values changed (names only: values may be keys).
    pub updated: Vec<String>,
    /// Of those, the ones read only at start: they take effect after a restart.
    pub restart_required: Vec<String>,
}

/// Keys (and key prefixes) the server reads only when it starts.
const AT_START: [&str; 12] = [
    "hub",
    "server.host",
    "server.port",
    "server.tls",
    "server.max_connections",
    "server.h2_max_streams",
    "server.header_timeout_seconds",
    "requests.max_body_bytes",
    "models.directory",
    "models.mlx",
    "logging",
    "audit",
];

/// `POST /admin/config/reload`.
pub async fn reload(State(state): State<AppState>) -> Result<Json<ReloadReport>, ApiError> {
    Ok(Json(run(&state, "http").await?))
}

/// [`apply`] on the blocking pool (it reads the file): for every trigger, HTTP or SIGHUP.
pub async fn run(state: &AppState, trigger: &'static str) -> Result<ReloadReport, ApiError> {
    let s = state.clone();
    tokio::task::spawn_blocking(move || apply(&s, trigger))
        .await
        .map_err(|e| ApiError::Internal(format!("config reload: {e}")))?
}

/// Reads the configuration again and puts it in effect; `trigger` (`http`, `sighup`) goes
/// into the log and the event.
fn apply(state: &AppState, trigger: &str) -> Result<ReloadReport, ApiError> {
    let Some(reread) = &state.reread else {
        return Err(ApiError::Other {
            status: StatusCode::CONFLICT,
            message: "this server has no configuration source to read again".into(),
            code: "config_reload_unavailable",
        });
    };
    let new = match reread() {
        Ok(c) => c,
        Err(reason) => {
            tracing::warn!(event = "config_reload_refused", trigger, %reason, "the configuration was not reloaded; the running one stays");
            return Err(ApiError::Other {
                status: StatusCode::BAD_REQUEST,
                message: format!("configuration not reloaded (the running one stays): {reason}"),
                code: "config_invalid",
            });
        }
    };
    let old = state.config();
    let updated = changed_keys(&old, &new);
    let restart_required: Vec<String> = updated
        .iter()
        .filter(|k| {
            AT_START
                .iter()
                .any(|p| *k == p || k.starts_with(&format!("{p}.")))
        })
        .cloned()
        .collect();
    crate::server::apply_engine_settings(&new);
    state.registry.set_config(Arc::new(new));
    tracing::info!(event = "config_reloaded", trigger, updated = ?updated, restart_required = ?restart_required);
    state.metrics.events().emit(
        "config_reloaded",
        serde_json::json!({"trigger": trigger, "updated": updated, "restart_required": restart_required}),
    );
    Ok(ReloadReport {
        success: true,
        updated,
        restart_required,
    })
}

/// The dotted keys whose values differ (objects compared key by key, lists whole).
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let flat = |c: &Config| {
        let mut out = BTreeMap::new();
        flatten("", &serde_json::to_value(c).unwrap_or_default(), &mut out);
        out
    };
    let (a, b) = (flat(old), flat(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_what_changed_and_nothing_else() {
        let old = Config::default();
        let mut new = old.clone();
        new.server.api_key = Some("k".into());
        new.requests.priorities = !old.requests.priorities;
        new.server.port = old.server.port + 1;
        assert_eq!(
            changed_keys(&old, &new),
            ["requests.priorities", "server.api_key", "server.port"]
        );
        assert!(changed_keys(&old, &old).is_empty());
    }
}
