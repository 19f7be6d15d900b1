//! `essctl flashcopy ...` and `essctl log`: establishing, withdrawing,
//! listing and waiting for FlashCopy relationships, and the server's event
//! log.
//!
//! `flashcopy wait` polls `GET /v1/flashcopy/{selector}` until the
//! relationships it found at the first poll have ended (a COPY relationship
//! ends by itself once its background copy is complete) or are `copied`.
//! Its progress goes to stderr: a bar redrawn in place on a terminal, one
//! plain line per poll otherwise. It fails (exit code 1) on a NOCOPY
//! relationship, which has no background copy, on a failed copy, and when a
//! relationship is withdrawn before its copy completed; it times out with
//! exit code 5.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;

use super::output;
use super::wait::{Pace, Progress};
use super::{client, CliError, Session};
use crate::control::api::{
    EstablishRequest, EventList, FlashCopyList, FlashCopyPair, RelationshipList, WithdrawRequest,
};
use crate::copy::flashcopy::manager::{RelationshipState, RelationshipView};
use crate::copy::flashcopy::CopyMode;
use crate::units::human_bytes;

/// `essctl flashcopy ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum FlashCopyCommand {
    /// Establish relationships, all pairs with one common point in time (T0).
    Establish {
        /// Source and target volume (ID or alias), e.g. 000FCA31:001FCA31.
        #[arg(required = true, value_name = "SOURCE:TARGET", value_parser = parse_pair)]
        pairs: Vec<FlashCopyPair>,
        /// No background copy: only tracks about to change are copied, and
        /// the relationship lasts until withdrawn.
        #[arg(long)]
        nocopy: bool,
        /// Limit the background copy to this many MiB/s (default: unlimited).
        #[arg(long, value_name = "MIB_S", value_parser = parse_rate, conflicts_with = "nocopy")]
        rate: Option<f64>,
        /// Allow targets that have NBD clients attached.
        #[arg(long)]
        permit_online: bool,
    },
    /// Withdraw relationships: every relationship of a volume, or SOURCE:TARGET.
    #[command(visible_alias = "rm")]
    Withdraw {
        /// Volume ID or alias, or SOURCE:TARGET.
        #[arg(required = true, value_name = "SELECTOR")]
        selectors: Vec<String>,
    },
    /// List every relationship and the targets left incomplete.
    #[command(visible_alias = "ls")]
    List,
    /// Show the relationship of a volume, or SOURCE:TARGET, in detail.
    Show {
        /// Volume ID or alias, or SOURCE:TARGET.
        selector: String,
    },
    /// Wait until the background copy of a relationship is complete; exits
    /// 5 if --timeout expires first.
    Wait {
        /// Volume ID or alias, or SOURCE:TARGET.
        selector: String,
        /// Seconds between polls.
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
        interval: Duration,
        /// Give up after this many seconds (exit code 5).
        #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
        timeout: Option<Duration>,
    },
}

/// Parses `SOURCE:TARGET`.
fn parse_pair(text: &str) -> Result<FlashCopyPair, String> {
    match text.split_once(':') {
        Some((source, target))
            if !source.is_empty() && !target.is_empty() && !target.contains(':') =>
        {
            Ok(FlashCopyPair {
                source: source.to_string(),
                target: target.to_string(),
            })
        }
        _ => Err("expected SOURCE:TARGET, e.g. 000FCA31:001FCA31".into()),
    }
}

/// Parses a copy rate in MiB/s: a number greater than 0.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err("expected a number of MiB/s greater than 0".into()),
    }
}

fn parse_seconds(text: &str, min_exclusive: bool) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 || (min_exclusive && secs == 0.0) {
        return Err(if min_exclusive {
            "expected a number of seconds greater than 0".into()
        } else {
            "expected a number of seconds, 0 or more".into()
        });
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// Parses `--interval`: seconds, greater than 0.
fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_seconds(text, true)
}

/// Parses `--timeout`: seconds, 0 or more.
pub(super) fn parse_timeout(text: &str) -> Result<Duration, String> {
    parse_seconds(text, false)
}

/// `copy` or `nocopy`.
fn mode_name(mode: CopyMode) -> &'static str {
    match mode {
        CopyMode::Copy => "copy",
        CopyMode::NoCopy => "nocopy",
    }
}

/// The state as the API spells it.
fn state_name(state: RelationshipState) -> &'static str {
    match state {
        RelationshipState::Copying => "copying",
        RelationshipState::Copied => "copied",
        RelationshipState::Nocopy => "nocopy",
        RelationshipState::Failed => "failed",
    }
}

/// `SOURCE → TARGET`.
fn pair_name(v: &RelationshipView) -> String {
    format!("{} → {}", v.source, v.target)
}

/// Whether two views are of the same relationship (same pair and T0).
fn same_relationship(a: &RelationshipView, b: &RelationshipView) -> bool {
    a.source == b.source && a.target == b.target && a.t0_unix == b.t0_unix
}

/// The `warning: ...` line for a withdrawn relationship whose target is left
/// incomplete, if it is.
fn incomplete_warning(v: &RelationshipView) -> Option<String> {
    if v.tracks_remaining == 0 {
        return None;
    }
    let why = match v.mode {
        CopyMode::Copy => format!("background copy was {} done", output::percent(v.percent)),
        CopyMode::NoCopy => format!(
            "NOCOPY relationship: {} of its tracks were copied",
            output::percent(v.percent)
        ),
    };
    Some(format!(
        "warning: target {} is incomplete ({why})",
        v.target
    ))
}

/// What one poll of `flashcopy wait` found.
enum Poll {
    /// Still copying: keep polling.
    Copying,
    /// Every watched relationship is complete.
    Complete,
}

impl Session {
    /// Runs one `essctl flashcopy` command.
    pub(super) fn flashcopy(
        &self,
        out: &mut dyn Write,
        command: &FlashCopyCommand,
    ) -> Result<(), CliError> {
        match command {
            FlashCopyCommand::Establish {
                pairs,
                nocopy,
                rate,
                permit_online,
            } => {
                let request = EstablishRequest {
                    pairs: pairs.clone(),
                    nocopy: *nocopy,
                    rate_mib_s: *rate,
                    permit_online: *permit_online,
                };
                self.flashcopy_establish(out, &request)
            }
            FlashCopyCommand::Withdraw { selectors } => self.flashcopy_withdraw(out, selectors),
            FlashCopyCommand::List => self.flashcopy_list(out),
            FlashCopyCommand::Show { selector } => self.flashcopy_show(out, selector),
            FlashCopyCommand::Wait {
                selector,
                interval,
                timeout,
            } => self.flashcopy_wait(out, selector, *interval, *timeout),
        }
    }

    fn flashcopy_establish(
        &self,
        out: &mut dyn Write,
        request: &EstablishRequest,
    ) -> Result<(), CliError> {
        let response = self.post("/v1/flashcopy", request)?;
        let Some(list) = self.table_data::<RelationshipList>(out, &response)? else {
            return Ok(());
        };
        let rows: Vec<Vec<String>> = list
            .relationships
            .iter()
            .map(|v| {
                vec![
                    v.source.clone(),
                    v.target.clone(),
                    mode_name(v.mode).to_string(),
                    state_name(v.state).to_string(),
                    output::percent(v.percent),
                    v.t0.clone(),
                ]
            })
            .collect();
        out.write_all(
            output::table(
                &["SOURCE", "TARGET", "MODE", "STATE", "COPIED%", "T0"],
                &rows,
            )
            .as_bytes(),
        )?;
        Ok(())
    }

    fn flashcopy_withdraw(
        &self,
        out: &mut dyn Write,
        selectors: &[String],
    ) -> Result<(), CliError> {
        let request = WithdrawRequest {
            volumes: selectors.to_vec(),
        };
        let response = self.post("/v1/flashcopy/withdraw", &request)?;
        let list: RelationshipList = self.decode(&response)?;
        if !self.print_json(out, &response)? {
            for v in &list.relationships {
                writeln!(
                    out,
                    "withdrew {} ({}, {} of {} tracks copied)",
                    pair_name(v),
                    mode_name(v.mode),
                    v.tracks_copied,
                    v.tracks_total
                )?;
            }
        }
        out.flush()?;
        for warning in list.relationships.iter().filter_map(incomplete_warning) {
            eprintln!("{warning}");
        }
        Ok(())
    }

    fn flashcopy_list(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/flashcopy")?;
        let Some(list) = self.table_data::<FlashCopyList>(out, &response)? else {
            return Ok(());
        };
        if list.relationships.is_empty() {
            writeln!(out, "no FlashCopy relationships")?;
        } else {
            let rows: Vec<Vec<String>> = list
                .relationships
                .iter()
                .map(|v| {
                    vec![
                        v.source.clone(),
                        v.target.clone(),
                        mode_name(v.mode).to_string(),
                        state_name(v.state).to_string(),
                        output::percent(v.percent),
                        format!("{}/{}", v.tracks_copied, v.tracks_total),
                        output::rate(v.rate_mib_s),
                        v.t0.clone(),
                    ]
                })
                .collect();
            out.write_all(
                output::table(
                    &[
                        "SOURCE", "TARGET", "MODE", "STATE", "COPIED", "TRACKS", "RATE", "T0",
                    ],
                    &rows,
                )
                .as_bytes(),
            )?;
        }
        if !list.incomplete_targets.is_empty() {
            writeln!(
                out,
                "incomplete targets: {}",
                list.incomplete_targets.join(", ")
            )?;
        }
        Ok(())
    }

    fn flashcopy_show(&self, out: &mut dyn Write, selector: &str) -> Result<(), CliError> {
        let path = format!("/v1/flashcopy/{}", client::encode_segment(selector));
        let response = self.get(&path)?;
        let Some(list) = self.table_data::<RelationshipList>(out, &response)? else {
            return Ok(());
        };
        for (i, v) in list.relationships.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            let pairs = [
                ("source", v.source.clone()),
                ("target", v.target.clone()),
                ("state", state_name(v.state).to_string()),
                ("mode", mode_name(v.mode).to_string()),
                ("rate", output::rate(v.rate_mib_s)),
                ("T0", v.t0.clone()),
                (
                    "track size",
                    format!("{} ({} bytes)", human_bytes(v.track_size), v.track_size),
                ),
                ("tracks total", v.tracks_total.to_string()),
                ("tracks copied", v.tracks_copied.to_string()),
                ("tracks remaining", v.tracks_remaining.to_string()),
                ("percent", output::percent(v.percent)),
                (
                    "bytes copied",
                    format!("{} ({} bytes)", human_bytes(v.bytes_copied), v.bytes_copied),
                ),
                ("error", output::or_dash(v.error.as_deref())),
            ];
            out.write_all(output::key_values(&pairs).as_bytes())?;
        }
        Ok(())
    }

    /// `flashcopy wait`: see the module docs.
    fn flashcopy_wait(
        &self,
        out: &mut dyn Write,
        selector: &str,
        interval: Duration,
        timeout: Option<Duration>,
    ) -> Result<(), CliError> {
        let path = format!("/v1/flashcopy/{}", client::encode_segment(selector));
        let mut pace = Pace::new(interval, timeout);
        let mut progress = Progress::new();
        // The relationships found at the first poll, as last seen.
        let mut watched: Vec<RelationshipView> = Vec::new();
        loop {
            let response = self
                .client
                .clone()
                .with_timeout(pace.request_timeout())
                .get(&path)
                .map_err(|e| {
                    progress.finish();
                    pace.poll_error(e, &format!("the background copy of {selector}"))
                })?;
            let current = if response.status == 404 && !watched.is_empty() {
                // Nothing involves the selector any more: the watched
                // relationships ended.
                Vec::new()
            } else {
                let list: RelationshipList = self.decode(&self.check(response)?)?;
                list.relationships
            };
            if watched.is_empty() {
                if current.is_empty() {
                    return Err(CliError::Server(format!(
                        "no FlashCopy relationship involves {selector}"
                    )));
                }
                watched.clone_from(&current);
            }
            let outcome = self.wait_poll(&mut watched, &current, &pace, selector);
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(e) => {
                    progress.finish();
                    return Err(e);
                }
            };
            let copied: u64 = watched.iter().map(|v| v.tracks_copied).sum();
            let total: u64 = watched.iter().map(|v| v.tracks_total).sum();
            let track_size = watched.first().map_or(0, |v| v.track_size);
            let speed = pace.polled(copied, track_size);
            let what = watched.iter().map(pair_name).collect::<Vec<_>>().join(", ");
            match outcome {
                Poll::Complete => {
                    progress.update(&what, total, total, speed);
                    progress.finish();
                    return self.wait_done(out, &watched, pace.elapsed());
                }
                Poll::Copying => progress.update(&what, copied, total, speed),
            }
            let Some(nap) = pace.nap(total.saturating_sub(copied)) else {
                progress.finish();
                return Err(CliError::Timeout(format!(
                    "timed out after {} s waiting for the background copy of {what} ({} copied)",
                    timeout.unwrap_or_default().as_secs_f64(),
                    output::percent(if total == 0 {
                        100.0
                    } else {
                        copied as f64 * 100.0 / total as f64
                    })
                )));
            };
            std::thread::sleep(nap);
        }
    }

    /// Updates `watched` from one poll's `current` relationships and decides
    /// whether the wait is over. Relationships that disappeared ended: fine
    /// if their copy completed, an error if they were withdrawn before.
    fn wait_poll(
        &self,
        watched: &mut [RelationshipView],
        current: &[RelationshipView],
        pace: &Pace,
        selector: &str,
    ) -> Result<Poll, CliError> {
        let mut ended = Vec::new();
        let mut all_copied = true;
        for w in watched.iter_mut() {
            match current.iter().find(|c| same_relationship(c, w)) {
                Some(c) => {
                    *w = c.clone();
                    match c.state {
                        RelationshipState::Nocopy => {
                            return Err(CliError::Server(format!(
                                "FlashCopy relationship {} is NOCOPY: it has no background copy to wait for",
                                pair_name(c)
                            )))
                        }
                        RelationshipState::Failed => {
                            return Err(CliError::Server(c.error.clone().unwrap_or_else(|| {
                                format!("background copy {} failed", pair_name(c))
                            })))
                        }
                        RelationshipState::Copied => {}
                        RelationshipState::Copying => all_copied = false,
                    }
                }
                None => ended.push(w.clone()),
            }
        }
        if !ended.is_empty() {
            // Ended by completion or by a withdraw? A withdraw before the
            // copy completed leaves the target incomplete. Like the other
            // polls, this one is given only what is left of the timeout.
            let response = self
                .client
                .clone()
                .with_timeout(pace.request_timeout())
                .get("/v1/flashcopy")
                .map_err(|e| pace.poll_error(e, &format!("the background copy of {selector}")))?;
            let list: FlashCopyList = self.decode(&self.check(response)?)?;
            for e in &ended {
                if list.incomplete_targets.contains(&e.target) {
                    return Err(CliError::Server(format!(
                        "FlashCopy relationship {} was withdrawn before its background copy completed: target {} is incomplete",
                        pair_name(e),
                        e.target
                    )));
                }
            }
            // Completed: every track is on the target.
            for w in watched.iter_mut() {
                if ended.iter().any(|e| same_relationship(e, w)) {
                    w.tracks_copied = w.tracks_total;
                    w.tracks_remaining = 0;
                    w.percent = 100.0;
                    w.state = RelationshipState::Copied;
                }
            }
        }
        Ok(if all_copied {
            Poll::Complete
        } else {
            Poll::Copying
        })
    }

    /// Reports a completed wait.
    fn wait_done(
        &self,
        out: &mut dyn Write,
        watched: &[RelationshipView],
        waited: Duration,
    ) -> Result<(), CliError> {
        let seconds = waited.as_secs_f64();
        if self.json {
            let pairs: Vec<FlashCopyPair> = watched
                .iter()
                .map(|v| FlashCopyPair {
                    source: v.source.clone(),
                    target: v.target.clone(),
                })
                .collect();
            let answer = serde_json::json!({
                "complete": true,
                "pairs": pairs,
                "waited_seconds": seconds,
            });
            let text = serde_json::to_string_pretty(&answer)
                .map_err(|e| CliError::Server(format!("cannot format the answer: {e}")))?;
            writeln!(out, "{text}")?;
            return Ok(());
        }
        for v in watched {
            writeln!(
                out,
                "{}: background copy complete ({} tracks, {:.1} s)",
                pair_name(v),
                v.tracks_total,
                seconds
            )?;
        }
        Ok(())
    }

    /// `essctl log`.
    pub(super) fn log(&self, out: &mut dyn Write, limit: Option<u32>) -> Result<(), CliError> {
        let path = match limit {
            Some(n) => format!("/v1/log?limit={n}"),
            None => "/v1/log".to_string(),
        };
        let response = self.get(&path)?;
        let Some(list) = self.table_data::<EventList>(out, &response)? else {
            return Ok(());
        };
        let rows: Vec<Vec<String>> = list
            .events
            .iter()
            .map(|e| {
                vec![
                    e.time.clone(),
                    e.event.clone(),
                    e.duration_ms
                        .map_or_else(|| "-".to_string(), output::millis),
                    e.detail.clone(),
                ]
            })
            .collect();
        out.write_all(output::table(&["TIME", "EVENT", "DURATION", "DETAIL"], &rows).as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("essctl").chain(args.iter().copied()))
    }

    #[test]
    fn parses_establish() {
        let cli = parse(&[
            "flashcopy",
            "establish",
            "000FCA31:001FCA31",
            "boot:002FCA31",
            "--rate",
            "2.5",
            "--permit-online",
        ])
        .unwrap();
        let Command::Flashcopy(FlashCopyCommand::Establish {
            pairs,
            nocopy,
            rate,
            permit_online,
        }) = cli.command
        else {
            panic!("not establish: {:?}", cli.command);
        };
        assert_eq!(
            pairs,
            [
                FlashCopyPair {
                    source: "000FCA31".into(),
                    target: "001FCA31".into()
                },
                FlashCopyPair {
                    source: "boot".into(),
                    target: "002FCA31".into()
                }
            ]
        );
        assert!(!nocopy && permit_online);
        assert_eq!(rate, Some(2.5));
    }

    #[test]
    fn refuses_bad_establish_arguments() {
        for args in [
            &["flashcopy", "establish"][..],
            &["flashcopy", "establish", "000FCA31"],
            &["flashcopy", "establish", ":001FCA31"],
            &["flashcopy", "establish", "000FCA31:"],
            &["flashcopy", "establish", "a:b:c"],
            &["flashcopy", "establish", "a:b", "--rate", "0"],
            &["flashcopy", "establish", "a:b", "--rate", "-1"],
            &["flashcopy", "establish", "a:b", "--rate", "inf"],
            &["flashcopy", "establish", "a:b", "--nocopy", "--rate", "1"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn parses_wait_and_log() {
        let cli = parse(&["flashcopy", "wait", "000FCA31", "--interval", "0.25"]).unwrap();
        let Command::Flashcopy(FlashCopyCommand::Wait {
            interval, timeout, ..
        }) = cli.command
        else {
            panic!("not wait");
        };
        assert_eq!(interval, Duration::from_millis(250));
        assert_eq!(timeout, None);
        let cli = parse(&["flashcopy", "wait", "x", "--timeout", "0"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Flashcopy(FlashCopyCommand::Wait { interval, timeout: Some(t), .. })
                if interval == Duration::from_secs(1) && t.is_zero()
        ));
        assert!(parse(&["flashcopy", "wait", "x", "--interval", "0"]).is_err());
        assert!(parse(&["flashcopy", "wait", "x", "--timeout", "-1"]).is_err());
        let cli = parse(&["log", "--limit", "5"]).unwrap();
        assert!(matches!(cli.command, Command::Log { limit: Some(5) }));
        assert!(parse(&["log", "--limit", "0"]).is_err());
        assert!(parse(&["log", "--limit", "10001"]).is_err());
    }

    fn view(mode: CopyMode, copied: u64) -> RelationshipView {
        RelationshipView {
            source: "000FCA31".into(),
            target: "001FCA31".into(),
            state: match mode {
                CopyMode::Copy => RelationshipState::Copying,
                CopyMode::NoCopy => RelationshipState::Nocopy,
            },
            mode,
            rate_mib_s: None,
            t0: "2024-01-01T00:00:00.000Z".into(),
            t0_unix: 1_704_067_200.0,
            track_size: 65536,
            tracks_total: 128,
            tracks_copied: copied,
            tracks_remaining: 128 - copied,
            percent: copied as f64 * 100.0 / 128.0,
            bytes_copied: copied * 65536,
            error: None,
        }
    }

    #[test]
    fn warns_about_incomplete_targets() {
        assert_eq!(
            incomplete_warning(&view(CopyMode::Copy, 32)).as_deref(),
            Some("warning: target 001FCA31 is incomplete (background copy was 25.0% done)")
        );
        assert_eq!(
            incomplete_warning(&view(CopyMode::NoCopy, 1)).as_deref(),
            Some(
                "warning: target 001FCA31 is incomplete (NOCOPY relationship: 0.7% of its tracks were copied)"
            )
        );
        assert_eq!(incomplete_warning(&view(CopyMode::Copy, 128)), None);
        assert_eq!(incomplete_warning(&view(CopyMode::NoCopy, 128)), None);
    }
}
