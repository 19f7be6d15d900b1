//! HTTP/JSON management API.

use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ApiState;

/// Starts serving the API on the Unix socket (and TCP if given).
pub fn spawn(
    state: Arc<ApiState>,
    unix: UnixListener,
    tcp: Option<TcpListener>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let _ = (state, unix, tcp, shutdown, tracker);
}
