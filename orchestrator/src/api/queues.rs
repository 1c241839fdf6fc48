//! Queue routes: statistics per queue, dead letters and their replay.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use shared::Namespace;

use super::AppState;
use super::error::{ApiError, malformed};
use super::extract::{PathParams, QueryParams, page_limit};
use crate::operator;
use crate::store::{self, StoreError};

/// One queue's statistics.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueStats {
    pub queue: String,
    /// Messages waiting to be read.
    pub depth: i64,
    /// Messages read and leased but not yet deleted.
    pub in_flight: i64,
    /// Age of the oldest message, visible or not; 0 when empty.
    pub oldest_message_age_seconds: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    pub items: Vec<QueueStats>,
}

/// Per queue: depth, messages in flight, age of the oldest message.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "operations",
    responses(
        (status = 200, description = "Every queue", body = QueueList),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn queues(State(state): State<AppState>) -> Result<Json<QueueList>, ApiError> {
    let stats = shared::queue::stats(&state.pool)
        .await
        .map_err(StoreError::from)?;
    let items = stats
        .into_iter()
        .map(|q| QueueStats {
            queue: q.queue_name,
            depth: q.depth,
            in_flight: q.in_flight,
            oldest_message_age_seconds: q.oldest_age_secs,
        })
        .collect();
    Ok(Json(QueueList { items }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DlqQuery {
    /// Most entries returned (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// A dead-lettered message.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetter {
    /// `<queue>:<message id>`, as `POST /v1/dlq/{id}/replay` takes it.
    pub id: String,
    pub queue: String,
    pub dead_lettered_at: DateTime<Utc>,
    pub reason: Option<Value>,
    pub detail: Option<Value>,
    pub task_id: Option<Value>,
    pub step_id: Option<Value>,
    pub step: Option<Value>,
    /// The dead letter as stored, with the original message inside.
    pub message: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    pub items: Vec<DeadLetter>,
}

/// Lists dead-lettered messages.
#[utoipa::path(
    get,
    path = "/v1/dlq",
    tag = "operations",
    params(DlqQuery),
    responses(
        (status = 200, description = "Dead letters", body = DeadLetterList),
        (status = 400, description = "An unknown, malformed or out-of-range query parameter"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn dead_letters(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<DlqQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = page_limit(query.limit, 100)?;
    let letters = store::list_dead_letters(&state.pool, limit).await?;
    let items = letters
        .into_iter()
        .map(|d| DeadLetter {
            id: format!("{}:{}", d.queue, d.msg_id),
            reason: d.message.get("reason").cloned(),
            detail: d.message.get("detail").cloned(),
            task_id: d.message.pointer("/message/task_id").cloned(),
            step_id: d.message.pointer("/message/step_id").cloned(),
            step: d.message.pointer("/message/step").cloned(),
            queue: d.queue,
            dead_lettered_at: d.enqueued_at,
            message: d.message,
        })
        .collect();
    Ok(Json(DeadLetterList { items }))
}

/// What a replay did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The dead letter's id.
    pub replayed: String,
    pub task_id: Uuid,
    /// The step that runs again.
    pub step: String,
}

/// Runs a dead letter's step again as a new attempt and drops the dead letter.
#[utoipa::path(
    post,
    path = "/v1/dlq/{id}/replay",
    tag = "operations",
    params(("id" = String, Path, description = "Dead letter id: `<queue>:<message id>`",
            pattern = "^(weft_dlq_[a-z][a-z0-9_]{0,29}|weft_results_dlq):[0-9]{1,18}$")),
    responses(
        (status = 200, description = "Replayed", body = Replayed),
        (status = 400, description = "Not a dead letter id"),
        (status = 404, description = "No such dead letter"),
        (status = 409, description = "The dead letter's step cannot run again"),
        (status = 503, description = "The database is unreachable"),
    ),
)]
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Replayed>, ApiError> {
    let Some((queue, msg_id)) = dead_letter_id(&id) else {
        return Err(malformed(
            "id",
            "a dead letter id looks like weft_dlq_<namespace>:<number>",
        ));
    };
    match operator::replay_dead_letter(&state.pool, queue, msg_id).await? {
        operator::Replayed::Step { task_id, step } => Ok(Json(Replayed {
            replayed: id,
            task_id: task_id.0,
            step,
        })),
        operator::Replayed::NotFound => {
            Err(ApiError::NotFound(format!("dead letter {id} not found")))
        }
        operator::Replayed::Refused(reason) => {
            Err(ApiError::Conflict(format!("dead letter {id}: {reason}")))
        }
    }
}

/// Reads a dead letter id of exactly the documented form.
fn dead_letter_id(id: &str) -> Option<(&str, i64)> {
    let (queue, msg) = id.split_once(':')?;
    let queue_ok = queue == "weft_results_dlq"
        || queue
            .strip_prefix("weft_dlq_")
            .is_some_and(|ns| Namespace::parse(ns).is_ok());
    let msg_ok = (1..=18).contains(&msg.len()) && msg.bytes().all(|b| b.is_ascii_digit());
    if !(queue_ok && msg_ok) {
        return None;
    }
    Some((queue, msg.parse().ok()?))
}
