//! The storage server: every LSS and volume of one `essd` process, opened
//! from a validated configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::id::Serial;
use super::store::{BackingStore, OpenError};
use super::{Volume, VolumeInfo};
use crate::config::ValidConfig;
use crate::io::Engine;

/// A volume that could not be opened, with the config entry it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: volume[{index}] ({volume}): {source}")]
pub struct VolumeOpenError {
    /// Config file.
    pub file: PathBuf,
    /// Index in `[[volume]]`.
    pub index: usize,
    /// Volume ID.
    pub volume: String,
    /// What went wrong.
    #[source]
    pub source: OpenError,
}

/// One logical subsystem.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lss {
    /// 0x10..0x1F.
    pub id: u8,
    /// Volume IDs in this LSS.
    pub volumes: Vec<String>,
    /// Critical heavy mode for PPRC pairs with a primary here.
    pub critical_heavy: bool,
    /// PPRC pairs with a primary here form a consistency group.
    pub consistency_group: bool,
    /// How long a consistency group holds writes before it freezes itself.
    #[serde(with = "millis")]
    pub consistency_timeout: std::time::Duration,
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// All volumes of one `essd`.
#[derive(Debug)]
pub struct StorageServer {
    /// The server's serial.
    pub serial: Serial,
    /// Display name.
    pub name: Option<String>,
    /// Copy-services track size in bytes.
    pub track_size: u64,
    /// The I/O engine serving every volume.
    pub engine: Engine,
    /// When the server started.
    pub started: SystemTime,
    lss: Vec<Lss>,
    volumes: Vec<Arc<Volume>>,
    by_name: HashMap<String, Arc<Volume>>,
}

/// Wraps a backing's error with the config entry of `spec`.
fn volume_error(
    cfg: &ValidConfig,
    spec: &crate::config::VolumeSpec,
) -> impl FnOnce(OpenError) -> VolumeOpenError {
    let file = cfg.source.clone();
    let index = spec.index;
    let volume = spec.id.to_string();
    move |source| VolumeOpenError {
        file,
        index,
        volume,
        source,
    }
}

/// Checks every volume's backing against the configuration as a start
/// does, changing, locking and holding nothing (`essd --check`).
pub fn check_backings(cfg: &ValidConfig) -> Result<(), VolumeOpenError> {
    cfg.volumes.iter().try_for_each(|spec| {
        let v = &spec.config;
        BackingStore::check(&v.path, v.size.map(|s| s.0), v.read_only, v.direct_io)
            .map_err(volume_error(cfg, spec))
    })
}

impl StorageServer {
    /// Opens every volume. All backings are probed first, so a problem with
    /// any of them is reported before any missing file is created.
    pub fn open(cfg: &ValidConfig, engine: Engine) -> Result<Self, VolumeOpenError> {
        let fail = |spec| volume_error(cfg, spec);
        let mut probes = Vec::new();
        for spec in &cfg.volumes {
            let v = &spec.config;
            let probe = BackingStore::probe(&v.path, v.size.map(|s| s.0), v.read_only, v.direct_io)
                .map_err(fail(spec))?;
            probes.push(probe);
        }
        let mut volumes = Vec::new();
        let mut by_name = HashMap::new();
        for (spec, probe) in cfg.volumes.iter().zip(probes) {
            let v = &spec.config;
            let store =
                BackingStore::open(&v.path, probe, v.read_only, v.direct_io, engine.clone())
                    .map_err(fail(spec))?;
            let volume = Arc::new(Volume::new(
                VolumeInfo {
                    id: spec.id.clone(),
                    alias: v.alias.clone(),
                    description: v.description.clone(),
                    read_only: v.read_only,
                },
                store,
            ));
            by_name.insert(volume.name().to_string(), volume.clone());
            if let Some(alias) = &v.alias {
                by_name.insert(alias.clone(), volume.clone());
            }
            volumes.push(volume);
        }
        let lss = cfg
            .lss
            .iter()
            .map(|&id| {
                let props = cfg.raw.lss.iter().find(|l| l.id == u32::from(id));
                Lss {
                    id,
                    critical_heavy: props.is_some_and(|p| p.critical_heavy),
                    consistency_group: props.is_some_and(|p| p.consistency_group),
                    consistency_timeout: props.map_or(std::time::Duration::from_secs(60), |p| {
                        p.consistency_timeout.0
                    }),
                    volumes: volumes
                        .iter()
                        .filter(|v| v.info().id.lss == id)
                        .map(|v| v.name().to_string())
                        .collect(),
                }
            })
            .collect();
        Ok(StorageServer {
            serial: cfg.serial.clone(),
            name: cfg.raw.server.name.clone(),
            track_size: cfg.track_size,
            engine,
            started: SystemTime::now(),
            lss,
            volumes,
            by_name,
        })
    }

    /// Finds a volume by ID or alias.
    pub fn lookup(&self, name: &str) -> Option<&Arc<Volume>> {
        self.by_name.get(name)
    }

    /// All volumes in configuration order.
    pub fn volumes(&self) -> &[Arc<Volume>] {
        &self.volumes
    }

    /// All LSSs, sorted.
    pub fn lss(&self) -> &[Lss] {
        &self.lss
    }

    /// Flushes every writable volume's store, at the stop; returns the
    /// number that failed. Only the store: a PPRC pair's secondary was
    /// flushed, if at all, before its links closed (a flush mirrored now
    /// would find no link and suspend the pair, write-inhibit a critical
    /// one, or hold its consistency group), and a write-inhibited primary
    /// refuses changes, not the flush of what it holds.
    pub async fn flush_all(&self) -> usize {
        let mut failed = 0;
        for v in self.volumes.iter().filter(|v| v.writable()) {
            if let Err(e) = v.flush_local().await {
                tracing::error!(volume = v.name(), "flush at shutdown failed: {e}");
                failed += 1;
            }
        }
        failed
    }
}

/// Server FCB02 in `dir` with one 4 MiB volume of LSS 0x10 per file name
/// (volume 0 first), for unit tests.
#[cfg(test)]
pub(crate) fn test_server(dir: &std::path::Path, files: &[&str]) -> Arc<StorageServer> {
    use std::fmt::Write as _;
    let d = dir.display();
    let mut text = format!(
        "[server]\nserial = \"FCB02\"\nstate_dir = \"{d}/state\"\n[nbd]\nlisten = []\nunix = \"{d}/nbd.sock\"\n[api]\nunix = \"{d}/api.sock\"\n[[lss]]\nid = 0x10\n"
    );
    for (number, file) in files.iter().enumerate() {
        let _ = write!(
            text,
            "[[volume]]\nlss = 0x10\nnumber = {number}\npath = \"{d}/{file}\"\nsize = \"4MiB\"\n"
        );
    }
    let cfg = crate::config::Config::parse(&text, std::path::Path::new("<test>")).unwrap();
    let engine = Engine::start(cfg.raw.server.io_engine).unwrap();
    Arc::new(StorageServer::open(&cfg, engine).unwrap())
}
