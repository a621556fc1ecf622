//! `GET /v1/queue`: a client's own view of the schedulers, so a bot can tell "waiting behind
//! the person's turn, third in line" from "the server is stuck". It shows only the caller's
//! requests (by its key's client, or the name it sends), with each waiting one's place in the
//! order the scheduler admits them, and the size of each model's queue.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::AppState;
use crate::engine::admission;

/// The answer of `GET /v1/queue`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueView {
    pub object: &'static str,
    /// Whose requests these are (`anonymous` when the request named no client).
    pub client: String,
    /// The caller's requests on every loaded model.
    pub data: Vec<QueuedRequest>,
    /// Each loaded model's totals, everyone's requests together.
    pub models: Vec<ModelQueue>,
}

/// One of the caller's requests.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueuedRequest {
    pub model: String,
    /// `running` (holds a sequence) or `queued` (waiting for one, or paused for a
    /// higher-priority request).
    pub state: &'static str,
    pub priority: admission::Priority,
    /// Among the waiting requests, its place in the admission order (1: next); absent when
    /// running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Milliseconds since it reached the scheduler.
    pub waited_ms: u64,
}

/// One model's queue.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelQueue {
    pub model: String,
    pub running: usize,
    pub queued: usize,
    /// Sequences the model runs at once.
    pub parallel: u32,
}

/// `GET /v1/queue`.
pub async fn own(State(state): State<AppState>) -> Json<QueueView> {
    let client = super::caller::current()
        .map_or_else(|| super::caller::ANONYMOUS.into(), |c| c.client.to_string());
    let now = Instant::now();
    let mut data = Vec::new();
    let mut models = Vec::new();
    for m in state.registry.loaded() {
        let held = m.engine.held();
        let running: Vec<&str> = held
            .iter()
            .filter(|h| h.running)
            .map(|h| &*h.client)
            .collect();
        let waiting: Vec<&crate::engine::Held> = held.iter().filter(|h| !h.running).collect();
        let queue: Vec<admission::Waiting<'_>> = waiting
            .iter()
            .map(|h| admission::Waiting {
                priority: h.priority,
                client: &h.client,
                since: h.since,
                aging_from: h.aging_from,
            })
            .collect();
        let mut position = vec![0; waiting.len()];
        for (place, i) in admission::order(&queue, &running, now)
            .into_iter()
            .enumerate()
        {
            position[i] = place + 1;
        }
        let mine = |h: &crate::engine::Held| *h.client == *client;
        let waited =
            |h: &crate::engine::Held| now.saturating_duration_since(h.since).as_millis() as u64;
        for h in held.iter().filter(|h| h.running && mine(h)) {
            data.push(QueuedRequest {
                model: m.id.clone(),
                state: "running",
                priority: h.priority,
                position: None,
                waited_ms: waited(h),
            });
        }
        for (i, h) in waiting.iter().enumerate().filter(|(_, h)| mine(h)) {
            data.push(QueuedRequest {
                model: m.id.clone(),
                state: "queued",
                priority: h.priority,
                position: Some(position[i]),
                waited_ms: waited(h),
            });
        }
        models.push(ModelQueue {
            model: m.id.clone(),
            running: running.len(),
            queued: waiting.len(),
            parallel: m.engine.info().parallel,
        });
    }
    data.sort_by(|a, b| (&a.model, a.position).cmp(&(&b.model, b.position)));
    Json(QueueView {
        object: "queue",
        client,
        data,
        models,
    })
}
