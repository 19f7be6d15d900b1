//! The server's event log: one JSON object per line in `STATE_DIR/log.jsonl`
//! (copy-services operations with timestamps and durations), appended and
//! flushed as events happen. At [`ROTATE_AT`] bytes the file becomes
//! `log.jsonl.1` (replacing the one before) and a new one starts, so the
//! log keeps the latest events in bounded space.

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

/// Size in bytes at which the log file is rotated.
pub const ROTATE_AT: u64 = 8 << 20;

/// The append-only log file.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    /// The file's name once rotated.
    rotated: PathBuf,
    rotate_at: u64,
    file: Mutex<Appending>,
}

/// The current file and what appending to it needs to know.
#[derive(Debug)]
struct Appending {
    file: File,
    /// Bytes in the file.
    len: u64,
    /// The last line may be unfinished (a failed append), so the next
    /// event must start on a new line.
    torn: bool,
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
        let mut file = Self::open_file(&path)?;
        // A crash in the middle of an append leaves an unfinished last
        // line: end it, so the next event is a line of its own.
        let mut len = file.metadata()?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                file.sync_data()?;
                len += 1;
            }
        }
        Ok(EventLog {
            rotated: state_dir.join("log.jsonl.1"),
            path,
            rotate_at: ROTATE_AT,
            file: Mutex::new(Appending {
                file,
                len,
                torn: false,
            }),
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
    }

    /// Moves a full file aside and starts a new one. On failure the
    /// current file goes on growing, and the next event tries again.
    fn rotate(&self, current: &mut Appending) -> io::Result<()> {
        std::fs::rename(&self.path, &self.rotated)?;
        let file = match Self::open_file(&self.path) {
            Ok(file) => file,
            Err(e) => {
                // The full file goes on as the log, under its name.
                std::fs::rename(&self.rotated, &self.path)?;
                return Err(e);
            }
        };
        *current = Appending {
            file,
            len: 0,
            torn: false,
        };
        // The renames survive a crash once the directory is synced; if it
        // cannot be, both files are still there to read.
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all())?;
        }
        Ok(())
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
        let mut current = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if current.len >= self.rotate_at {
            if let Err(err) = self.rotate(&mut current) {
                tracing::warn!(path = %self.path.display(), "cannot rotate the event log: {err}");
            }
        }
        if current.torn {
            line.insert(0, b'\n');
        }
        // Counted also when it failed: part of it may be in the file.
        current.len += line.len() as u64;
        let file = &mut current.file;
        match file.write_all(&line).and_then(|()| file.sync_data()) {
            Ok(()) => current.torn = false,
            Err(err) => {
                current.torn = true;
                tracing::warn!(path = %self.path.display(), "cannot append to the event log: {err}");
            }
        }
    }

    /// The last `limit` events, oldest first (from the rotated file too).
    pub fn tail(&self, limit: usize) -> io::Result<Vec<Event>> {
        // Opened under the lock, so that no rotation comes in between.
        let (rotated, current) = {
            let _current = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let rotated = match File::open(&self.rotated) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            (rotated, File::open(&self.path)?)
        };
        let mut events: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
        for file in rotated.into_iter().chain([current]) {
            // Split on bytes: an unfinished line (a crash during an append)
            // may end inside a UTF-8 sequence; it is skipped like any line
            // that is not an event.
            for line in io::BufReader::new(file).split(b'\n') {
                let Ok(e) = serde_json::from_slice::<Event>(&line?) else {
                    continue;
                };
                events.push_back(e);
                if events.len() > limit {
                    events.pop_front();
                }
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
    fn a_full_log_is_rotated_and_tails_read_across_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(dir.path()).unwrap();
        log.rotate_at = 1000;
        for i in 0..100 {
            log.record("test.event", format!("n={i}"), None);
        }
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();
        let lines = |name: &str| {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            text.lines().count() as u64
        };
        let line = size("log.jsonl") / lines("log.jsonl");
        // Each file holds at most one line past the limit.
        for name in ["log.jsonl", "log.jsonl.1"] {
            assert!(size(name) < 1000 + 2 * line, "{name}: {}", size(name));
        }
        let all = log.tail(1000).unwrap();
        let numbers: Vec<u32> = all
            .iter()
            .map(|e| e.detail["n=".len()..].parse().unwrap())
            .collect();
        // The latest events of both files, in order, ending with the last.
        assert!(numbers.len() > 1000 / line as usize, "{numbers:?}");
        assert!(numbers.len() < 100, "{numbers:?}");
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert_eq!(numbers.last(), Some(&99));
        let tail = log.tail(3).unwrap();
        assert_eq!(
            tail.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
            ["n=97", "n=98", "n=99"]
        );
        // A reopened log counts from the file's size.
        drop(log);
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.file.lock().unwrap().len, size("log.jsonl"));
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
