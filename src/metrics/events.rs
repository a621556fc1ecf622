//! Events as they happen, for `/admin/events` (the coding CLI's `/events`, dashboards that
//! would otherwise poll): loads, unloads and evictions, downloads, memory refusals, config
//! reloads. Fed from the same places as the counters, so an event and its counter never
//! disagree. A broadcast ring: each subscriber may fall at most [`CAPACITY`] events behind
//! (then it is told how many it missed), so a slow client costs a bounded amount of memory.

use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind before it misses some.
pub const CAPACITY: usize = 256;

/// One event, in the first Opta-LMX's shape (`event_type`, `timestamp`, `data`).
#[derive(Debug, Clone, Serialize)]
pub struct AdminEvent {
    pub event_type: &'static str,
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
    pub data: Value,
}

/// The sender every subscriber listens to.
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<AdminEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    /// Sends `event_type` with `data` to whoever listens now (nobody: dropped).
    pub fn emit(&self, event_type: &'static str, data: Value) {
        let timestamp = crate::system::unix_time(std::time::SystemTime::now());
        let _ = self.tx.send(AdminEvent {
            event_type,
            timestamp,
            data,
        });
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AdminEvent> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscriber_gets_what_follows_and_a_slow_one_hears_what_it_missed() {
        let events = Events::default();
        events.emit("before", Value::Null);
        let mut rx = events.subscribe();
        events.emit("model_loaded", serde_json::json!({"model_id": "m"}));
        let e = rx.recv().await.unwrap();
        assert_eq!(
            (e.event_type, e.data["model_id"].as_str()),
            ("model_loaded", Some("m"))
        );
        for _ in 0..CAPACITY + 5 {
            events.emit("download_progress", Value::Null);
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(5))
        ));
    }
}
