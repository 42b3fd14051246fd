//! Admin REST API (axum; TLS through rustls). Every error is JSON:
//! `{"error": {"code": "...", "message": "..."}}` with a stable code.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use pcp_engine::{BlockAllocator, InternalEndpoint, MappingKey};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::cluster::api;
use crate::config::{token_hash, Config, Scope};
use crate::shard::{Control, Health, MappingFilter, Refused, ShardHandle};

/// The OpenAPI document served at `/v1/openapi.json` (kept in docs/).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// What the handlers share.
pub struct AppState {
    /// Cluster mode: this node's membership.
    #[cfg(feature = "cluster")]
    pub cluster: Option<crate::cluster::node::NodeHandle>,
    /// Shards, by index.
    pub shards: Vec<ShardHandle>,
    /// The block allocator (pools, and who holds each block now).
    pub shared: Arc<BlockAllocator>,
    /// Token hashes and scopes.
    pub tokens: Vec<(String, String, Scope)>,
    /// True once serving.
    pub ready: AtomicBool,
    /// Whether each shard can make its state durable.
    pub health: Arc<Health>,
    /// The file the configuration came from (`None`: built-in default).
    pub config_path: Option<std::path::PathBuf>,
    /// The running configuration.
    pub config: Mutex<Config>,
}

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request does not match the OpenAPI document (a malformed
    /// address, a value out of bounds, an unknown field). A request that
    /// matches it but that the configuration refuses is a 422 (`refused`).
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shard_unavailable",
            "a shard did not answer",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;
pub(crate) type AppRef = Arc<AppState>;

/// The router: public health endpoints, then read and write scopes.
pub fn router(state: AppRef) -> Router {
    let read = Router::new()
        .route("/v1/mappings", get(list_mappings))
        .route("/v1/mappings/{id}", get(get_mapping))
        .route("/v1/subscribers/{ip}", get(get_subscriber))
        .route("/v1/pools", get(get_pools))
        .route("/v1/lookup", get(lookup))
        .route("/v1/cluster", get(api::status))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_read));
    let write = Router::new()
        .route("/v1/mappings", post(create_mapping))
        .route("/v1/mappings/{id}", delete(delete_mapping))
        .route("/v1/pools/drain", post(drain))
        .route("/v1/pools/undrain", post(undrain))
        .route("/v1/reload", post(reload))
        .route(
            "/v1/cluster/partitions/{name}/handover",
            post(api::handover),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_write));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/v1/cluster/partitions/{name}/health",
            get(api::partition_health),
        )
        .route("/v1/openapi.json", get(openapi))
        .merge(read)
        .merge(write)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .with_state(state)
}

fn scope_of(state: &AppState, req: &Request) -> Result<Scope, ApiError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a bearer token is required",
            )
        })?;
    let token = value.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "use Authorization: Bearer TOKEN",
        )
    })?;
    let hash = token_hash(token.trim());
    state
        .tokens
        .iter()
        .find(|(_, h, _)| *h == hash)
        .map(|(_, _, s)| *s)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown token"))
}

async fn require_read(State(state): State<AppRef>, req: Request, next: Next) -> Response {
    match scope_of(&state, &req) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn require_write(State(state): State<AppRef>, req: Request, next: Next) -> Response {
    match scope_of(&state, &req) {
        Ok(Scope::Write) => next.run(req).await,
        Ok(Scope::Read) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token has read scope only",
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn readyz(State(state): State<AppRef>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "state is being restored, or pcpd is stopping",
        )
        .into_response();
    }
    if let Some(problem) = api::not_ready(&state) {
        return problem.into_response();
    }
    match state.health.problem() {
        None => Json(json!({"status": "ready"})).into_response(),
        Some(reason) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_not_durable",
            format!("state cannot be made durable ({reason}); state changes are refused"),
        )
        .into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Sends a control message to one shard and waits for the answer.
async fn ask<T>(
    shard: &ShardHandle,
    make: impl FnOnce(oneshot::Sender<T>) -> Control,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    shard
        .control
        .send(make(tx))
        .await
        .map_err(|_| ApiError::unavailable())?;
    rx.await.map_err(|_| ApiError::unavailable())
}

fn owner(state: &AppState, ip: IpAddr) -> &ShardHandle {
    &state.shards[pcp_engine::shard_of(ip.to_canonical(), state.shards.len())]
}

/// `tcp`, `udp` (either case) or a protocol number written without
/// leading zeros: exactly the OpenAPI document's `Protocol`.
fn protocol_number(p: &str) -> Result<u8, ApiError> {
    match p {
        "tcp" | "TCP" => Ok(6),
        "udp" | "UDP" => Ok(17),
        other => other
            .parse::<u8>()
            .ok()
            .filter(|n| n.to_string() == other)
            .ok_or_else(|| ApiError::bad(format!("protocol {p:?}: use tcp, udp or a number"))),
    }
}

fn mapping_json(m: &pcp_engine::Mapping) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
    v["id"] = json!(m.key().to_string());
    // A pinhole's external endpoint is its internal one (RFC 6887 §3).
    v["external_addr"] = json!(m.external_ip());
    (v["expires"], v["expires_ms"]) = if m.expires_ms == u64::MAX {
        (Value::Null, Value::Null)
    } else {
        (json!(rfc3339(m.expires_ms)), json!(m.expires_ms))
    };
    v["created"] = json!(rfc3339(m.created_ms));
    v
}

/// An engine-clock instant, shown in wall time (RFC 3339).
fn rfc3339(ms: u64) -> String {
    crate::rfc3339::format_ms(crate::clock::to_wall(ms)).unwrap_or_default()
}

fn parse_id(s: &str) -> Result<MappingKey, ApiError> {
    s.parse().map_err(|()| {
        ApiError::bad(format!(
            "mapping id {s:?} is not PROTOCOL-ADDR-PORT or PROTOCOL-ADDR-PORT-REMOTE_ADDR-REMOTE_PORT"
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    subscriber: Option<IpAddr>,
    external: Option<Ipv4Addr>,
    protocol: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn list_mappings(
    State(state): State<AppRef>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad("limit must be between 1 and 10000"));
    }
    if q.offset > 1_000_000_000 {
        return Err(ApiError::bad("offset must be between 0 and 1000000000"));
    }
    let filter = MappingFilter {
        subscriber: q.subscriber.map(|s| s.to_canonical()),
        external: q.external,
        protocol: q.protocol.as_deref().map(protocol_number).transpose()?,
    };
    let targets: Vec<&ShardHandle> = match filter.subscriber {
        Some(s) => vec![owner(&state, s)],
        None => state.shards.iter().collect(),
    };
    let mut all = Vec::new();
    for shard in targets {
        let f = filter.clone();
        all.extend(ask(shard, |tx| Control::Mappings(f, tx)).await?);
    }
    all.sort_by_key(|m| m.id);
    let total = all.len();
    let items: Vec<Value> = all
        .iter()
        .skip(q.offset)
        .take(limit)
        .map(mapping_json)
        .collect();
    Ok(
        Json(json!({ "total": total, "offset": q.offset, "limit": limit, "items": items }))
            .into_response(),
    )
}

async fn get_mapping(State(state): State<AppRef>, Path(id): Path<String>) -> ApiResult {
    let key = parse_id(&id)?;
    match ask(owner(&state, key.internal.addr), |tx| {
        Control::Mapping(key, tx)
    })
    .await?
    {
        Some(m) => Ok(Json(mapping_json(&m)).into_response()),
        None => Err(ApiError::not_found("mapping")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    internal_addr: IpAddr,
    protocol: String,
    internal_port: u16,
    #[serde(default)]
    external_port: u16,
}

async fn create_mapping(
    State(state): State<AppRef>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(b) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    let protocol = protocol_number(&b.protocol)?;
    let internal = b.internal_addr.to_canonical();
    let endpoint = InternalEndpoint {
        addr: internal,
        protocol,
        port: b.internal_port,
    };
    let r = ask(owner(&state, internal), |reply| {
        Control::CreateStatic(endpoint, b.external_port, reply)
    })
    .await?;
    let m = r.map_err(refused)?;
    Ok((StatusCode::CREATED, Json(mapping_json(&m))).into_response())
}

/// The answer to an operator write a shard refused: 503 when the change
/// could not be made durable or installed (retry later), 409/422 for what
/// the engine refused.
fn refused(r: Refused) -> ApiError {
    use pcp_wire::ResultCode as R;
    let (status, api_code) = match &r {
        Refused::NotDurable(_) => (StatusCode::SERVICE_UNAVAILABLE, "state_not_durable"),
        Refused::NotInstalled => (StatusCode::SERVICE_UNAVAILABLE, "dataplane_failed"),
        Refused::NotOwner => (StatusCode::CONFLICT, "not_owner"),
        Refused::Engine(code) => match code {
            R::NotAuthorized => (StatusCode::UNPROCESSABLE_ENTITY, "not_a_subscriber"),
            R::UnsuppProtocol => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_protocol"),
            R::CannotProvideExternal => (StatusCode::CONFLICT, "mapping_exists"),
            R::UserExQuota | R::NoResources => (StatusCode::CONFLICT, "no_ports_available"),
            _ => (StatusCode::CONFLICT, "refused"),
        },
    };
    ApiError::new(status, api_code, r.to_string())
}

async fn delete_mapping(State(state): State<AppRef>, Path(id): Path<String>) -> ApiResult {
    let key = parse_id(&id)?;
    match ask(owner(&state, key.internal.addr), |tx| {
        Control::Delete(key, tx)
    })
    .await?
    .map_err(refused)?
    {
        Some(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        None => Err(ApiError::not_found("mapping")),
    }
}

async fn get_subscriber(State(state): State<AppRef>, Path(ip): Path<String>) -> ApiResult {
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| ApiError::bad(format!("{ip:?} is not an IP address")))?;
    let ip = ip.to_canonical();
    match ask(owner(&state, ip), |tx| Control::Subscriber(ip, tx)).await? {
        Some(u) => Ok(Json(u).into_response()),
        None => Err(ApiError::not_found("subscriber")),
    }
}

async fn get_pools(State(state): State<AppRef>) -> ApiResult {
    Ok(Json(json!({ "pools": state.shared.usage() })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    address: Ipv4Addr,
}

async fn drain(
    State(state): State<AppRef>,
    body: Result<Json<DrainBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(b) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    if !state.shared.set_draining(b.address, true) {
        return Err(ApiError::not_found("address in a dynamic pool"));
    }
    let mut moved = 0;
    for shard in &state.shards {
        moved += ask(shard, |tx| Control::Drain(b.address, tx))
            .await?
            .map_err(refused)?;
    }
    Ok(
        Json(json!({ "address": b.address, "draining": true, "moved_mappings": moved }))
            .into_response(),
    )
}

async fn undrain(
    State(state): State<AppRef>,
    body: Result<Json<DrainBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(b) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    if !state.shared.set_draining(b.address, false) {
        return Err(ApiError::not_found("address in a dynamic pool"));
    }
    Ok(Json(json!({ "address": b.address, "draining": false })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupQuery {
    external: SocketAddr,
    at: Option<String>,
}

async fn lookup(
    State(state): State<AppRef>,
    q: Result<Query<LookupQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let IpAddr::V4(addr) = q.external.ip() else {
        return Err(ApiError::bad("external must be an IPv4 address:port"));
    };
    let at = match &q.at {
        None => crate::clock::now_ms(),
        Some(s) => {
            let wall = crate::rfc3339::parse_ms(s).map_err(|e| ApiError::bad(format!("at {e}")))?;
            crate::clock::from_wall(wall)
        }
    };
    // Who holds it now is known without asking every shard: the block
    // allocator records each dynamic block's owner.
    let now_owner =
        q.at.is_none()
            .then(|| state.shared.block_owner(addr, q.external.port()))
            .flatten();
    let shards: Vec<&ShardHandle> = match now_owner {
        Some(sub) => vec![owner(&state, sub)],
        None => state.shards.iter().collect(),
    };
    for shard in shards {
        if let Some(h) = ask(shard, |tx| Control::Lookup(addr, q.external.port(), at, tx)).await? {
            return Ok(Json(json!({
                "external": q.external,
                "at": rfc3339(at),
                "internal_addr": h.internal_addr,
                "block": h.block,
                "from": h.from_ms.map(rfc3339),
                "to": h.to_ms.map(rfc3339),
            }))
            .into_response());
        }
    }
    Err(ApiError::not_found(
        "holder of that external port at that time",
    ))
}

async fn reload(State(state): State<AppRef>) -> ApiResult {
    let message = do_reload(&state).await?;
    Ok(Json(json!({ "reloaded": true, "message": message })).into_response())
}

/// Re-reads the configuration file and applies what can change without
/// stranding mappings (used by `POST /v1/reload` and SIGHUP).
pub async fn do_reload(state: &AppState) -> Result<String, ApiError> {
    let Some(path) = &state.config_path else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_config_file",
            "pcpd runs on its built-in default; there is no file to reload",
        ));
    };
    let new = Config::load(path).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            list.join("; "),
        )
    })?;
    let current = state
        .config
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(why) = current.reload_conflict(&new) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "reload_would_strand",
            why.to_string(),
        ));
    }
    let compiled = pcp_engine::Compiled::new(new.pcp.clone(), &state.shared).map_err(|p| {
        let list: Vec<String> = p.iter().map(ToString::to_string).collect();
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            list.join("; "),
        )
    })?;
    let compiled = Arc::new(compiled);
    for shard in &state.shards {
        let c = compiled.clone();
        ask(shard, |tx| Control::Reload(c, tx)).await?;
    }
    *state.config.lock().unwrap_or_else(|p| p.into_inner()) = new;
    Ok(format!("{} reloaded", path.display()))
}

#[cfg(test)]
mod tests {
    /// Every route the router serves is in the OpenAPI document, and nothing else.
    #[test]
    fn openapi_documents_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("valid JSON");
        let documented: std::collections::BTreeSet<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .into_iter()
                    .flatten()
                    .map(move |(m, _)| format!("{} {path}", m.to_uppercase()))
            })
            .collect();
        // One line per `.route(...)` call, however rustfmt wrapped it.
        let source: String =
            include_str!("admin.rs")
                .lines()
                .map(str::trim)
                .fold(String::new(), |mut acc, l| {
                    if acc.ends_with("\",") {
                        acc.push(' ');
                    } else if !acc.ends_with(".route(") {
                        acc.push('\n');
                    }
                    acc.push_str(l);
                    acc
                });
        let mut served = std::collections::BTreeSet::new();
        for line in source.lines() {
            if let Some(rest) = line.strip_prefix(".route(\"") {
                let path = rest.split('"').next().unwrap_or_default();
                for method in ["get", "post", "delete"] {
                    if rest.contains(&format!(" {method}("))
                        || rest.contains(&format!(", {method}("))
                    {
                        served.insert(format!("{} {path}", method.to_uppercase()));
                    }
                }
            }
        }
        assert_eq!(served.len(), 16, "{served:?}");
        assert_eq!(served, documented);
    }
}
