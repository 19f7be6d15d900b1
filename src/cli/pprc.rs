//! `essctl pprc`: PPRC paths to peer storage servers.

use std::io::Write;

use clap::Subcommand;

use super::{output, CliError, Session};
use crate::control::api::PathList;
use crate::copy::pprc::paths::{PathRequest, PathView, MAX_LINKS};

/// `essctl pprc ...`.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum PprcCommand {
    /// Paths: routes from a local LSS to a peer's LSS over 1-8 links.
    #[command(subcommand)]
    Path(PathCommand),
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
        /// Force removal of an existing path first.
        #[arg(long)]
        force: bool,
    },
    /// List paths and the state of each link.
    #[command(alias = "ls")]
    List,
    /// Remove a path and close its links.
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
        let PprcCommand::Path(command) = command;
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
            } => {
                let path = format!("/v1/pprc/paths/0x{lss:02X}/{peer}/0x{peer_lss:02X}");
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
