//! The admin API of cluster mode (docs/api/openapi.json):
//!
//! * `GET /v1/cluster`: partitions with owner, state here, fencing
//!   revision and mappings held; live nodes; lease certainty; epoch;
//! * `POST /v1/cluster/partitions/{name}/handover`: planned handover;
//! * `GET /v1/cluster/partitions/{name}/health`: 200 while this node owns
//!   the partition and its lease is certain, 503 otherwise, without a
//!   token: what a routing daemon (BIRD, ExaBGP, keepalived) checks before
//!   announcing the partition's external prefix from this node.
//!
//! On a single node they answer 404 `not_clustered`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::admin::{ApiError, AppRef, AppState};

#[cfg(feature = "cluster")]
use {
    super::node::{NodeCommand, NodeHandle},
    super::PartState,
    axum::Json,
    serde_json::json,
};

#[cfg(feature = "cluster")]
fn node(state: &AppState) -> Result<&NodeHandle, ApiError> {
    state.cluster.as_ref().ok_or_else(not_clustered)
}

fn not_clustered() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_clustered",
        "pcpd runs as a single node (no cluster: section)",
    )
}

/// Why the node is not ready, in cluster mode.
pub(crate) fn not_ready(state: &AppState) -> Option<ApiError> {
    #[cfg(feature = "cluster")]
    if let Some(node) = &state.cluster {
        if !node.ready() {
            return Some(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "etcd_unreachable",
                "no live etcd lease: etcd is unreachable, or the node is joining or leaving",
            ));
        }
    }
    let _ = state;
    None
}

/// `GET /v1/cluster`.
pub(crate) async fn status(State(state): State<AppRef>) -> Response {
    #[cfg(feature = "cluster")]
    {
        let node = match node(&state) {
            Ok(n) => n,
            Err(e) => return e.into_response(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if node.tx.send(NodeCommand::Status(tx)).await.is_ok() {
            if let Ok(s) = rx.await {
                return Json(s).into_response();
            }
        }
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node task has stopped",
        )
        .into_response()
    }
    #[cfg(not(feature = "cluster"))]
    {
        let _ = state;
        not_clustered().into_response()
    }
}

/// `POST /v1/cluster/partitions/{name}/handover`.
pub(crate) async fn handover(State(state): State<AppRef>, Path(name): Path<String>) -> Response {
    #[cfg(feature = "cluster")]
    {
        let node = match node(&state) {
            Ok(n) => n,
            Err(e) => return e.into_response(),
        };
        if !node.ownership.names.contains(&name) {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_partition",
                format!("no partition {name:?}"),
            )
            .into_response();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if node
            .tx
            .send(NodeCommand::Handover(name.clone(), tx))
            .await
            .is_err()
        {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the node task has stopped",
            )
            .into_response();
        }
        match rx.await {
            Ok(Ok(())) => Json(json!({"partition": name, "released": true})).into_response(),
            Ok(Err(msg)) => ApiError::new(StatusCode::CONFLICT, "not_owner", msg).into_response(),
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the node task has stopped",
            )
            .into_response(),
        }
    }
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (state, name);
        not_clustered().into_response()
    }
}

/// `GET /v1/cluster/partitions/{name}/health`.
pub(crate) async fn partition_health(
    State(state): State<AppRef>,
    Path(name): Path<String>,
) -> Response {
    #[cfg(feature = "cluster")]
    {
        let node = match node(&state) {
            Ok(n) => n,
            Err(e) => return e.into_response(),
        };
        let own = &node.ownership;
        let Some(p) = own.names.iter().position(|n| *n == name) else {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_partition",
                format!("no partition {name:?}"),
            )
            .into_response();
        };
        let certain = crate::clock::now_ms() < own.certain_until();
        let state_here = own.state(p);
        let body = json!({"partition": name, "node": own.node, "state": state_here.name(), "lease_certain": certain});
        if state_here == PartState::Active && certain {
            return Json(body).into_response();
        }
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (state, name);
        not_clustered().into_response()
    }
}
