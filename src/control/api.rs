//! The HTTP/JSON management API: routes, handlers, authentication, and the
//! JSON shapes of every request and answer.
//!
//! Every path is versioned under `/v1`. Resources are grouped so that new
//! groups (FlashCopy, PPRC, background tasks) slot in as further routers:
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
//! ```
//!
//! The Unix socket (mode 0600) is trusted. On TCP every request must carry
//! HTTP Basic credentials of a user in the [`UserStore`](super::users::UserStore).
//! Every error is a JSON object `{"error": "..."}` with a fitting status.
//!
//! The answer types are public and deserializable so `essctl` reads the
//! same shapes the server writes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::users::UserError;
use super::ApiState;
use crate::volume::id::VolumeId;
use crate::volume::store::BackingKind;
use crate::volume::{StatsSnapshot, Volume};

/// Device type the server reports, as the array it models.
pub const DEVICE_TYPE: &str = "2105";
/// Password checks allowed to run at once (each costs ~19 MiB and CPU time).
const MAX_CONCURRENT_LOGINS: usize = 4;

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
    /// Whether hosts are refused writes.
    pub read_only: bool,
    /// Required request alignment in bytes (1 unless `direct_io`).
    pub alignment: usize,
    /// Export description.
    pub description: Option<String>,
    /// NBD clients attached now.
    pub clients: u64,
    /// I/O counters since start.
    pub stats: StatsSnapshot,
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
            let served = axum::serve(tcp, tcp_app)
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
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let routes = match ctx.transport {
        Transport::Unix => routes,
        Transport::Tcp => routes.layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            require_user,
        )),
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

/// Formats seconds since the epoch as RFC 3339 UTC, e.g. `2024-05-01T12:00:00Z`.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Convert a day count to a proleptic Gregorian date using 400-year eras
    // that start on March 1st, so the leap day falls at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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

fn volume_view(v: &Volume) -> VolumeView {
    let info = v.info();
    let store = v.store();
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
        alignment: store.alignment(),
        description: info.description.clone(),
        clients: v.clients(),
        stats: v.stats(),
    }
}

async fn volume_list(State(ctx): State<Ctx>) -> Json<VolumeList> {
    Json(VolumeList {
        volumes: ctx
            .api
            .server
            .volumes()
            .iter()
            .map(|v| volume_view(v))
            .collect(),
    })
}

async fn volume_show(State(ctx): State<Ctx>, Path(id): Path<String>) -> ApiResult<VolumeView> {
    let server = &ctx.api.server;
    let found = server.lookup(&id).or_else(|| {
        // Volume IDs are upper case; accept them typed in lower case.
        let upper = id.to_ascii_uppercase();
        upper
            .parse::<VolumeId>()
            .ok()
            .and_then(|_| server.lookup(&upper))
    });
    match found {
        Some(v) => Ok(Json(volume_view(v))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("volume {id} not found"),
        )),
    }
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
    let Json(new) = body.map_err(|e| {
        let status = match e {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, format!("invalid request body: {}", e.body_text()))
    })?;
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

async fn user_remove(State(ctx): State<Ctx>, Path(name): Path<String>) -> ApiResult<UserView> {
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
