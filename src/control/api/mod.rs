//! The HTTP/JSON management API: routes, handlers, authentication, and the
//! JSON shapes of every request and answer.
//!
//! Every path is versioned under `/v1`; each group of resources is a
//! router of its own (the FlashCopy routes in `flashcopy`, the PPRC routes
//! in `pprc`):
//!
//! ```text
//! GET    /v1/health             liveness
//! GET    /v1/server             identity, listeners, counts
//! GET    /v1/lss                logical subsystems and their volumes
//! GET    /v1/volumes            every volume with counters
//! GET    /v1/volumes/{id}       one volume, by ID or alias
//! GET    /v1/users              user names          (Unix socket only)
//! POST   /v1/users              {"name","password"} (Unix socket only)
//! DELETE /v1/users/{name}                           (Unix socket only)
//! POST   /v1/flashcopy          establish: {"pairs": [{"source","target"}],
//!                               "nocopy", "rate_mib_s", "permit_online"}
//! GET    /v1/flashcopy          every relationship and incomplete targets
//! GET    /v1/flashcopy/{sel}    relationships of a volume or SOURCE:TARGET
//! DELETE /v1/flashcopy/{sel}    withdraw the relationships of one selector
//! POST   /v1/flashcopy/withdraw {"volumes": [selector, ...]}
//! GET    /v1/pprc/paths         every path with its links
//! POST   /v1/pprc/paths         establish: {"lss","peer","peer_lss","links",...}
//! DELETE /v1/pprc/paths/{lss}/{peer}/{peer_lss}[?force=true]
//! GET    /v1/pprc/pairs         every pair, both roles
//! POST   /v1/pprc/pairs         establish or resume: {"volume","secondary","mode",...}
//! GET    /v1/pprc/pairs/{vol}   one pair
//! DELETE /v1/pprc/pairs/{vol}   terminate
//! POST   /v1/pprc/pairs/{vol}/suspend|failover|failback
//! GET    /v1/pprc/group         the consistency group
//! POST   /v1/pprc/freeze        freeze the consistency group
//! POST   /v1/pprc/unfreeze      release its held writes
//! GET    /v1/log?limit=N        the last N events of the event log
//! ```
//!
//! The Unix socket (mode 0600) is trusted. On TCP every request must carry
//! HTTP Basic credentials of a user in the [`UserStore`](super::users::UserStore).
//! Every error is a JSON object `{"error": "..."}` with a fitting status.
//!
//! The answer types are public and deserializable so `essctl` reads the
//! same shapes the server writes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::log::Event;
use super::users::UserError;
use super::ApiState;
use crate::copy::flashcopy::Role;
use crate::scheduling::Scheduling;
use crate::volume::id::{Serial, VolumeId};
use crate::volume::server::StorageServer;
use crate::volume::store::BackingKind;
use crate::volume::{StatsSnapshot, Volume};

mod flashcopy;
mod pprc;

pub use flashcopy::{
    EstablishRequest, FlashCopyList, FlashCopyPair, RelationshipList, WithdrawRequest,
};
pub use pprc::{GroupView, PairList, PathList};

/// Device type the server reports, as the array it models.
pub const DEVICE_TYPE: &str = "2105";
/// Password checks allowed to run at once (each costs ~19 MiB and CPU time).
const MAX_CONCURRENT_LOGINS: usize = 4;
/// Events `GET /v1/log` returns without `limit`.
pub const DEFAULT_LOG_LIMIT: usize = 100;
/// Most events one `GET /v1/log` returns.
pub const MAX_LOG_LIMIT: usize = 10_000;
/// `flashcopy_role` of a volume that is the source of a relationship.
pub const ROLE_SOURCE: &str = "source";
/// `flashcopy_role` of a volume that is the target of a relationship.
pub const ROLE_TARGET: &str = "target";
/// `flashcopy_role` of a volume in no relationship.
pub const ROLE_NONE: &str = "none";

/// Error body of every failed request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong, for humans.
    pub error: String,
}

/// `GET /v1/server`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerView {
    /// 5-character serial.
    pub serial: String,
    /// Display name, if configured.
    pub name: Option<String>,
    /// essd version.
    pub version: String,
    /// Device type, always `2105`.
    pub device_type: String,
    /// `io_uring` or `threads`.
    pub io_engine: String,
    /// Worker threads running connections and peer links.
    pub workers: usize,
    /// CPU scheduling policy of the server's threads: `normal` or `batch`.
    #[serde(default)]
    pub scheduling: String,
    /// Copy-services track size in bytes.
    pub track_size: u64,
    /// State directory.
    pub state_dir: String,
    /// Configuration file the server was started from.
    pub config_file: String,
    /// Start time, RFC 3339 in UTC.
    pub started: String,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// What the server listens on.
    pub listeners: ListenersView,
    /// How many LSSs, volumes and clients there are.
    pub counts: CountsView,
}

/// Listeners in [`ServerView`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenersView {
    /// Bound NBD TCP addresses (actual ports).
    pub nbd_tcp: Vec<String>,
    /// NBD Unix socket.
    pub nbd_unix: Option<String>,
    /// Management API TCP address (actual port).
    pub api_tcp: Option<String>,
    /// PPRC peer-link listener (actual port).
    #[serde(default)]
    pub replication: Option<String>,
}

/// Counts in [`ServerView`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountsView {
    /// Logical subsystems.
    pub lss: usize,
    /// Volumes.
    pub volumes: usize,
    /// NBD clients attached to any volume.
    pub clients: u64,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthView {
    /// `ok` while the server serves.
    pub status: String,
    /// Server serial.
    pub serial: String,
    /// essd version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
}

/// One LSS in [`LssList`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LssView {
    /// LSS number as hex, e.g. `0x10`.
    pub id: String,
    /// IDs of its volumes.
    pub volumes: Vec<String>,
}

/// `GET /v1/lss`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LssList {
    /// Every LSS, sorted.
    pub lss: Vec<LssView>,
}

/// `GET /v1/volumes/{id}` and each entry of [`VolumeList`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeView {
    /// Volume ID (export name).
    pub id: String,
    /// Second export name.
    pub alias: Option<String>,
    /// LSS as hex, e.g. `0x10`.
    pub lss: String,
    /// Number within the LSS.
    pub number: u8,
    /// Size in bytes.
    pub size: u64,
    /// Backing file or device.
    pub backing_path: String,
    /// `file` or `block-device`.
    pub backing_kind: String,
    /// Whether the volume is configured read-only.
    pub read_only: bool,
    /// Whether the volume is a PPRC secondary now: hosts get a read-only
    /// export (also when a server without PPRC leaves it out).
    #[serde(default)]
    pub pprc_secondary: bool,
    /// Required request alignment in bytes (1 unless `direct_io`).
    pub alignment: usize,
    /// Export description.
    pub description: Option<String>,
    /// NBD clients attached now.
    pub clients: u64,
    /// I/O counters since start.
    pub stats: StatsSnapshot,
    /// Part in a FlashCopy relationship: `source`, `target` or `none`
    /// (also when a server without FlashCopy leaves it out).
    #[serde(default = "role_none")]
    pub flashcopy_role: String,
    /// The other volume of the relationship, if any.
    #[serde(default)]
    pub flashcopy_peer: Option<String>,
    /// Whether a withdraw left this volume an incomplete FlashCopy target
    /// (its background copy had not finished).
    #[serde(default)]
    pub incomplete: bool,
}

fn role_none() -> String {
    ROLE_NONE.to_string()
}

/// `GET /v1/volumes`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeList {
    /// Every volume in configuration order.
    pub volumes: Vec<VolumeView>,
}

/// `GET /v1/users`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserList {
    /// User names, sorted.
    pub users: Vec<String>,
}

/// `POST /v1/users` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// `[a-z_][a-z0-9_-]{0,31}`.
    pub name: String,
    /// At least 8 characters.
    pub password: String,
}

/// Answer to creating or removing a user.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserView {
    /// The user's name.
    pub name: String,
}

/// `GET /v1/log`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EventList {
    /// Events, oldest first.
    pub events: Vec<Event>,
}

/// Query of `GET /v1/log`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    /// How many of the latest events to return.
    limit: Option<usize>,
}

/// A failed request: status and message, rendered as [`ErrorBody`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the `error` field.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"essd\""),
            );
        }
        response
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        let status = match &e {
            UserError::InvalidName(_) | UserError::InvalidPassword => StatusCode::BAD_REQUEST,
            UserError::Exists(_) => StatusCode::CONFLICT,
            UserError::NotFound(_) => StatusCode::NOT_FOUND,
            UserError::Io { .. } | UserError::Corrupt { .. } | UserError::Hash(_) => {
                tracing::error!("{e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs a state-changing operation in a task of its own, so it finishes
/// even if its client goes away: the server drops a request's future when
/// the connection closes, which would stop the operation between two of
/// its steps (a pair out of the manager's list but still in the write
/// path, a secondary never told).
async fn to_completion<T, E>(
    operation: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    match tokio::spawn(operation).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => {
            tracing::error!("management operation failed: {e}");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the operation failed: {e}"),
            ))
        }
    }
}

/// Unwraps query parameters, turning a rejection into a 400 with a JSON
/// error.
fn query_params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid query: {}", e.body_text()),
        )
    })
}

/// Unwraps a JSON body, turning a rejection into a 400 (415 without a JSON
/// content type) with a JSON error.
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    match body {
        Ok(Json(value)) => Ok(value),
        Err(e) => {
            let status = match e {
                JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                _ => StatusCode::BAD_REQUEST,
            };
            Err(ApiError::new(
                status,
                format!("invalid request body: {}", e.body_text()),
            ))
        }
    }
}

/// A path parameter; a malformed one (invalid percent-encoding, say) is
/// answered like every other error, with a JSON body, not axum's text.
struct ApiPath<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::new(
                e.status(),
                format!("invalid request path: {}", e.body_text()),
            )),
        }
    }
}

/// How a request reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// The mode-0600 Unix socket: trusted.
    Unix,
    /// TCP: authenticated with HTTP Basic.
    Tcp,
}

/// Per-listener handler state.
#[derive(Clone)]
struct Ctx {
    api: Arc<ApiState>,
    transport: Transport,
    logins: Arc<Semaphore>,
}

/// Starts serving the API on the Unix socket (and TCP if given). Both
/// servers run on `tracker` and stop gracefully once `shutdown` fires.
pub fn spawn(
    state: Arc<ApiState>,
    unix: UnixListener,
    tcp: Option<TcpListener>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let logins = Arc::new(Semaphore::new(MAX_CONCURRENT_LOGINS));
    let unix_app = router(Ctx {
        api: state.clone(),
        transport: Transport::Unix,
        logins: logins.clone(),
    });
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let served = axum::serve(unix, unix_app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!("management API (Unix socket) failed: {e}");
        }
    });
    if let Some(tcp) = tcp {
        let tcp_app = router(Ctx {
            api: state,
            transport: Transport::Tcp,
            logins,
        });
        tracker.spawn(async move {
            let served = axum::serve(super::conn::ApiTcpListener::new(tcp), tcp_app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("management API (TCP) failed: {e}");
            }
        });
    }
}

/// The full API for one listener.
fn router(ctx: Ctx) -> Router {
    let routes = Router::new()
        .merge(system_routes())
        .merge(volume_routes())
        .merge(user_routes())
        .merge(flashcopy::routes())
        .merge(pprc::routes())
        .merge(log_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let routes = match ctx.transport {
        Transport::Unix => routes,
        Transport::Tcp => routes
            .layer(axum::middleware::from_fn_with_state(
                ctx.clone(),
                require_user,
            ))
            .layer(axum::middleware::from_fn(require_json_posts)),
    };
    routes.with_state(ctx)
}

fn system_routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/server", get(server))
        .route("/v1/lss", get(lss_list))
}

fn volume_routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/volumes", get(volume_list))
        .route("/v1/volumes/{id}", get(volume_show))
}

fn user_routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/users", get(user_list).post(user_add))
        .route("/v1/users/{name}", delete(user_remove))
}

fn log_routes() -> Router<Ctx> {
    Router::new().route("/v1/log", get(log_tail))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// Extracts `(user, password)` from an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// TCP middleware: a POST must say its body is JSON (also one without a
/// body). A web page can make a browser send a form to any address, with
/// the Basic credentials it remembers for it, but not as JSON without the
/// server's consent (a CORS preflight, which is never granted); so no page
/// can make a browser suspend a pair or fail it over.
async fn require_json_posts(request: Request, next: Next) -> Response {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if request.method() == Method::POST && !json {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a POST must be sent with Content-Type: application/json",
        )
        .into_response();
    }
    next.run(request).await
}

/// TCP middleware: every request needs valid Basic credentials.
async fn require_user(State(ctx): State<Ctx>, request: Request, next: Next) -> Response {
    let Some((user, password)) = basic_credentials(request.headers()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication required: send the user name and password of an essd user",
        )
        .into_response();
    };
    let verified = match ctx.logins.clone().acquire_owned().await {
        Ok(permit) => {
            let api = ctx.api.clone();
            let name = user.clone();
            tokio::task::spawn_blocking(move || {
                let ok = api.users.verify(&name, &password);
                drop(permit);
                ok
            })
            .await
            .unwrap_or(false)
        }
        Err(_) => false,
    };
    if !verified {
        tracing::warn!(user = %user, "management API login failed");
        return ApiError::new(StatusCode::UNAUTHORIZED, "invalid user name or password")
            .into_response();
    }
    next.run(request).await
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn uptime(api: &ApiState) -> u64 {
    api.server.started.elapsed().map_or(0, |d| d.as_secs())
}

/// Formats seconds since the epoch as RFC 3339 UTC with second precision,
/// e.g. `2024-05-01T12:00:00Z` (the event log's format without milliseconds).
fn rfc3339(secs: u64) -> String {
    let text = super::log::rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
    match text.rsplit_once('.') {
        Some((seconds, _millis)) => format!("{seconds}Z"),
        None => text,
    }
}

async fn health(State(ctx): State<Ctx>) -> Json<HealthView> {
    Json(HealthView {
        status: "ok".into(),
        serial: ctx.api.server.serial.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: uptime(&ctx.api),
    })
}

async fn server(State(ctx): State<Ctx>) -> Json<ServerView> {
    let api = &ctx.api;
    let s = &api.server;
    let started = unix_seconds(s.started);
    Json(ServerView {
        serial: s.serial.to_string(),
        name: s.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        device_type: DEVICE_TYPE.into(),
        io_engine: s.engine.kind().to_string(),
        workers: tokio::runtime::Handle::current().metrics().num_workers(),
        scheduling: Scheduling::of_this_thread()
            .map_or("other", Scheduling::name)
            .into(),
        track_size: s.track_size,
        state_dir: api.state_dir.display().to_string(),
        config_file: api.config_file.display().to_string(),
        started: rfc3339(started),
        started_unix: started,
        uptime_seconds: uptime(api),
        listeners: ListenersView {
            nbd_tcp: api.nbd_tcp.iter().map(|a| a.to_string()).collect(),
            nbd_unix: api.nbd_unix.as_ref().map(|p| p.display().to_string()),
            api_tcp: api.api_tcp.map(|a| a.to_string()),
            replication: api.replication_tcp.map(|a| a.to_string()),
        },
        counts: CountsView {
            lss: s.lss().len(),
            volumes: s.volumes().len(),
            clients: s.volumes().iter().map(|v| v.clients()).sum(),
        },
    })
}

fn lss_hex(id: u8) -> String {
    format!("0x{id:02X}")
}

async fn lss_list(State(ctx): State<Ctx>) -> Json<LssList> {
    Json(LssList {
        lss: ctx
            .api
            .server
            .lss()
            .iter()
            .map(|l| LssView {
                id: lss_hex(l.id),
                volumes: l.volumes.clone(),
            })
            .collect(),
    })
}

fn volume_view(v: &Volume, incomplete: bool) -> VolumeView {
    let info = v.info();
    let store = v.store();
    let (role, peer) = match v.flashcopy() {
        Some(link) => match link.role {
            Role::Source => (ROLE_SOURCE, Some(link.relationship.target_id.clone())),
            Role::Target => (ROLE_TARGET, Some(link.relationship.source_id.clone())),
        },
        None => (ROLE_NONE, None),
    };
    VolumeView {
        id: v.name().to_string(),
        alias: info.alias.clone(),
        lss: lss_hex(info.id.lss),
        number: info.id.number,
        size: v.size(),
        backing_path: store.path().display().to_string(),
        backing_kind: match store.kind() {
            BackingKind::File => "file",
            BackingKind::BlockDevice => "block-device",
        }
        .into(),
        read_only: info.read_only,
        pprc_secondary: v.is_secondary(),
        alignment: store.alignment(),
        description: info.description.clone(),
        clients: v.clients(),
        stats: v.stats(),
        flashcopy_role: role.to_string(),
        flashcopy_peer: peer,
        incomplete,
    }
}

async fn volume_list(State(ctx): State<Ctx>) -> Json<VolumeList> {
    let incomplete = ctx.api.flashcopy.incomplete_targets().await;
    Json(VolumeList {
        volumes: ctx
            .api
            .server
            .volumes()
            .iter()
            .map(|v| volume_view(v, incomplete.contains(v.name())))
            .collect(),
    })
}

/// Resolves a volume ID (also typed in lower case) or alias to the name
/// the server knows it by; anything else is returned unchanged.
fn canonical_volume(server: &StorageServer, name: &str) -> String {
    if server.lookup(name).is_some() {
        return name.to_string();
    }
    // Volume IDs are upper case; accept them typed in lower case.
    let upper = name.to_ascii_uppercase();
    if upper.parse::<VolumeId>().is_ok() {
        upper
    } else {
        name.to_string()
    }
}

/// The ID of the volume `name` (an ID in either case, or an alias) names;
/// anything else is returned unchanged. The PPRC manager knows pairs by
/// their volume's ID only: a pair asked for by alias would not be found,
/// and a second pair on the same volume would not be refused.
fn volume_id(server: &StorageServer, name: &str) -> String {
    match server.lookup(&canonical_volume(server, name)) {
        Some(v) => v.name().to_string(),
        None => name.to_string(),
    }
}

/// A volume ID on a peer (a pair's secondary), also typed in lower case,
/// in upper case; anything else is returned unchanged (and refused as a
/// malformed ID as typed).
fn peer_volume_id(id: &str) -> String {
    let upper = id.to_ascii_uppercase();
    if upper.parse::<VolumeId>().is_ok() {
        upper
    } else {
        id.to_string()
    }
}

/// A peer's serial, also typed in lower case, in upper case; anything
/// else is returned unchanged (and refused as an unknown peer as typed).
fn peer_serial(serial: &str) -> String {
    let upper = serial.to_ascii_uppercase();
    if Serial::new(&upper).is_ok() {
        upper
    } else {
        serial.to_string()
    }
}

async fn volume_show(
    State(ctx): State<Ctx>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<VolumeView> {
    let server = &ctx.api.server;
    match server.lookup(&canonical_volume(server, &id)) {
        Some(v) => {
            let incomplete = ctx.api.flashcopy.is_incomplete(v.name()).await;
            Ok(Json(volume_view(v, incomplete)))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("volume {id} not found"),
        )),
    }
}

async fn log_tail(
    State(ctx): State<Ctx>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<EventList> {
    let query = query_params(query)?;
    let limit = query.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    if !(1..=MAX_LOG_LIMIT).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be from 1 to {MAX_LOG_LIMIT}, not {limit}"),
        ));
    }
    let log = ctx.api.log.clone();
    let events = tokio::task::spawn_blocking(move || log.tail(limit))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the event log failed: {e}"),
            )
        })?
        .map_err(|e| {
            tracing::error!("cannot read the event log: {e}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the event log: {e}"),
            )
        })?;
    Ok(Json(EventList { events }))
}

fn require_unix(ctx: &Ctx) -> Result<(), ApiError> {
    match ctx.transport {
        Transport::Unix => Ok(()),
        Transport::Tcp => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "user management is only allowed over the Unix socket",
        )),
    }
}

async fn user_list(State(ctx): State<Ctx>) -> ApiResult<UserList> {
    require_unix(&ctx)?;
    Ok(Json(UserList {
        users: ctx.api.users.list(),
    }))
}

async fn user_add(
    State(ctx): State<Ctx>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    require_unix(&ctx)?;
    let new = json_body(body)?;
    let api = ctx.api.clone();
    let name = new.name.clone();
    tokio::task::spawn_blocking(move || api.users.add(&new.name, &new.password))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("adding the user failed: {e}"),
            )
        })??;
    tracing::info!(user = %name, "management API user added");
    Ok((StatusCode::CREATED, Json(UserView { name })))
}

async fn user_remove(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<UserView> {
    require_unix(&ctx)?;
    let api = ctx.api.clone();
    let who = name.clone();
    tokio::task::spawn_blocking(move || api.users.remove(&who))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("removing the user failed: {e}"),
            )
        })??;
    tracing::info!(user = %name, "management API user removed");
    Ok(Json(UserView { name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn parses_basic_credentials() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_credentials(&headers), None);
        // "alice:pa:ss" — the password may contain colons.
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("basic YWxpY2U6cGE6c3M="),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("alice".into(), "pa:ss".into()))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer YWxpY2U6cGE6c3M="),
        );
        assert_eq!(basic_credentials(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert_eq!(basic_credentials(&headers), None);
    }
}
