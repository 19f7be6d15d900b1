//! The FlashCopy routes: establish, list, show and withdraw relationships.

use std::collections::BTreeSet;

use super::*;
use crate::copy::flashcopy::manager::{EstablishOptions, FlashCopyError, RelationshipView};
use crate::copy::flashcopy::CopyMode;

/// One source/target pair of an [`EstablishRequest`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlashCopyPair {
    /// Source volume ID or alias.
    pub source: String,
    /// Target volume ID or alias.
    pub target: String,
}

/// `POST /v1/flashcopy` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EstablishRequest {
    /// Pairs to establish with one common T0.
    pub pairs: Vec<FlashCopyPair>,
    /// NOCOPY: no background copy; the relationships last until withdrawn.
    #[serde(default)]
    pub nocopy: bool,
    /// Background copy limit in MiB/s (greater than 0); `null` = unlimited.
    #[serde(default)]
    pub rate_mib_s: Option<f64>,
    /// Allow targets that have NBD clients attached.
    #[serde(default)]
    pub permit_online: bool,
}

/// `POST /v1/flashcopy/withdraw` body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WithdrawRequest {
    /// Volume IDs or aliases (every relationship they are part of), or
    /// `SOURCE:TARGET` pairs.
    pub volumes: Vec<String>,
}

/// Relationships established, shown or withdrawn.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RelationshipList {
    /// The relationships.
    pub relationships: Vec<RelationshipView>,
}

/// `GET /v1/flashcopy`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlashCopyList {
    /// Every relationship.
    pub relationships: Vec<RelationshipView>,
    /// Volumes left incomplete by withdrawing an unfinished copy, sorted.
    pub incomplete_targets: Vec<String>,
}

impl From<FlashCopyError> for ApiError {
    fn from(e: FlashCopyError) -> Self {
        let status = match &e {
            FlashCopyError::UnknownVolume(_) | FlashCopyError::NotFound(_) => StatusCode::NOT_FOUND,
            FlashCopyError::OtherServer { .. }
            | FlashCopyError::SameVolume(_)
            | FlashCopyError::Duplicate(_)
            | FlashCopyError::TargetTooSmall { .. }
            | FlashCopyError::InRelationship { .. }
            | FlashCopyError::ReadOnlyTarget(_)
            | FlashCopyError::PprcPrimaryTarget { .. }
            | FlashCopyError::MirroredTarget { .. }
            | FlashCopyError::HeldByGroup { .. }
            | FlashCopyError::TargetOnline { .. } => StatusCode::CONFLICT,
            FlashCopyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            FlashCopyError::Bitmap(_)
            | FlashCopyError::State(_)
            | FlashCopyError::Io { .. }
            | FlashCopyError::Corrupt { .. } => {
                tracing::error!("FlashCopy request failed: {e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

pub(super) fn routes() -> Router<Ctx> {
    Router::new()
        .route(
            "/v1/flashcopy",
            get(flashcopy_list).post(flashcopy_establish),
        )
        .route("/v1/flashcopy/withdraw", post(flashcopy_withdraw))
        .route(
            "/v1/flashcopy/{selector}",
            get(flashcopy_show).delete(flashcopy_withdraw_one),
        )
}

/// [`canonical_volume`] for a FlashCopy selector: a volume or `SOURCE:TARGET`.
fn canonical_selector(server: &StorageServer, selector: &str) -> String {
    match selector.split_once(':') {
        Some((s, t)) => format!(
            "{}:{}",
            canonical_volume(server, s),
            canonical_volume(server, t)
        ),
        None => canonical_volume(server, selector),
    }
}

/// Bytes per second for a `rate_mib_s` value; 0 (unlimited) for `None`.
fn rate_bytes(rate_mib_s: Option<f64>) -> Result<u64, ApiError> {
    match rate_mib_s {
        None => Ok(0),
        Some(r) if r.is_finite() && r > 0.0 => {
            // At least 1 B/s: 0 would mean unlimited.
            Ok(((r * (1u64 << 20) as f64).round() as u64).max(1))
        }
        Some(r) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("rate_mib_s must be greater than 0 (or null for unlimited), not {r}"),
        )),
    }
}

async fn flashcopy_establish(
    State(ctx): State<Ctx>,
    body: Result<Json<EstablishRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<RelationshipList>), ApiError> {
    let request = json_body(body)?;
    let server = &ctx.api.server;
    let opts = EstablishOptions {
        mode: if request.nocopy {
            CopyMode::NoCopy
        } else {
            CopyMode::Copy
        },
        rate: rate_bytes(request.rate_mib_s)?,
        permit_online: request.permit_online,
    };
    let pairs: Vec<(String, String)> = request
        .pairs
        .iter()
        .map(|p| {
            (
                canonical_volume(server, &p.source),
                canonical_volume(server, &p.target),
            )
        })
        .collect();
    let api = ctx.api.clone();
    let relationships =
        to_completion(async move { api.flashcopy.establish(&pairs, opts).await }).await?;
    Ok((
        StatusCode::CREATED,
        Json(RelationshipList { relationships }),
    ))
}

async fn flashcopy_list(State(ctx): State<Ctx>) -> Json<FlashCopyList> {
    let fc = &ctx.api.flashcopy;
    let relationships = fc.list().await;
    let incomplete: BTreeSet<String> = fc.incomplete_targets().await;
    Json(FlashCopyList {
        relationships,
        incomplete_targets: incomplete.into_iter().collect(),
    })
}

async fn flashcopy_show(
    State(ctx): State<Ctx>,
    ApiPath(selector): ApiPath<String>,
) -> ApiResult<RelationshipList> {
    let selector = canonical_selector(&ctx.api.server, &selector);
    let relationships = ctx.api.flashcopy.show(&selector).await?;
    Ok(Json(RelationshipList { relationships }))
}

async fn withdraw(ctx: &Ctx, selectors: &[String]) -> ApiResult<RelationshipList> {
    let selectors: Vec<String> = selectors
        .iter()
        .map(|s| canonical_selector(&ctx.api.server, s))
        .collect();
    let api = ctx.api.clone();
    let relationships =
        to_completion(async move { api.flashcopy.withdraw(&selectors).await }).await?;
    Ok(Json(RelationshipList { relationships }))
}

async fn flashcopy_withdraw(
    State(ctx): State<Ctx>,
    body: Result<Json<WithdrawRequest>, JsonRejection>,
) -> ApiResult<RelationshipList> {
    let request = json_body(body)?;
    withdraw(&ctx, &request.volumes).await
}

async fn flashcopy_withdraw_one(
    State(ctx): State<Ctx>,
    ApiPath(selector): ApiPath<String>,
) -> ApiResult<RelationshipList> {
    withdraw(&ctx, &[selector]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_flashcopy_errors_to_statuses() {
        let status = |e: FlashCopyError| {
            let text = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.message, text, "the message is the error's text");
            api.status
        };
        assert_eq!(
            status(FlashCopyError::UnknownVolume("X".into())),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(FlashCopyError::NotFound("X".into())),
            StatusCode::NOT_FOUND
        );
        for conflict in [
            FlashCopyError::OtherServer {
                volume: "000ZZZ99".into(),
                serial: "ZZZ99".into(),
                ours: "FCA31".into(),
            },
            FlashCopyError::SameVolume("X".into()),
            FlashCopyError::Duplicate("X".into()),
            FlashCopyError::TargetTooSmall {
                source_id: "S".into(),
                source_size: 2,
                target: "T".into(),
                target_size: 1,
            },
            FlashCopyError::InRelationship {
                volume: "S".into(),
                role: "source",
                source_id: "S".into(),
                target: "T".into(),
            },
            FlashCopyError::ReadOnlyTarget("T".into()),
            FlashCopyError::TargetOnline {
                target: "T".into(),
                clients: 1,
            },
        ] {
            assert_eq!(status(conflict), StatusCode::CONFLICT);
        }
        assert_eq!(
            status(FlashCopyError::BadRequest("no".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(FlashCopyError::Io {
                what: "reading".into(),
                source: std::io::Error::other("boom"),
            }),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(FlashCopyError::Corrupt {
                path: "/x".into(),
                message: "bad".into(),
            }),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn converts_copy_rates() {
        assert_eq!(rate_bytes(None).unwrap(), 0);
        assert_eq!(rate_bytes(Some(1.0)).unwrap(), 1 << 20);
        assert_eq!(rate_bytes(Some(2.5)).unwrap(), 5 << 19);
        // Never 0 (unlimited) for a positive rate.
        assert_eq!(rate_bytes(Some(1e-12)).unwrap(), 1);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = rate_bytes(Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
