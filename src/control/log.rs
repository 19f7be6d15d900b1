//! The server's event log: one JSON object per line in `STATE_DIR/log.jsonl`
//! (copy-services operations with timestamps and durations), appended and
//! flushed as events happen.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One logged event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// When it happened (RFC 3339, UTC).
    pub time: String,
    /// Seconds since the Unix epoch.
    pub unix: f64,
    /// What happened, e.g. `flashcopy.establish`.
    pub event: String,
    /// Human-readable details.
    pub detail: String,
    /// How long the operation took, in milliseconds, if it is timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// The append-only log file.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    /// The file, and whether its last line may be unfinished (a failed
    /// append), so the next event must start on a new line.
    file: Mutex<(File, bool)>,
}

/// Formats a time as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl EventLog {
    /// Opens (creating) the log in `state_dir`.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join("log.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        // A crash in the middle of an append leaves an unfinished last
        // line: end it, so the next event is a line of its own.
        let len = file.metadata()?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                file.sync_data()?;
            }
        }
        Ok(EventLog {
            path,
            file: Mutex::new((file, false)),
        })
    }

    /// Appends an event. Failures are reported in the process log only:
    /// losing a log line must not fail the operation it describes.
    pub fn record(&self, event: &str, detail: impl Into<String>, duration: Option<Duration>) {
        let now = SystemTime::now();
        let e = Event {
            time: rfc3339(now),
            unix: now
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            event: event.to_string(),
            detail: detail.into(),
            duration_ms: duration.map(|d| d.as_secs_f64() * 1000.0),
        };
        tracing::info!(event = %e.event, duration_ms = ?e.duration_ms, "{}", e.detail);
        let Ok(mut line) = serde_json::to_vec(&e) else {
            return;
        };
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, torn) = &mut *guard;
        if *torn {
            line.insert(0, b'\n');
        }
        match file.write_all(&line).and_then(|()| file.sync_data()) {
            Ok(()) => *torn = false,
            Err(err) => {
                *torn = true;
                tracing::warn!(path = %self.path.display(), "cannot append to the event log: {err}");
            }
        }
    }

    /// The last `limit` events, oldest first.
    pub fn tail(&self, limit: usize) -> io::Result<Vec<Event>> {
        let file = File::open(&self.path)?;
        let mut events: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
        // Split on bytes: an unfinished line (a crash during an append)
        // may end inside a UTF-8 sequence; it is skipped like any line that
        // is not an event.
        for line in io::BufReader::new(file).split(b'\n') {
            let Ok(e) = serde_json::from_slice::<Event>(&line?) else {
                continue;
            };
            events.push_back(e);
            if events.len() > limit {
                events.pop_front();
            }
        }
        Ok(events.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_996_800_123);
        assert_eq!(rfc3339(t), "2026-11-30T00:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn appends_and_tails() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        for i in 0..5 {
            log.record(
                "test.event",
                format!("n={i}"),
                Some(Duration::from_millis(i)),
            );
        }
        let tail = log.tail(2).unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].detail, "n=3");
        assert_eq!(tail[1].duration_ms, Some(4.0));
    }

    #[test]
    fn a_torn_last_line_costs_neither_the_next_event_nor_the_log() {
        // A crash, power loss or ENOSPC in the middle of `record` leaves a
        // partial last line, here cut inside the "→" of a FlashCopy detail.
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EventLog::open(dir.path()).unwrap();
            log.record("flashcopy.establish", "000FCA31 → 001FCA31", None);
        }
        let path = dir.path().join("log.jsonl");
        let mut text = std::fs::read(&path).unwrap();
        let whole = text.clone();
        text.extend_from_slice(&whole[..whole.iter().position(|&b| b == 0xE2).unwrap() + 1]);
        std::fs::write(&path, &text).unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.record("flashcopy.withdraw", "after the restart", None);
        let tail = log.tail(10).expect("the log stays readable");
        let names: Vec<&str> = tail.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["flashcopy.establish", "flashcopy.withdraw"]);
    }
}
