//! Reads `/admin/events` (server-sent events) in tests.

use serde_json::Value;

use super::Server;

/// Reads server-sent events from `/admin/events`.
pub struct EventReader {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl EventReader {
    pub async fn open(s: &Server, admin_key: Option<&str>) -> EventReader {
        let mut req = reqwest::Client::new().get(s.url("/admin/events"));
        if let Some(k) = admin_key {
            req = req.header("x-admin-key", k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut reader = EventReader {
            stream: Box::pin(r.bytes_stream()),
            buf: String::new(),
        };
        let (name, _) = reader.next().await;
        assert_eq!(name, "connected");
        reader
    }

    /// The next named event and its data (keep-alive comments skipped).
    pub async fn next(&mut self) -> (String, Value) {
        use futures_util::StreamExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event:") {
                        name = n.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if name.is_empty() {
                    continue;
                }
                return (name, serde_json::from_str(&data).unwrap());
            }
            let chunk =
                tokio::time::timeout(std::time::Duration::from_secs(120), self.stream.next())
                    .await
                    .expect("an event within two minutes")
                    .expect("the stream stays open")
                    .unwrap();
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Events until one named `name` (returned); the others are returned too, in order.
    pub async fn until(&mut self, name: &str) -> (Value, Vec<String>) {
        let mut seen = Vec::new();
        loop {
            let (n, v) = self.next().await;
            seen.push(n.clone());
            if n == name {
                return (v, seen);
            }
        }
    }
}
