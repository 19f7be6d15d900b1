//! The PPRC routes: paths, pairs and the consistency group.

use super::*;
use crate::copy::pprc::group::GroupState;
use crate::copy::pprc::manager::{EstablishPair, PairError, PairView};
use crate::copy::pprc::paths::{PathError, PathRequest, PathView};

pub(super) fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/pprc/paths", get(path_list).post(path_establish))
        .route(
            "/v1/pprc/paths/{lss}/{peer}/{peer_lss}",
            delete(path_remove),
        )
        .route("/v1/pprc/pairs", get(pair_list).post(pair_establish))
        .route(
            "/v1/pprc/pairs/{volume}",
            get(pair_show).delete(|ctx, volume| on_pair(ctx, volume, PairAction::Terminate)),
        )
        .route(
            "/v1/pprc/pairs/{volume}/suspend",
            post(|ctx, volume| on_pair(ctx, volume, PairAction::Suspend)),
        )
        .route(
            "/v1/pprc/pairs/{volume}/failover",
            post(|ctx, volume| on_pair(ctx, volume, PairAction::Failover)),
        )
        .route(
            "/v1/pprc/pairs/{volume}/failback",
            post(|ctx, volume| on_pair(ctx, volume, PairAction::Failback)),
        )
        .route("/v1/pprc/group", get(group_show))
        .route("/v1/pprc/freeze", post(group_freeze))
        .route("/v1/pprc/unfreeze", post(group_unfreeze))
}

/// `GET /v1/pprc/pairs`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PairList {
    /// Every pair, both roles.
    pub pairs: Vec<PairView>,
}

/// `GET /v1/pprc/group`, and the answer to freeze and unfreeze.
#[derive(Clone, Debug, Serialize)]
pub struct GroupView {
    /// Whether any LSS is in the consistency group.
    pub configured: bool,
    /// What the group is doing.
    pub group: Option<GroupState>,
    /// Primary volumes of the group's pairs.
    pub volumes: Vec<String>,
    /// Pairs suspended by this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended: Option<usize>,
}

impl From<PairError> for ApiError {
    fn from(e: PairError) -> Self {
        let status = match &e {
            PairError::UnknownVolume(_) | PairError::NoPair(_) | PairError::NoPath { .. } => {
                StatusCode::NOT_FOUND
            }
            PairError::BadId(_) => StatusCode::BAD_REQUEST,
            PairError::Peer { .. } => StatusCode::BAD_GATEWAY,
            other if other.is_refusal() => StatusCode::CONFLICT,
            _ => {
                tracing::error!("PPRC pair request failed: {e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

async fn pair_list(State(ctx): State<Ctx>) -> Json<PairList> {
    Json(PairList {
        pairs: ctx.api.pprc.list().await,
    })
}

async fn pair_show(
    State(ctx): State<Ctx>,
    ApiPath(volume): ApiPath<String>,
) -> ApiResult<PairView> {
    let volume = volume_id(&ctx.api.server, &volume);
    Ok(Json(ctx.api.pprc.show(&volume).await?))
}

async fn pair_establish(
    State(ctx): State<Ctx>,
    body: Result<Json<EstablishPair>, JsonRejection>,
) -> Result<(StatusCode, Json<PairView>), ApiError> {
    let mut request = json_body(body)?;
    request.volume = volume_id(&ctx.api.server, &request.volume);
    request.secondary = peer_volume_id(&request.secondary);
    let api = ctx.api.clone();
    let view = to_completion(async move { api.pprc.establish(&request).await }).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// What a request does to one pair.
#[derive(Clone, Copy, Debug)]
enum PairAction {
    Suspend,
    Terminate,
    Failover,
    Failback,
}

impl PairAction {
    async fn run(self, api: Arc<ApiState>, volume: String) -> Result<PairView, PairError> {
        match self {
            PairAction::Suspend => api.pprc.suspend(&volume).await,
            PairAction::Terminate => api.pprc.terminate(&volume).await,
            PairAction::Failover => api.pprc.failover(&volume).await,
            PairAction::Failback => api.pprc.failback(&volume).await,
        }
    }
}

/// Runs `action` to completion on the pair of the volume the path names
/// (by ID or alias).
async fn on_pair(
    State(ctx): State<Ctx>,
    ApiPath(volume): ApiPath<String>,
    action: PairAction,
) -> ApiResult<PairView> {
    let volume = volume_id(&ctx.api.server, &volume);
    Ok(Json(
        to_completion(action.run(ctx.api.clone(), volume)).await?,
    ))
}

fn group_view(ctx: &Ctx, suspended: Option<usize>) -> GroupView {
    let group = ctx.api.pprc.group();
    GroupView {
        configured: group.is_some(),
        volumes: group.as_ref().map(|g| g.1.clone()).unwrap_or_default(),
        group: group.map(|g| g.0),
        suspended,
    }
}

async fn group_show(State(ctx): State<Ctx>) -> Json<GroupView> {
    Json(group_view(&ctx, None))
}

async fn group_freeze(State(ctx): State<Ctx>) -> ApiResult<GroupView> {
    let api = ctx.api.clone();
    let (n, _) = to_completion(async move { api.pprc.freeze().await }).await?;
    Ok(Json(group_view(&ctx, Some(n))))
}

async fn group_unfreeze(State(ctx): State<Ctx>) -> ApiResult<GroupView> {
    let api = ctx.api.clone();
    let (n, _) = to_completion(async move { api.pprc.unfreeze().await }).await?;
    Ok(Json(group_view(&ctx, Some(n))))
}

/// `GET /v1/pprc/paths`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathList {
    /// Every path.
    pub paths: Vec<PathView>,
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        let status = match &e {
            PathError::NotFound { .. } | PathError::UnknownPeer(_) | PathError::UnknownLss(_) => {
                StatusCode::NOT_FOUND
            }
            PathError::BadPeerLss(_) | PathError::BadLinks(_) => StatusCode::BAD_REQUEST,
            PathError::Exists { .. }
            | PathError::InUse { .. }
            | PathError::NoSecret
            | PathError::PeerRefused { .. } => StatusCode::CONFLICT,
            PathError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            PathError::State(_)
            | PathError::Corrupt(_)
            | PathError::RecordedPathUnserved { .. } => {
                tracing::error!("PPRC path request failed: {e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

async fn path_list(State(ctx): State<Ctx>) -> Json<PathList> {
    Json(PathList {
        paths: ctx.api.paths.list().await,
    })
}

async fn path_establish(
    State(ctx): State<Ctx>,
    body: Result<Json<PathRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PathView>), ApiError> {
    let mut request = json_body(body)?;
    request.peer = peer_serial(&request.peer);
    let api = ctx.api.clone();
    let view = to_completion(async move { api.paths.establish(&request).await }).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

fn parse_lss(text: &str) -> Result<u8, ApiError> {
    crate::volume::id::parse_lss(text)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Query of `DELETE /v1/pprc/paths/{lss}/{peer}/{peer_lss}`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathRemoveQuery {
    /// Remove the path although pairs use it.
    #[serde(default)]
    force: bool,
}

async fn path_remove(
    State(ctx): State<Ctx>,
    ApiPath((lss, peer, peer_lss)): ApiPath<(String, String, String)>,
    query: Result<Query<PathRemoveQuery>, QueryRejection>,
) -> ApiResult<PathView> {
    let query = query_params(query)?;
    let (lss, peer_lss) = (parse_lss(&lss)?, parse_lss(&peer_lss)?);
    let peer = peer_serial(&peer);
    let api = ctx.api.clone();
    let view = to_completion(async move {
        api.pprc
            .remove_path(lss, &peer, peer_lss, query.force)
            .await
    })
    .await?;
    Ok(Json(view))
}
