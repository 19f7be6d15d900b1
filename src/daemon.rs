//! The `essd` process life cycle: open volumes, bind listeners, notify
//! systemd, serve, and on SIGTERM/SIGINT stop accepting, finish in-flight
//! requests, flush every volume and exit.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ValidConfig;
use crate::control::log::EventLog;
use crate::control::{api, users::UserStore, ApiState};
use crate::copy::flashcopy::manager::FlashCopyManager;
use crate::copy::pprc::manager::PprcManager;
use crate::copy::pprc::paths::PathManager;
use crate::copy::pprc::secondary::{serve_link, PeerRequests};
use crate::io::Engine;
use crate::nbd::listener::{bind_unix, NbdListeners};
use crate::volume::server::StorageServer;

/// A start-up failure, with a message fit for the administrator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

fn start_err(e: impl std::fmt::Display) -> StartError {
    StartError(e.to_string())
}

/// Checks, changing nothing, what a start would find wrong beyond the
/// file itself: each volume's backing against its size, and everything
/// the Copy Services records in the state directory need (the volumes of
/// relationships and pairs, the peers of paths). What `essd --check` adds
/// to the validation of the file; safe while a server runs.
pub fn check_before_start(cfg: &ValidConfig) -> Result<(), StartError> {
    crate::volume::server::check_backings(cfg).map_err(start_err)?;
    let state_dir = &cfg.raw.server.state_dir;
    let configured = |name: &str| {
        cfg.volumes
            .iter()
            .any(|v| v.id.to_string() == name || v.config.alias.as_deref() == Some(name))
    };
    crate::copy::flashcopy::manager::check_recorded(state_dir, configured).map_err(start_err)?;
    crate::copy::pprc::paths::check_recorded(
        state_dir,
        &cfg.peers,
        cfg.replication_secret.is_some(),
    )
    .map_err(start_err)?;
    let size = |name: &str| {
        cfg.volumes
            .iter()
            .find(|v| v.id.to_string() == name)
            .and_then(|v| v.config.size.map(|s| s.0))
    };
    crate::copy::pprc::manager::check_recorded(state_dir, cfg.track_size, configured, size)
        .map_err(start_err)
}

/// Called once the server is ready, with what it listens on.
pub type OnReady = Box<dyn FnOnce(&ApiState) + Send>;

/// Runs the server until SIGTERM/SIGINT (or `stop` fires). Returns the
/// number of volumes whose final flush failed.
pub async fn run(
    cfg: ValidConfig,
    stop: CancellationToken,
    on_ready: Option<OnReady>,
) -> Result<usize, StartError> {
    // A stop asked for during the start is kept for when it is done.
    let mut signals = Signals::listen();
    let engine = Engine::start(cfg.raw.server.io_engine).map_err(start_err)?;
    tracing::info!(engine = %engine.kind(), "I/O engine ready");
    let server = Arc::new(StorageServer::open(&cfg, engine).map_err(start_err)?);

    let state_dir = cfg.raw.server.state_dir.clone();
    // Created private; one that exists keeps its mode (it may be shared
    // with other programs, which a chmod would lock out).
    if !state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|e| StartError(format!("state directory {}: {e}", state_dir.display())))?;
    }
    // Held until the process ends.
    let _state_lock = crate::state::lock_dir(&state_dir).map_err(start_err)?;
    let users = UserStore::open(&state_dir).map_err(start_err)?;
    let log = Arc::new(
        EventLog::open(&state_dir)
            .map_err(|e| StartError(format!("event log in {}: {e}", state_dir.display())))?,
    );
    let flashcopy = FlashCopyManager::open(server.clone(), &state_dir, log.clone())
        .await
        .map_err(start_err)?;

    let nbd = NbdListeners::bind(&cfg.nbd_listen, cfg.raw.nbd.unix.as_deref())
        .await
        .map_err(start_err)?;
    let api_unix = bind_unix(&cfg.raw.api.unix, 0o600).map_err(start_err)?;
    let api_tcp = match cfg.api_listen {
        None => None,
        Some(addr) => {
            if users.is_empty() {
                return Err(StartError(format!(
                    "{}: api.listen: the TCP management listener needs at least one user; add one with `essctl user add NAME` over the Unix socket first",
                    cfg.source.display()
                )));
            }
            crate::control::users::prepare_decoy();
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?,
            )
        }
    };
    let replication = match cfg.replication_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| StartError(format!("cannot listen for peer links on {addr}: {e}")))?,
        ),
    };
    let paths = Arc::new(
        PathManager::open(
            &state_dir,
            server.serial.clone(),
            cfg.lss.clone(),
            cfg.peers.clone(),
            cfg.replication_secret.clone(),
            log.clone(),
        )
        .map_err(start_err)?,
    );
    let timeout = cfg
        .raw
        .replication
        .as_ref()
        .map_or(Duration::from_secs(5), |r| r.timeout.0);
    let pprc = PprcManager::open(
        server.clone(),
        &state_dir,
        paths.clone(),
        log.clone(),
        timeout,
    )
    .await
    .map_err(start_err)?;
    let state = Arc::new(ApiState {
        server: server.clone(),
        nbd_tcp: nbd.tcp_addrs(),
        nbd_unix: nbd.unix_path().map(PathBuf::from),
        api_tcp: api_tcp.as_ref().and_then(|l| l.local_addr().ok()),
        replication_tcp: replication.as_ref().and_then(|l| l.local_addr().ok()),
        state_dir,
        config_file: cfg.source.clone(),
        users,
        log: log.clone(),
        flashcopy: flashcopy.clone(),
        paths: paths.clone(),
        pprc: pprc.clone(),
    });

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    nbd.spawn(server.clone(), shutdown.clone(), &tracker);
    api::spawn(state.clone(), api_unix, api_tcp, shutdown.clone(), &tracker);
    if let (Some(listener), Some(secret)) = (replication, cfg.replication_secret.clone()) {
        spawn_replication(
            listener,
            server.clone(),
            pprc.clone(),
            Arc::from(secret),
            shutdown.clone(),
            &tracker,
        );
    }

    for v in server.volumes() {
        tracing::info!(
            volume = v.name(),
            size = v.size(),
            path = %v.store().path().display(),
            read_only = !v.writable(),
            "volume online"
        );
    }
    tracing::info!(
        serial = %server.serial,
        nbd_tcp = ?state.nbd_tcp,
        nbd_unix = ?state.nbd_unix,
        api = %cfg.raw.api.unix.display(),
        "essd ready"
    );
    if let Some(f) = on_ready {
        f(&state);
    }
    sd_notify("READY=1");

    signals.wait_for_stop(&stop).await;
    shutdown.cancel();
    // Logged once the shutdown has begun.
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    sd_notify("STOPPING=1");
    // Writes held by the consistency group would keep the drain waiting
    // for the consistency timeout.
    pprc.stop_group().await;
    tracker.close();
    let drain_timeout = cfg.raw.server.drain_timeout.0;
    let drained = tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            "some connections did not finish within {drain_timeout:?} (server.drain_timeout)"
        );
    }
    flashcopy.stop_copiers().await;
    // Before the links close: a duplex pair flushes its secondary to be
    // recorded in sync.
    pprc.shutdown(drained).await;
    paths.shutdown().await;
    let failed = server.flush_all().await;
    tracing::info!(failed, "volumes flushed; exiting");
    let _ = std::fs::remove_file(&cfg.raw.api.unix);
    Ok(failed)
}

/// Accepts peer links: each is authenticated with the shared secret, then
/// may mirror changes to the volumes that are secondaries of that peer's
/// pairs, and send pair requests.
fn spawn_replication(
    listener: tokio::net::TcpListener,
    server: Arc<StorageServer>,
    pprc: Arc<PprcManager>,
    secret: Arc<[u8]>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let secondaries: Arc<dyn PeerRequests> = pprc;
    let t = tracker.clone();
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("peer link accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (server, secret, secondaries, stop) = (
                server.clone(),
                secret.clone(),
                secondaries.clone(),
                shutdown.clone(),
            );
            // At shutdown a link applies and answers what it received,
            // says goodbye and closes (within the drain time).
            t.spawn(async move {
                let serial = server.serial.clone();
                match serve_link(stream, server, serial, secret, secondaries, stop).await {
                    Ok(p) => tracing::info!(%peer, serial = %p.serial, "peer link closed"),
                    Err(e) => tracing::warn!(%peer, "peer link refused or failed: {e}"),
                }
            });
        }
    });
}

/// The signals essd acts on, listened for from before it says it is
/// ready, so none arriving right after finds the default action (which
/// would end the process on the spot: no drain, no flush).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hangup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// Waits for SIGTERM, SIGINT or `stop`. SIGHUP is logged and otherwise
    /// ignored: essd does not reload its configuration.
    async fn wait_for_stop(&mut self, stop: &CancellationToken) {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = next(&mut self.term) => return,
                _ = next(&mut self.int) => return,
                _ = next(&mut self.hangup) => tracing::warn!(
                    "SIGHUP ignored: essd does not reload its configuration; check a changed \
                     one with essd --check and restart essd to apply it"
                ),
            }
        }
    }
}

/// Sends a state line to systemd if `NOTIFY_SOCKET` is set.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("sd_notify: {e}");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(path))
    };
    if let Err(e) = result {
        tracing::warn!("sd_notify {state}: {e}");
    }
}
