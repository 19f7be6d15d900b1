//! The management plane: the HTTP/JSON API (`/v1/...`) served on a Unix
//! socket (trusted, mode 0600) and optionally on TCP (users with hashed
//! passwords required), and the user store.
//!
//! * [`api`] — routes and handlers.
//! * [`conn`] — limits on the TCP listener's connections.
//! * [`users`] — users and password hashes in the state directory.

pub mod api;
pub mod conn;
pub mod log;
pub mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::volume::server::StorageServer;

/// Everything the API reports or changes, shared with the daemon.
#[derive(Debug)]
pub struct ApiState {
    /// The storage server and its volumes.
    pub server: Arc<StorageServer>,
    /// Bound NBD TCP listeners (actual addresses).
    pub nbd_tcp: Vec<SocketAddr>,
    /// NBD Unix socket, if any.
    pub nbd_unix: Option<PathBuf>,
    /// Management API TCP listener, if any.
    pub api_tcp: Option<SocketAddr>,
    /// PPRC peer-link listener, if any.
    pub replication_tcp: Option<SocketAddr>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Config file the server was started from.
    pub config_file: PathBuf,
    /// User store.
    pub users: users::UserStore,
    /// The server's event log.
    pub log: Arc<log::EventLog>,
    /// FlashCopy relationships.
    pub flashcopy: Arc<crate::copy::flashcopy::manager::FlashCopyManager>,
    /// PPRC paths to peers.
    pub paths: Arc<crate::copy::pprc::paths::PathManager>,
    /// PPRC pairs, both roles.
    pub pprc: Arc<crate::copy::pprc::manager::PprcManager>,
}
