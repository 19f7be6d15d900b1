//! TCP and Unix-socket listeners: accept, negotiate, serve, and drain on
//! shutdown. A failing connection is logged and closed; the others go on.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handshake::{negotiate_until, NegotiationSettings};
use super::{transmission, ProtocolError};
use crate::pipeline::ReadLowWater;
use crate::volume::server::StorageServer;

/// Time a client has to finish negotiation.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream that splits into owned read and write halves.
pub trait SplitStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Read half.
    type Read: AsyncRead + ReadLowWater + Unpin + Send + 'static;
    /// Write half.
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Splits the stream.
    fn split_owned(self) -> (Self::Read, Self::Write);
}

impl SplitStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl SplitStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Bound NBD listeners.
pub struct NbdListeners {
    tcp: Vec<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
}

/// Errors binding a listener.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what}: {source}")]
pub struct BindError {
    /// Address or socket path.
    pub what: String,
    /// OS error.
    #[source]
    pub source: std::io::Error,
}

impl NbdListeners {
    /// Binds every configured listener.
    pub async fn bind(tcp: &[SocketAddr], unix: Option<&Path>) -> Result<Self, BindError> {
        let mut bound = Vec::new();
        for addr in tcp {
            let l = TcpListener::bind(addr).await.map_err(|source| BindError {
                what: addr.to_string(),
                source,
            })?;
            bound.push(l);
        }
        let unix = match unix {
            None => None,
            Some(path) => Some((bind_unix(path, 0o660)?, path.to_path_buf())),
        };
        Ok(NbdListeners { tcp: bound, unix })
    }

    /// Actual TCP addresses (useful with port 0).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The Unix socket path, if any.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// Starts accept loops on `tracker`. When `shutdown` fires, connections
    /// serve the requests already received and answer later ones
    /// `ESHUTDOWN` (see [`transmission`]) before they close.
    pub fn spawn(
        self,
        server: Arc<StorageServer>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let settings = Arc::new(NegotiationSettings {
            preferred_block: server.track_size.min(u64::from(u32::MAX)) as u32,
        });
        for listener in self.tcp {
            let (server, settings, shutdown, t) = (
                server.clone(),
                settings.clone(),
                shutdown.clone(),
                tracker.clone(),
            );
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        a = listener.accept() => a,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            t.spawn(connection(
                                stream,
                                peer.to_string(),
                                server.clone(),
                                settings.clone(),
                                shutdown.clone(),
                            ));
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
        }
        if let Some((listener, path)) = self.unix {
            let t = tracker.clone();
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        a = listener.accept() => a,
                    };
                    match accepted {
                        Ok((stream, _)) => {
                            t.spawn(connection(
                                stream,
                                format!("unix:{}", path.display()),
                                server.clone(),
                                settings.clone(),
                                shutdown.clone(),
                            ));
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
                let _ = std::fs::remove_file(&path);
            });
        }
    }
}

/// Binds a Unix socket, replacing a stale socket file, with `mode`.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let err = |source| BindError {
        what: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Refuse to steal a socket another server is still answering on.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )))
        }
        Err(_) => {}
    }
    // Bind, set the mode, and only then listen: a client that connects
    // before the mode is set (the socket file is created with the
    // process's umask) is refused instead of being served.
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let nix_err = |e: nix::errno::Errno| err(std::io::Error::from(e));
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(nix_err)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(path).map_err(nix_err)?,
    )
    .map_err(nix_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    listen(&fd, Backlog::MAXCONN).map_err(nix_err)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd)).map_err(err)
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn connection<S: SplitStream>(
    mut stream: S,
    peer: String,
    server: Arc<StorageServer>,
    settings: Arc<NegotiationSettings>,
    shutdown: CancellationToken,
) {
    let negotiated = tokio::time::timeout(
        NEGOTIATION_TIMEOUT,
        negotiate_until(&mut stream, &server, &settings, &shutdown),
    )
    .await
    .unwrap_or(Err(ProtocolError::Timeout));
    let session = match negotiated {
        Ok(Some(session)) => session,
        Ok(None) => return,
        Err(e) => {
            tracing::info!(%peer, "{e}");
            return;
        }
    };
    let volume = session.volume.clone();
    let _attached = volume.attach();
    tracing::info!(%peer, volume = volume.name(), structured = session.structured, "client attached");
    let (r, w) = stream.split_owned();
    match transmission::serve(r, w, session, shutdown).await {
        Ok(()) => tracing::info!(%peer, volume = volume.name(), "client detached"),
        Err(e) => tracing::warn!(%peer, volume = volume.name(), "connection closed: {e}"),
    }
}
