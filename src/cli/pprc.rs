//! `essctl pprc`: PPRC paths to peer storage servers, pairs, and the
//! consistency group.
//!
//! `pprc wait` polls a pair until it is duplex (or its copy has reached
//! `--threshold` percent), drawing progress on stderr; it fails (exit
//! code 1) if the pair suspends or ends, and times out with exit code 5.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;

use super::flashcopy::parse_timeout;
use super::wait::{Pace, Progress};
use super::{output, CliError, Session};
use crate::control::api::{PairList, PathList};
use crate::copy::pprc::manager::{CopyOption, EstablishPair, PairView};
use crate::copy::pprc::paths::{PathRequest, PathView, MAX_LINKS};

/// `essctl pprc ...`.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum PprcCommand {
    /// Paths: routes from a local LSS to a peer's LSS over 1-8 links.
    #[command(subcommand)]
    Path(PathCommand),
    /// Establish a pair: PRIMARY here mirrored to SECONDARY on a peer (its
    /// ID names the peer), over an existing path between their LSSs.
    Establish {
        /// Primary volume on this server, e.g. 100FCA31.
        primary: String,
        /// Secondary volume on the peer, e.g. 100FCB02.
        secondary: String,
        /// copy (entire volume), nocopy (known identical) or resync
        /// (out-of-sync tracks only, to resume a suspended pair).
        #[arg(long, default_value = "copy", value_parser = parse_mode)]
        mode: CopyOption,
        /// Critical volume mode (see the LSS's critical_heavy setting).
        #[arg(long)]
        critical: bool,
        /// Permit if the secondary is attached by hosts.
        #[arg(long)]
        permit_online: bool,
    },
    /// Resume a suspended pair, copying only its out-of-sync tracks.
    Resume {
        /// Primary volume.
        volume: String,
    },
    /// Suspend a pair (at the primary or at the secondary).
    Suspend {
        /// Volume of either side.
        volume: String,
    },
    /// End a pair. At the primary both sides become simplex; at the
    /// secondary (primary unreachable) the secondary becomes writable and
    /// the pair cannot be resumed (establish it again with a full copy).
    #[command(visible_alias = "rm")]
    Terminate {
        /// Volume of either side.
        volume: String,
    },
    /// At the secondary: take over without the primary; the volume becomes
    /// the suspended primary of the reverse pair and records its changes.
    Failover {
        /// The secondary volume.
        volume: String,
    },
    /// At the volume that took over: make the old primary the secondary
    /// and copy only the tracks changed on either side.
    Failback {
        /// The volume that took over.
        volume: String,
    },
    /// List pairs (both roles) and their replication status.
    #[command(visible_alias = "ls")]
    List,
    /// Show one pair in detail.
    Show {
        /// Volume of either side.
        volume: String,
    },
    /// Wait until a pair is duplex (or its copy reaches --threshold).
    Wait {
        /// Primary volume (a secondary, at its server: until its side is duplex).
        volume: String,
        /// Done when this percentage of tracks is in sync.
        #[arg(long, value_name = "PCT", default_value = "100", value_parser = parse_threshold)]
        threshold: f64,
        /// Minutes between polls (fractions allowed, e.g. 0.05).
        #[arg(long, value_name = "MIN", default_value = "0.02", value_parser = parse_minutes)]
        interval: Duration,
        /// Give up after this many seconds (exit code 5).
        #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
        timeout: Option<Duration>,
    },
    /// Freeze the consistency group: suspend all its pairs together.
    Freeze,
    /// Release writes held by the consistency group.
    Unfreeze,
    /// Show the consistency group.
    Group,
}

fn parse_mode(text: &str) -> Result<CopyOption, String> {
    match text {
        "copy" | "full" => Ok(CopyOption::Copy),
        "nocopy" => Ok(CopyOption::Nocopy),
        "resync" => Ok(CopyOption::Resync),
        _ => Err("expected copy, nocopy or resync".into()),
    }
}

fn parse_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err("expected a percentage from 0 to 100".into()),
    }
}

fn parse_minutes(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 => {
            Duration::try_from_secs_f64(m * 60.0).map_err(|e| e.to_string())
        }
        _ => Err("expected a number of minutes greater than 0".into()),
    }
}

const PAIR_HEADERS: [&str; 8] = [
    "VOLUME",
    "ROLE",
    "STATE",
    "PEER",
    "PEER VOLUME",
    "OUT OF SYNC",
    "REPLICATION",
    "REASON",
];

fn pair_rows(pairs: &[PairView]) -> Vec<Vec<String>> {
    pairs
        .iter()
        .map(|p| {
            vec![
                p.volume.clone(),
                role_name(p),
                p.state.clone(),
                p.peer.clone(),
                p.peer_volume.clone(),
                p.out_of_sync_tracks.to_string(),
                p.replication_status.clone(),
                output::or_dash(p.reason.as_deref()),
            ]
        })
        .collect()
}

fn role_name(p: &PairView) -> String {
    match p.role {
        crate::copy::pprc::manager::PairRole::Primary => "primary".into(),
        crate::copy::pprc::manager::PairRole::Secondary => "secondary".into(),
    }
}

/// `essctl pprc path ...`.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum PathCommand {
    /// Establish a path and open its links.
    Establish {
        /// Local LSS, e.g. 0x10.
        #[arg(value_parser = parse_lss)]
        lss: u8,
        /// Peer serial, e.g. FCB02.
        peer: String,
        /// Peer LSS, e.g. 0x10.
        #[arg(value_parser = parse_lss)]
        peer_lss: u8,
        /// Number of links (1-8).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_LINKS as i64))]
        links: u8,
        /// Do not establish if the path already exists.
        #[arg(long, conflicts_with = "force")]
        if_not_exists: bool,
        /// Force removal of an existing path: its links are replaced by
        /// the new ones, opened first (pairs over it go on over them).
        #[arg(long)]
        force: bool,
    },
    /// List paths and the state of each link.
    #[command(alias = "ls")]
    List,
    /// Remove a path and close its links (refused while pairs use it,
    /// unless --force).
    #[command(alias = "rm")]
    Remove {
        /// Local LSS.
        #[arg(value_parser = parse_lss)]
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        #[arg(value_parser = parse_lss)]
        peer_lss: u8,
        /// Remove the path although pairs use it: they stop mirroring
        /// (suspend; critical ones are write-inhibited).
        #[arg(long)]
        force: bool,
    },
}

fn parse_lss(text: &str) -> Result<u8, String> {
    crate::volume::id::parse_lss(text).map_err(|e| e.to_string())
}

fn path_rows(paths: &[PathView]) -> Vec<Vec<String>> {
    paths
        .iter()
        .flat_map(|p| {
            p.links.iter().enumerate().map(move |(i, l)| {
                vec![
                    p.lss.clone(),
                    p.peer.clone(),
                    p.peer_lss.clone(),
                    p.peer_address.clone(),
                    p.state.clone(),
                    (i + 1).to_string(),
                    l.state.clone(),
                    l.since.clone(),
                    l.reason.clone().unwrap_or_else(|| "-".into()),
                ]
            })
        })
        .collect()
}

const HEADERS: [&str; 9] = [
    "LSS", "PEER", "PEER LSS", "ADDRESS", "PATH", "LINK", "STATE", "SINCE", "REASON",
];

impl Session {
    /// Runs one `essctl pprc` command.
    pub(super) fn pprc(&self, out: &mut dyn Write, command: &PprcCommand) -> Result<(), CliError> {
        let command = match command {
            PprcCommand::Path(c) => c,
            other => return self.pprc_pair(out, other),
        };
        match command {
            PathCommand::Establish {
                lss,
                peer,
                peer_lss,
                links,
                if_not_exists,
                force,
            } => {
                let request = PathRequest {
                    lss: *lss,
                    peer: peer.clone(),
                    peer_lss: *peer_lss,
                    links: usize::from(*links),
                    if_not_exists: *if_not_exists,
                    force: *force,
                };
                let response = self.post("/v1/pprc/paths", &request)?;
                let Some(view) = self.table_data::<PathView>(out, &response)? else {
                    return Ok(());
                };
                write!(out, "{}", output::table(&HEADERS, &path_rows(&[view])))?;
                Ok(())
            }
            PathCommand::List => {
                let response = self.get("/v1/pprc/paths")?;
                let Some(list) = self.table_data::<PathList>(out, &response)? else {
                    return Ok(());
                };
                if list.paths.is_empty() {
                    writeln!(out, "no PPRC paths")?;
                } else {
                    write!(out, "{}", output::table(&HEADERS, &path_rows(&list.paths)))?;
                }
                Ok(())
            }
            PathCommand::Remove {
                lss,
                peer,
                peer_lss,
                force,
            } => {
                let path = format!(
                    "/v1/pprc/paths/0x{lss:02X}/{}/0x{peer_lss:02X}{}",
                    super::client::encode_segment(peer),
                    if *force { "?force=true" } else { "" }
                );
                let response = self.delete(&path)?;
                let Some(view) = self.table_data::<PathView>(out, &response)? else {
                    return Ok(());
                };
                writeln!(
                    out,
                    "removed path {} → {} {}",
                    view.lss, view.peer, view.peer_lss
                )?;
                Ok(())
            }
        }
    }
}

impl Session {
    fn pair_answer(
        &self,
        out: &mut dyn Write,
        response: &super::client::Response,
    ) -> Result<(), CliError> {
        let Some(view) = self.table_data::<PairView>(out, response)? else {
            return Ok(());
        };
        write!(
            out,
            "{}",
            output::table(&PAIR_HEADERS, &pair_rows(std::slice::from_ref(&view)))
        )?;
        if let Some(d) = &view.detail {
            writeln!(out, "note: {d}")?;
        }
        Ok(())
    }

    fn pprc_pair(&self, out: &mut dyn Write, command: &PprcCommand) -> Result<(), CliError> {
        let at = |volume: &str, action: &str| {
            format!(
                "/v1/pprc/pairs/{}{action}",
                super::client::encode_segment(volume)
            )
        };
        match command {
            PprcCommand::Path(_) => unreachable!("paths are handled by the caller"),
            PprcCommand::Establish {
                primary,
                secondary,
                mode,
                critical,
                permit_online,
            } => {
                let request = EstablishPair {
                    volume: primary.clone(),
                    secondary: secondary.clone(),
                    mode: *mode,
                    critical: *critical,
                    permit_online: *permit_online,
                };
                let response = self.post("/v1/pprc/pairs", &request)?;
                self.pair_answer(out, &response)
            }
            PprcCommand::Resume { volume } => {
                let current: PairView = self.decode(&self.get(&at(volume, ""))?)?;
                let request = EstablishPair {
                    volume: volume.clone(),
                    secondary: current.peer_volume,
                    mode: CopyOption::Resync,
                    critical: current.critical,
                    permit_online: false,
                };
                let response = self.post("/v1/pprc/pairs", &request)?;
                self.pair_answer(out, &response)
            }
            PprcCommand::Suspend { volume } => {
                let response = self.post(&at(volume, "/suspend"), &serde_json::json!({}))?;
                self.pair_answer(out, &response)
            }
            PprcCommand::Terminate { volume } => {
                let response = self.delete(&at(volume, ""))?;
                self.pair_answer(out, &response)
            }
            PprcCommand::Failover { volume } => {
                let response = self.post(&at(volume, "/failover"), &serde_json::json!({}))?;
                self.pair_answer(out, &response)
            }
            PprcCommand::Failback { volume } => {
                let response = self.post(&at(volume, "/failback"), &serde_json::json!({}))?;
                self.pair_answer(out, &response)
            }
            PprcCommand::List => {
                let response = self.get("/v1/pprc/pairs")?;
                let Some(list) = self.table_data::<PairList>(out, &response)? else {
                    return Ok(());
                };
                if list.pairs.is_empty() {
                    writeln!(out, "no PPRC pairs")?;
                } else {
                    write!(
                        out,
                        "{}",
                        output::table(&PAIR_HEADERS, &pair_rows(&list.pairs))
                    )?;
                }
                Ok(())
            }
            PprcCommand::Show { volume } => {
                let response = self.get(&at(volume, ""))?;
                let Some(v) = self.table_data::<PairView>(out, &response)? else {
                    return Ok(());
                };
                let links = match (&v.path, v.primary_links) {
                    (Some(p), _) => {
                        let up = p.links.iter().filter(|l| l.state == "up").count();
                        Some(format!("{} ({up}/{} links up)", p.state, p.links.len()))
                    }
                    // The secondary side: the links its primary opened.
                    (None, Some(0)) => Some(format!(
                        "no link from the primary since {}",
                        output::or_dash(v.primary_unreachable_since.as_deref())
                    )),
                    (None, Some(n)) => Some(format!("{n} link(s) from the primary")),
                    (None, None) => None,
                };
                let rows = [
                    ("volume", v.volume.clone()),
                    ("role", role_name(&v)),
                    ("state", v.state.clone()),
                    ("reason", output::or_dash(v.reason.as_deref())),
                    ("detail", output::or_dash(v.detail.as_deref())),
                    ("since", v.since.clone()),
                    ("peer", v.peer.clone()),
                    ("peer address", output::or_dash(v.peer_address.as_deref())),
                    ("peer volume", v.peer_volume.clone()),
                    ("path", output::or_dash(links.as_deref())),
                    (
                        "out-of-sync tracks",
                        format!("{} of {}", v.out_of_sync_tracks, v.tracks),
                    ),
                    ("in sync", output::percent(v.copied_percent)),
                    ("bytes sent", v.bytes_sent.to_string()),
                    ("copy started", output::or_dash(v.copy_started.as_deref())),
                    (
                        "copy completed",
                        output::or_dash(v.copy_completed.as_deref()),
                    ),
                    ("critical", output::yes_no(v.critical)),
                    ("write inhibited", output::yes_no(v.write_inhibited)),
                    ("consistency group", output::yes_no(v.consistency_group)),
                    ("replication status", v.replication_status.clone()),
                ];
                out.write_all(output::key_values(&rows).as_bytes())?;
                Ok(())
            }
            PprcCommand::Wait {
                volume,
                threshold,
                interval,
                timeout,
            } => self.pprc_wait(out, volume, *threshold, *interval, *timeout),
            PprcCommand::Freeze | PprcCommand::Unfreeze => {
                let path = if matches!(command, PprcCommand::Freeze) {
                    "/v1/pprc/freeze"
                } else {
                    "/v1/pprc/unfreeze"
                };
                let response = self.post(path, &serde_json::json!({}))?;
                let Some(v) = self.table_data::<serde_json::Value>(out, &response)? else {
                    return Ok(());
                };
                writeln!(
                    out,
                    "{} pair(s) suspended; consistency group {}",
                    v["suspended"].as_u64().unwrap_or(0),
                    v["group"]["state"].as_str().unwrap_or("-")
                )?;
                Ok(())
            }
            PprcCommand::Group => {
                let response = self.get("/v1/pprc/group")?;
                let Some(v) = self.table_data::<serde_json::Value>(out, &response)? else {
                    return Ok(());
                };
                if v["configured"] != serde_json::Value::Bool(true) {
                    writeln!(out, "no LSS of this server is in a consistency group")?;
                    return Ok(());
                }
                let volumes: Vec<String> = v["volumes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let rows = [
                    (
                        "state",
                        v["group"]["state"].as_str().unwrap_or("-").to_string(),
                    ),
                    (
                        "volumes",
                        if volumes.is_empty() {
                            "-".into()
                        } else {
                            volumes.join(", ")
                        },
                    ),
                ];
                out.write_all(output::key_values(&rows).as_bytes())?;
                Ok(())
            }
        }
    }

    /// `pprc wait`: see the module docs.
    fn pprc_wait(
        &self,
        out: &mut dyn Write,
        volume: &str,
        threshold: f64,
        interval: Duration,
        timeout: Option<Duration>,
    ) -> Result<(), CliError> {
        let path = format!("/v1/pprc/pairs/{}", super::client::encode_segment(volume));
        let mut pace = Pace::new(interval, timeout);
        let mut progress = Progress::new();
        loop {
            let answer = self
                .client
                .clone()
                .with_timeout(pace.request_timeout())
                .get(&path)
                .map_err(|e| pace.poll_error(e, &format!("the pair of {volume}")))
                .and_then(|r| self.check(r))
                .and_then(|r| self.decode::<PairView>(&r));
            let v = match answer {
                Ok(v) => v,
                Err(e) => {
                    progress.finish();
                    return Err(e);
                }
            };
            let secondary = v.role == crate::copy::pprc::manager::PairRole::Secondary;
            // A secondary counts no tracks: it is in sync once duplex.
            let in_sync = if secondary {
                (v.tracks as f64 * v.copied_percent / 100.0) as u64
            } else {
                v.tracks - v.out_of_sync_tracks.min(v.tracks)
            };
            let speed = pace.polled(in_sync, v.track_size);
            let what = if secondary {
                format!("{} {} → {}", v.peer, v.peer_volume, v.volume)
            } else {
                format!("{} → {} {}", v.volume, v.peer, v.peer_volume)
            };
            if v.state == "suspended" || v.state == "simplex" {
                progress.finish();
                return Err(CliError::Server(format!(
                    "pair {what} is {}{}",
                    v.state,
                    v.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                )));
            }
            let done = v.state == "duplex" || (threshold < 100.0 && v.copied_percent >= threshold);
            progress.update(&what, in_sync, v.tracks, speed);
            if done {
                progress.finish();
                if self.json {
                    let answer = serde_json::json!({
                        "complete": v.state == "duplex",
                        "state": v.state,
                        "copied_percent": v.copied_percent,
                        "waited_seconds": pace.elapsed().as_secs_f64(),
                    });
                    writeln!(out, "{answer:#}")?;
                } else {
                    writeln!(
                        out,
                        "{what}: {} ({} in sync, {:.1} s)",
                        v.state,
                        output::percent(v.copied_percent),
                        pace.elapsed().as_secs_f64()
                    )?;
                }
                return Ok(());
            }
            // Tracks left before the wait is over: to the threshold, or all.
            let goal = (v.tracks as f64 * threshold.min(100.0) / 100.0).ceil() as u64;
            let Some(nap) = pace.nap(goal.saturating_sub(in_sync)) else {
                progress.finish();
                return Err(CliError::Timeout(format!(
                    "timed out after {} s waiting for {what} ({} in sync)",
                    timeout.unwrap_or_default().as_secs_f64(),
                    output::percent(v.copied_percent)
                )));
            };
            std::thread::sleep(nap);
        }
    }
}
