//! The `essd` configuration file: TOML schema, defaults, validation and the
//! embedded demo configuration.
//!
//! Loading is pure: [`Config::load`] parses and validates without touching
//! the disk, so a bad file is refused before anything is created.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scheduling::Scheduling;
use crate::units::{ByteSize, Seconds};
use crate::volume::id::{Serial, VolumeId, LSS_MAX, LSS_MIN};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/essd";
/// Default management API socket; `essctl` looks here first.
pub const DEFAULT_API_SOCKET: &str = "/run/essd/api.sock";
/// Default NBD TCP listener (the IANA NBD port).
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

/// A configuration problem, naming the file, the field and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file (or `<demo>` for the embedded one).
    pub file: PathBuf,
    /// Dotted path of the offending field, e.g. `volume[1].size`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

/// Which I/O engine serves backing stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoEngineChoice {
    /// io_uring when the kernel allows it, else the thread pool.
    #[default]
    Auto,
    /// io_uring; start-up fails if it is unavailable.
    Uring,
    /// The portable blocking thread pool (pread/pwrite).
    Threads,
}

/// The whole configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: identity and global settings.
    pub server: ServerConfig,
    /// `[nbd]`: NBD listeners.
    #[serde(default)]
    pub nbd: NbdConfig,
    /// `[api]`: management API listeners.
    #[serde(default)]
    pub api: ApiConfig,
    /// `[[lss]]`: logical subsystems.
    #[serde(default)]
    pub lss: Vec<LssConfig>,
    /// `[[volume]]`: exported volumes.
    #[serde(default)]
    pub volume: Vec<VolumeConfig>,
    /// `[replication]`: the PPRC peer listener and shared secret.
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
    /// `[[peer]]`: storage servers this one mirrors to or from.
    #[serde(default)]
    pub peer: Vec<PeerConfig>,
}

/// `[replication]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Optional TCP listener for peer links, e.g. `"0.0.0.0:7410"`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Shared secret (at least 16 bytes) that peers prove they hold.
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the shared secret instead of `secret` (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Time the secondary has to acknowledge a mirrored change before the
    /// pair suspends. Default 5 s.
    #[serde(default = "default_replication_timeout")]
    pub timeout: Seconds,
}

/// Longest `replication.timeout`.
pub const MAX_REPLICATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

fn default_replication_timeout() -> Seconds {
    Seconds(std::time::Duration::from_secs(5))
}

fn default_consistency_timeout() -> Seconds {
    Seconds(std::time::Duration::from_secs(60))
}

/// `[[peer]]` entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's serial.
    pub serial: String,
    /// The peer's replication listener, `host:port`.
    pub address: String,
}

/// Minimum length of the replication secret.
pub const MIN_SECRET_LEN: usize = 16;

/// `[server]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// 5 characters `[0-9A-Z]`; the storage server's identity. Required.
    pub serial: String,
    /// Optional display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Where relationships, bitmaps, users and the log live. Default `/var/lib/essd`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Unit of every copy-services bitmap: power of two, 4KiB..1MiB. Default 64KiB.
    #[serde(default = "default_track_size")]
    pub track_size: ByteSize,
    /// `auto` (default), `uring` or `threads`.
    #[serde(default)]
    pub io_engine: IoEngineChoice,
    /// Threads that run connections and peer links, 1..=[`MAX_WORKERS`].
    /// Default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// `normal` (default) or `batch`: the CPU scheduling policy of every
    /// essd thread.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// How long a stop waits for the host requests and peer links in
    /// flight before it goes on without them. Default 30 s.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Seconds,
}

fn default_drain_timeout() -> Seconds {
    Seconds(std::time::Duration::from_secs(30))
}

/// Most worker threads `server.workers` may ask for.
pub const MAX_WORKERS: usize = 256;

/// `[nbd]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// TCP listeners, IPv4 or IPv6 `addr:port`. Default `["127.0.0.1:10809"]`;
    /// `[]` for none. Port 0 picks a free port (shown by `essctl server`).
    #[serde(default = "default_nbd_listen")]
    pub listen: Vec<String>,
    /// Optional Unix socket listener.
    #[serde(default)]
    pub unix: Option<PathBuf>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: default_nbd_listen(),
            unix: None,
        }
    }
}

/// `[api]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Management API Unix socket (mode 0600). Default `/run/essd/api.sock`.
    #[serde(default = "default_api_socket")]
    pub unix: PathBuf,
    /// Optional TCP listener; requires at least one user to exist.
    #[serde(default)]
    pub listen: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            unix: default_api_socket(),
            listen: None,
        }
    }
}

/// `[[lss]]` entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LssConfig {
    /// 0x10..0x1F.
    pub id: u32,
    /// Critical heavy mode: when a critical pair's secondary cannot be
    /// updated, the primary is write-inhibited at once. Default false.
    #[serde(default)]
    pub critical_heavy: bool,
    /// Pairs whose primary is in this LSS form a consistency group. Default false.
    #[serde(default)]
    pub consistency_group: bool,
    /// How long writes of a consistency group are held after a mirroring
    /// failure before the group freezes by itself. Default 60 s.
    #[serde(default = "default_consistency_timeout")]
    pub consistency_timeout: Seconds,
}

/// `[[volume]]` entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The LSS that holds the volume; must be defined in `[[lss]]`.
    pub lss: u32,
    /// 0..255 within the LSS.
    pub number: u32,
    /// Absolute path of a regular file (created sparse if missing) or block device.
    pub path: PathBuf,
    /// Required for files; for block devices optional and at most the device size.
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// Export read-only. Default false.
    #[serde(default)]
    pub read_only: bool,
    /// Open with O_DIRECT. Default false.
    #[serde(default)]
    pub direct_io: bool,
    /// Sent as the NBD export description.
    #[serde(default)]
    pub description: Option<String>,
    /// Optional second export name.
    #[serde(default)]
    pub alias: Option<String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_track_size() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_nbd_listen() -> Vec<String> {
    vec![DEFAULT_NBD_LISTEN.to_string()]
}
fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}

/// A validated volume entry with its resolved identity.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    /// Index in the file's `[[volume]]` list, for messages.
    pub index: usize,
    /// The volume ID (export name).
    pub id: VolumeId,
    /// The raw entry.
    pub config: VolumeConfig,
}

/// A configuration that passed validation, with typed fields resolved.
#[derive(Clone, Debug)]
pub struct ValidConfig {
    /// Where the configuration came from.
    pub source: PathBuf,
    /// The parsed file.
    pub raw: Config,
    /// Validated serial.
    pub serial: Serial,
    /// Track size in bytes.
    pub track_size: u64,
    /// Parsed NBD TCP listeners.
    pub nbd_listen: Vec<SocketAddr>,
    /// Parsed API TCP listener.
    pub api_listen: Option<SocketAddr>,
    /// LSS ids, sorted.
    pub lss: Vec<u8>,
    /// Volumes in file order.
    pub volumes: Vec<VolumeSpec>,
    /// Replication listener, if configured.
    pub replication_listen: Option<SocketAddr>,
    /// The replication secret, if configured (read from `secret_file` too).
    pub replication_secret: Option<Vec<u8>>,
    /// Peers: serial and address.
    pub peers: Vec<(Serial, SocketAddr)>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            field: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `source` names it in errors.
    pub fn parse(text: &str, source: &Path) -> Result<ValidConfig, ConfigError> {
        let raw: Config =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let at = inner
                    .span()
                    .map(|span| {
                        let before = &text[..span.start.min(text.len())];
                        let line = before.matches('\n').count() + 1;
                        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                        format!(" (line {line}, column {column})")
                    })
                    .unwrap_or_default();
                ConfigError {
                    file: source.to_path_buf(),
                    field: if path == "." { String::new() } else { path },
                    message: format!("{}{at}", inner.message().trim_end()),
                }
            })?;
        raw.validate(source)
    }

    /// Checks every field, returning the first problem found.
    pub fn validate(self, source: &Path) -> Result<ValidConfig, ConfigError> {
        let fail = |field: String, message: String| ConfigError {
            file: source.to_path_buf(),
            field,
            message,
        };
        let serial = Serial::new(&self.server.serial)
            .map_err(|e| fail("server.serial".into(), e.to_string()))?;
        let track = self.server.track_size.0;
        if !track.is_power_of_two() || !(4096..=1 << 20).contains(&track) {
            return Err(fail(
                "server.track_size".into(),
                format!(
                    "{} must be a power of two between 4KiB and 1MiB",
                    self.server.track_size
                ),
            ));
        }
        if let Some(n) = self.server.workers {
            if !(1..=MAX_WORKERS).contains(&n) {
                return Err(fail(
                    "server.workers".into(),
                    format!("{n} must be between 1 and {MAX_WORKERS}"),
                ));
            }
        }
        if self.server.drain_timeout.0.is_zero() {
            return Err(fail(
                "server.drain_timeout".into(),
                "must be greater than zero".into(),
            ));
        }
        if !self.server.state_dir.is_absolute() {
            return Err(fail(
                "server.state_dir".into(),
                "must be an absolute path".into(),
            ));
        }
        let mut nbd_listen = Vec::new();
        for (i, addr) in self.nbd.listen.iter().enumerate() {
            let parsed: SocketAddr = addr.parse().map_err(|_| {
                fail(
                    format!("nbd.listen[{i}]"),
                    format!("{addr:?} is not an address:port such as \"127.0.0.1:10809\" or \"[::1]:10809\""),
                )
            })?;
            nbd_listen.push(parsed);
        }
        if nbd_listen.is_empty() && self.nbd.unix.is_none() {
            return Err(fail(
                "nbd".into(),
                "no listener: set nbd.listen or nbd.unix".into(),
            ));
        }
        if let Some(path) = &self.nbd.unix {
            if !path.is_absolute() {
                return Err(fail("nbd.unix".into(), "must be an absolute path".into()));
            }
        }
        if !self.api.unix.is_absolute() {
            return Err(fail("api.unix".into(), "must be an absolute path".into()));
        }
        if self.nbd.unix.as_deref().map(normalize) == Some(normalize(&self.api.unix)) {
            return Err(fail(
                "api.unix".into(),
                format!("{} is also nbd.unix", self.api.unix.display()),
            ));
        }
        let api_listen = match &self.api.listen {
            None => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| {
                fail(
                    "api.listen".into(),
                    format!("{addr:?} is not an address:port such as \"127.0.0.1:8350\""),
                )
            })?),
        };

        let mut lss_ids = Vec::new();
        for (i, lss) in self.lss.iter().enumerate() {
            if !(u32::from(LSS_MIN)..=u32::from(LSS_MAX)).contains(&lss.id) {
                return Err(fail(
                    format!("lss[{i}].id"),
                    format!("0x{:X} is outside 0x10..0x1F", lss.id),
                ));
            }
            let id = lss.id as u8;
            if lss_ids.contains(&id) {
                return Err(fail(
                    format!("lss[{i}].id"),
                    format!("duplicate LSS 0x{id:02X}"),
                ));
            }
            lss_ids.push(id);
        }
        lss_ids.sort_unstable();

        let mut volumes = Vec::new();
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut paths: HashMap<PathBuf, usize> = HashMap::new();
        for (i, vol) in self.volume.iter().enumerate() {
            let at = |f: &str| format!("volume[{i}].{f}");
            let lss = u8::try_from(vol.lss)
                .ok()
                .filter(|l| lss_ids.contains(l))
                .ok_or_else(|| {
                    fail(
                        at("lss"),
                        format!("LSS 0x{:X} is not defined in [[lss]]", vol.lss),
                    )
                })?;
            let number = u8::try_from(vol.number)
                .map_err(|_| fail(at("number"), format!("{} is outside 0..255", vol.number)))?;
            let id = VolumeId::new(lss, number, serial.clone())
                .map_err(|e| fail(at("lss"), e.to_string()))?;
            let id_text = id.to_string();
            if let Some(other) = ids.insert(id_text.clone(), i) {
                return Err(fail(
                    at("number"),
                    format!("duplicate volume ID {id_text} (also volume[{other}])"),
                ));
            }
            if !vol.path.is_absolute() {
                return Err(fail(
                    at("path"),
                    format!("{} must be an absolute path", vol.path.display()),
                ));
            }
            let normal = normalize(&vol.path);
            if let Some(other) = paths.insert(normal, i) {
                return Err(fail(
                    at("path"),
                    format!(
                        "{} is already the backing of volume[{other}]",
                        vol.path.display()
                    ),
                ));
            }
            if let Some(size) = vol.size {
                if size.0 == 0 {
                    return Err(fail(at("size"), "must be greater than zero".into()));
                }
            }
            if let Some(desc) = &vol.description {
                if desc.len() > 4096 || desc.contains('\0') {
                    return Err(fail(
                        at("description"),
                        "must be at most 4096 bytes without NUL".into(),
                    ));
                }
            }
            if let Some(alias) = &vol.alias {
                if alias.is_empty() || alias.len() > 4096 || alias.contains('\0') {
                    return Err(fail(
                        at("alias"),
                        "must be 1..4096 bytes without NUL".into(),
                    ));
                }
                // FlashCopy names a relationship SOURCE:TARGET.
                if alias.contains(':') {
                    return Err(fail(
                        at("alias"),
                        format!(
                            "{alias:?} contains ':', which separates source and target in \
                             FlashCopy commands; choose another name"
                        ),
                    ));
                }
                // The API also takes IDs typed in lower case.
                if alias.to_ascii_uppercase().parse::<VolumeId>().is_ok() {
                    return Err(fail(
                        at("alias"),
                        format!("{alias:?} looks like a volume ID; choose another name"),
                    ));
                }
                if let Some(other) = names.insert(alias.clone(), i) {
                    return Err(fail(
                        at("alias"),
                        format!("alias {alias:?} is also used by volume[{other}]"),
                    ));
                }
            }
            volumes.push(VolumeSpec {
                index: i,
                id,
                config: vol.clone(),
            });
        }
        let (replication_listen, replication_secret, peers) =
            self.validate_replication(source, &serial)?;
        // Every TCP listener with the key that sets it, in file order.
        let mut listeners: Vec<(String, SocketAddr)> = nbd_listen
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("nbd.listen[{i}]"), *a))
            .collect();
        listeners.extend(api_listen.map(|a| ("api.listen".to_string(), a)));
        listeners.extend(replication_listen.map(|a| ("replication.listen".to_string(), a)));
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if let Some((other, at)) = listeners[..i].iter().find(|(_, b)| same_port(addr, b)) {
                return Err(fail(
                    key.clone(),
                    format!("{addr} takes the port of {other} ({at}); each listener needs its own"),
                ));
            }
        }
        Ok(ValidConfig {
            source: source.to_path_buf(),
            replication_listen,
            replication_secret,
            peers,
            serial,
            track_size: track,
            nbd_listen,
            api_listen,
            lss: lss_ids,
            volumes,
            raw: self,
        })
    }
}

type Replication = (
    Option<SocketAddr>,
    Option<Vec<u8>>,
    Vec<(Serial, SocketAddr)>,
);

impl Config {
    fn validate_replication(
        &self,
        source: &Path,
        own: &Serial,
    ) -> Result<Replication, ConfigError> {
        let fail = |field: String, message: String| ConfigError {
            file: source.to_path_buf(),
            field,
            message,
        };
        let mut peers: Vec<(Serial, SocketAddr)> = Vec::new();
        for (i, p) in self.peer.iter().enumerate() {
            let serial = Serial::new(&p.serial)
                .map_err(|e| fail(format!("peer[{i}].serial"), e.to_string()))?;
            if &serial == own {
                return Err(fail(
                    format!("peer[{i}].serial"),
                    format!("{serial} is this server's own serial"),
                ));
            }
            if peers.iter().any(|(s, _)| s == &serial) {
                return Err(fail(
                    format!("peer[{i}].serial"),
                    format!("duplicate peer {serial}"),
                ));
            }
            let addr: SocketAddr = p.address.parse().map_err(|_| {
                fail(
                    format!("peer[{i}].address"),
                    format!(
                        "{:?} is not an address:port such as \"192.0.2.7:7410\"",
                        p.address
                    ),
                )
            })?;
            peers.push((serial, addr));
        }
        let Some(rep) = &self.replication else {
            if !peers.is_empty() {
                return Err(fail(
                    "replication".into(),
                    "peers are configured but [replication] (with the shared secret) is missing"
                        .into(),
                ));
            }
            return Ok((None, None, peers));
        };
        if rep.timeout.0.is_zero() {
            return Err(fail(
                "replication.timeout".into(),
                "must be greater than zero".into(),
            ));
        }
        if rep.timeout.0 > MAX_REPLICATION_TIMEOUT {
            return Err(fail(
                "replication.timeout".into(),
                format!(
                    "must be at most {}s: a secondary silent that long is gone",
                    MAX_REPLICATION_TIMEOUT.as_secs()
                ),
            ));
        }
        let listen = match &rep.listen {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                fail(
                    "replication.listen".into(),
                    format!("{a:?} is not an address:port such as \"0.0.0.0:7410\""),
                )
            })?),
        };
        let secret = match (&rep.secret, &rep.secret_file) {
            (Some(_), Some(_)) => {
                return Err(fail(
                    "replication".into(),
                    "set either secret or secret_file, not both".into(),
                ))
            }
            (Some(s), None) => s.as_bytes().to_vec(),
            (None, Some(path)) => {
                let field = || "replication.secret_file".to_string();
                if !path.is_absolute() {
                    return Err(fail(
                        field(),
                        format!("{} must be an absolute path", path.display()),
                    ));
                }
                let mut bytes = std::fs::read(path)
                    .map_err(|e| fail(field(), format!("cannot read {}: {e}", path.display())))?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                if bytes.len() < MIN_SECRET_LEN {
                    return Err(fail(
                        field(),
                        format!(
                            "the shared secret in {} must be at least {MIN_SECRET_LEN} bytes, not {}",
                            path.display(),
                            bytes.len()
                        ),
                    ));
                }
                bytes
            }
            (None, None) => {
                return Err(fail(
                    "replication.secret".into(),
                    "a shared secret is required".into(),
                ))
            }
        };
        if secret.len() < MIN_SECRET_LEN {
            return Err(fail(
                "replication.secret".into(),
                format!("the shared secret must be at least {MIN_SECRET_LEN} bytes"),
            ));
        }
        Ok((listen, Some(secret), peers))
    }
}

/// Whether two TCP listeners would ask for the same port: equal fixed
/// ports on the same address, or on any address when one of them is the
/// wildcard (`0.0.0.0`, `[::]`). Port 0 (any free port) never clashes.
fn same_port(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Lexically normalizes a path (removes `.` and resolves `..`) so two
/// spellings of the same backing path compare equal before the files exist.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A site of the demo: `A` (the README's first command) or `B`, its
/// PPRC peer on the same machine (`essd --demo --site a|b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoSite {
    /// Serial FCA31, NBD on 127.0.0.1:10809, replication on 127.0.0.1:7410.
    A,
    /// Serial FCB02, NBD on 127.0.0.1:10810, replication on 127.0.0.1:7411.
    B,
}

impl DemoSite {
    /// This site's serial.
    pub fn serial(self) -> &'static str {
        match self {
            DemoSite::A => "FCA31",
            DemoSite::B => "FCB02",
        }
    }

    /// The other site.
    pub fn peer(self) -> DemoSite {
        match self {
            DemoSite::A => DemoSite::B,
            DemoSite::B => DemoSite::A,
        }
    }

    /// This site's NBD port on 127.0.0.1.
    pub fn nbd_port(self) -> u16 {
        match self {
            DemoSite::A => 10809,
            DemoSite::B => 10810,
        }
    }

    /// This site's replication port on 127.0.0.1.
    pub fn replication_port(self) -> u16 {
        match self {
            DemoSite::A => 7410,
            DemoSite::B => 7411,
        }
    }
}

/// The embedded demo configuration of `site`, rooted at `dir`: LSS 0x10
/// and 0x11, two 256 MiB volumes and one 64 MiB read-only volume, NBD on
/// 127.0.0.1 and on `dir/nbd.sock`, and the other site as its PPRC peer
/// (loopback only, with a secret fit for a demo and nothing else).
pub fn demo_config_text(dir: &Path, site: DemoSite) -> String {
    let d = dir.display();
    let (serial, nbd, replication) = (site.serial(), site.nbd_port(), site.replication_port());
    let peer = site.peer();
    let (peer_serial, peer_port) = (peer.serial(), peer.replication_port());
    let name = format!("ess-demo-{}", serial.to_lowercase());
    format!(
        r#"# essd demo configuration (generated by `essd --demo`)
[server]
serial = "{serial}"
name = "{name}"
state_dir = "{d}/state"
track_size = "64KiB"

[nbd]
listen = ["127.0.0.1:{nbd}"]
unix = "{d}/nbd.sock"

[api]
unix = "{d}/api.sock"

# PPRC with the other demo site on this machine.
[replication]
listen = "127.0.0.1:{replication}"
secret = "essd-demo-secret-for-loopback-only"

[[peer]]
serial = "{peer_serial}"
address = "127.0.0.1:{peer_port}"

[[lss]]
id = 0x10

[[lss]]
id = 0x11

[[volume]]
lss = 0x10
number = 0
path = "{d}/vol/000.img"
size = "256MiB"
description = "demo volume 0"
alias = "demo0"

[[volume]]
lss = 0x10
number = 1
path = "{d}/vol/001.img"
size = "256MiB"
description = "demo volume 1"

[[volume]]
lss = 0x11
number = 0
path = "{d}/vol/100.img"
size = "64MiB"
read_only = true
description = "demo read-only volume"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
serial = "FCA31"
state_dir = "/var/lib/essd"
[[lss]]
id = 0x10
[[volume]]
lss = 0x10
number = 0
path = "/srv/a.img"
size = "1GiB"
"#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn accepts_minimal_and_fills_defaults() {
        let cfg = Config::parse(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(cfg.track_size, 65536);
        assert_eq!(cfg.nbd_listen, vec!["127.0.0.1:10809".parse().unwrap()]);
        assert_eq!(cfg.volumes[0].id.to_string(), "000FCA31");
        assert_eq!(cfg.raw.api.unix, PathBuf::from(DEFAULT_API_SOCKET));
        assert_eq!(cfg.raw.server.io_engine, IoEngineChoice::Auto);
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = Config::parse(GOOD, Path::new("t.toml")).unwrap();
        let text = toml::to_string(&cfg.raw).unwrap();
        let again = Config::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(again.volumes[0].id, cfg.volumes[0].id);
        assert_eq!(again.track_size, cfg.track_size);
    }

    #[test]
    fn names_field_and_problem() {
        assert_eq!(
            err(&GOOD.replace("FCA31", "fca31")),
            "t.toml: server.serial: serial \"fca31\" must be exactly 5 characters from 0-9 and A-Z"
        );
        assert_eq!(
            err(&GOOD.replace("state_dir = \"/var/lib/essd\"", "track_size = \"3KiB\"")),
            "t.toml: server.track_size: 3KiB must be a power of two between 4KiB and 1MiB"
        );
        assert_eq!(
            err(&format!(
                "{GOOD}[[volume]]\nlss = 0x10\nnumber = 0\npath = \"/srv/b.img\"\nsize = 1\n"
            )),
            "t.toml: volume[1].number: duplicate volume ID 000FCA31 (also volume[0])"
        );
        assert_eq!(
            err(&format!(
                "{GOOD}[[volume]]\nlss = 0x10\nnumber = 1\npath = \"/srv/./a.img\"\nsize = 1\n"
            )),
            "t.toml: volume[1].path: /srv/./a.img is already the backing of volume[0]"
        );
        assert_eq!(
            err(&GOOD.replace("lss = 0x10", "lss = 0x12")),
            "t.toml: volume[0].lss: LSS 0x12 is not defined in [[lss]]"
        );
        assert!(err(&GOOD.replace("size = \"1GiB\"", "size = \"lots\""))
            .contains("invalid size \"lots\""));
        assert!(err(&GOOD.replace("serial = \"FCA31\"", "")).contains("missing field `serial`"));
        assert!(err(&format!("{GOOD}bogus = 1\n")).contains("unknown field `bogus`"));
    }

    #[test]
    fn replication_and_peers() {
        let with = |extra: &str| Config::parse(&format!("{GOOD}{extra}"), Path::new("t.toml"));
        let ok = with("[replication]\nlisten = \"127.0.0.1:7410\"\nsecret = \"0123456789abcdef\"\n[[peer]]\nserial = \"FCB02\"\naddress = \"127.0.0.1:7411\"\n").unwrap();
        assert_eq!(
            ok.replication_listen,
            Some("127.0.0.1:7410".parse().unwrap())
        );
        assert_eq!(
            ok.replication_secret.as_deref(),
            Some(&b"0123456789abcdef"[..])
        );
        assert_eq!(ok.peers[0].0.as_str(), "FCB02");
        assert_eq!(
            with("[replication]\nsecret = \"short\"\n")
                .unwrap_err()
                .to_string(),
            "t.toml: replication.secret: the shared secret must be at least 16 bytes"
        );
        assert_eq!(
            with("[[peer]]\nserial = \"FCB02\"\naddress = \"127.0.0.1:7411\"\n").unwrap_err().to_string(),
            "t.toml: replication: peers are configured but [replication] (with the shared secret) is missing"
        );
        assert_eq!(
            with("[replication]\nsecret = \"0123456789abcdef\"\n[[peer]]\nserial = \"FCA31\"\naddress = \"127.0.0.1:1\"\n").unwrap_err().to_string(),
            "t.toml: peer[0].serial: FCA31 is this server's own serial"
        );
        assert_eq!(
            with("[replication]\nsecret = \"0123456789abcdef\"\n[[peer]]\nserial = \"FCB02\"\naddress = \"peer-b\"\n").unwrap_err().to_string(),
            "t.toml: peer[0].address: \"peer-b\" is not an address:port such as \"192.0.2.7:7410\""
        );
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../config/essd.toml");
        let cfg = Config::parse(text, Path::new("config/essd.toml")).unwrap();
        let ids: Vec<String> = cfg.volumes.iter().map(|v| v.id.to_string()).collect();
        assert_eq!(ids, vec!["000FCA31", "108FCA31"]);
        assert_eq!(cfg.raw.volume[0].alias.as_deref(), Some("payroll"));
    }

    #[test]
    fn demo_configs_are_valid_and_peers_of_each_other() {
        for (site, id) in [(DemoSite::A, "100FCA31"), (DemoSite::B, "100FCB02")] {
            let text = demo_config_text(Path::new("/tmp/x"), site);
            let cfg = Config::parse(&text, Path::new("<demo>")).unwrap();
            assert_eq!(cfg.volumes.len(), 3);
            assert!(cfg.volumes[2].config.read_only);
            assert_eq!(cfg.volumes[2].id.to_string(), id);
            let peer = site.peer();
            assert!(text.contains(&format!(
                "listen = \"127.0.0.1:{}\"",
                site.replication_port()
            )));
            assert!(text.contains(&format!("serial = \"{}\"", peer.serial())));
            assert!(text.contains(&format!(
                "address = \"127.0.0.1:{}\"",
                peer.replication_port()
            )));
        }
    }

    #[test]
    fn values_that_would_misbehave_later_are_refused() {
        // A zero replication timeout suspends every pair at its first
        // mirrored write ("did not answer within 0ns").
        let e = err(&format!(
            "{GOOD}[replication]\nsecret = \"0123456789abcdef\"\ntimeout = \"0s\"\n"
        ));
        assert_eq!(e, "t.toml: replication.timeout: must be greater than zero");
        // A huge one overflows the clock at the first mirrored write.
        let e = err(&format!(
            "{GOOD}[replication]\nsecret = \"0123456789abcdef\"\ntimeout = 5000000000000000000\n"
        ));
        assert_eq!(
            e,
            "t.toml: replication.timeout: must be at most 3600s: a secondary silent that long is gone"
        );
        // A zero drain time would record no duplex pair in sync at a stop.
        let e = err(&GOOD.replace("[[lss]]", "drain_timeout = \"0s\"\n[[lss]]"));
        assert_eq!(e, "t.toml: server.drain_timeout: must be greater than zero");
        // One socket path for the NBD and the API listener: start-up fails
        // with "another process is listening on this socket".
        let e = err(&GOOD.replace("[[lss]]", "[nbd]\nunix = \"/run/essd/api.sock\"\n[[lss]]"));
        assert_eq!(e, "t.toml: api.unix: /run/essd/api.sock is also nbd.unix");
        // An alias that is another volume's ID in lower case, which the API
        // accepts for that volume, would name this one instead.
        let e = err(&format!("{GOOD}alias = \"001fca31\"\n"));
        assert_eq!(
            e,
            "t.toml: volume[0].alias: \"001fca31\" looks like a volume ID; choose another name"
        );
        // One with a colon would be taken for SOURCE:TARGET by FlashCopy.
        let e = err(&format!("{GOOD}alias = \"db:prod\"\n"));
        assert_eq!(
            e,
            "t.toml: volume[0].alias: \"db:prod\" contains ':', which separates source and \
             target in FlashCopy commands; choose another name"
        );
    }
}
