//! What `flashcopy wait` and `pprc wait` share: the progress shown on
//! stderr and the pace of their polls.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use super::client::{ClientError, DEFAULT_TIMEOUT};
use super::{output, CliError};

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 30;

/// The first poll after the first one comes at most this soon, so that a
/// speed is known early.
const FIRST_LOOK: Duration = Duration::from_millis(250);

/// Least time between polls when the copy should end before the next one.
const SOON: Duration = Duration::from_millis(100);

/// Least time one poll's request is given, also when the wait's timeout
/// is nearer.
const MIN_REQUEST: Duration = Duration::from_millis(500);

/// Draws `flashcopy wait` and `pprc wait` progress on stderr.
pub(super) struct Progress {
    /// Redraw one bar in place (stderr is a terminal) or print lines.
    tty: bool,
    /// A bar is on screen and needs a newline before other output.
    drawn: bool,
}

impl Progress {
    pub(super) fn new() -> Self {
        Progress {
            tty: io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Shows the current progress. Failing to draw is not worth failing the
    /// wait for, so write errors are ignored.
    pub(super) fn update(&mut self, what: &str, copied: u64, total: u64, speed: Option<f64>) {
        let fraction = if total == 0 {
            1.0
        } else {
            copied as f64 / total as f64
        };
        let percent = output::percent(fraction * 100.0);
        let speed = speed.map(|s| format!("  {}", output::mib_per_s(s)));
        let speed = speed.unwrap_or_default();
        let mut err = io::stderr().lock();
        if self.tty {
            let bar = output::progress_bar(fraction, BAR_WIDTH);
            let _ = write!(
                err,
                "\r[{bar}] {percent:>6}  {copied}/{total} tracks{speed}\x1b[K"
            );
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{what}: {percent}  {copied}/{total} tracks{speed}");
        }
        let _ = err.flush();
    }

    /// Ends the bar's line, if one is drawn.
    pub(super) fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(io::stderr());
            self.drawn = false;
        }
    }
}

/// Paces a wait's polls: every `interval`, but sooner when the copy
/// should end before then at its speed so far, so the wait ends soon after
/// the copy; never past the timeout.
pub(super) struct Pace {
    interval: Duration,
    timeout: Option<Duration>,
    started: Instant,
    /// When the first poll was made and the tracks done then.
    first: Option<(Instant, u64)>,
    /// Tracks per second since the first poll, once a second poll was made.
    rate: Option<f64>,
}

impl Pace {
    /// Starts the clock of a wait.
    pub(super) fn new(interval: Duration, timeout: Option<Duration>) -> Self {
        Pace {
            interval,
            timeout,
            started: Instant::now(),
            first: None,
            rate: None,
        }
    }

    /// Time since the wait started.
    pub(super) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Notes a poll that found `done` tracks copied; returns the average
    /// speed since the first poll in MiB/s (the copiers work in bursts).
    pub(super) fn polled(&mut self, done: u64, track_size: u64) -> Option<f64> {
        let now = Instant::now();
        let (at, before) = *self.first.get_or_insert((now, done));
        let secs = now.duration_since(at).as_secs_f64();
        self.rate = (secs > 0.0).then(|| done.saturating_sub(before) as f64 / secs);
        self.rate
            .map(|tracks| tracks * track_size as f64 / (1u64 << 20) as f64)
    }

    /// How long the next poll's request may take: what is left of the
    /// timeout (at least [`MIN_REQUEST`]), so that a server slow to answer
    /// neither holds the wait past it nor ends it sooner; the client's
    /// default without one.
    pub(super) fn request_timeout(&self) -> Duration {
        match self.timeout {
            None => DEFAULT_TIMEOUT,
            Some(limit) => limit.saturating_sub(self.elapsed()).max(MIN_REQUEST),
        }
    }

    /// The error of a poll whose request failed: the wait timing out if its
    /// timeout has passed while the server did not answer, else the
    /// client's error.
    pub(super) fn poll_error(&self, e: ClientError, what: &str) -> CliError {
        let unanswered = match &e {
            ClientError::Connect { source, .. } | ClientError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            _ => false,
        };
        match self.timeout {
            Some(limit) if unanswered && self.elapsed() >= limit => CliError::Timeout(format!(
                "timed out after {} s waiting for {what}: the server did not answer in time",
                limit.as_secs_f64()
            )),
            _ => e.into(),
        }
    }

    /// How long to sleep before the next poll, with `left` tracks to go;
    /// `None` once the timeout has passed.
    pub(super) fn nap(&self, left: u64) -> Option<Duration> {
        let elapsed = self.elapsed();
        let nap = match self.rate {
            None => self.interval.min(FIRST_LOOK),
            Some(rate) if rate > 0.0 => {
                let expected =
                    Duration::try_from_secs_f64(left as f64 / rate).unwrap_or(Duration::MAX);
                self.interval.min(expected.max(SOON))
            }
            Some(_) => self.interval,
        };
        match self.timeout {
            Some(limit) if elapsed >= limit => None,
            Some(limit) => Some(nap.min(limit - elapsed)),
            None => Some(nap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace_at(rate: Option<f64>, interval: Duration, timeout: Option<Duration>) -> Pace {
        Pace {
            rate,
            ..Pace::new(interval, timeout)
        }
    }

    /// A poll may take what is left of the timeout, also past the
    /// client's default for one request: a slow answer ends the wait at its
    /// timeout (exit 5), not as an unreachable server sooner.
    #[test]
    fn a_poll_may_take_what_is_left_of_the_timeout() {
        let long = Duration::from_secs(600);
        let left = pace_at(None, Duration::from_secs(1), Some(long)).request_timeout();
        assert!(left > DEFAULT_TIMEOUT && left <= long, "{left:?}");
        let none = pace_at(None, Duration::from_secs(1), Some(Duration::ZERO));
        assert_eq!(none.request_timeout(), MIN_REQUEST);
        let untimed = pace_at(None, Duration::from_secs(1), None);
        assert_eq!(untimed.request_timeout(), DEFAULT_TIMEOUT);
    }

    #[test]
    fn polls_every_interval_while_the_end_is_far() {
        let pace = pace_at(Some(100.0), Duration::from_secs(2), None);
        assert_eq!(pace.nap(1_000), Some(Duration::from_secs(2)));
    }

    #[test]
    fn polls_when_the_copy_should_end_if_that_is_sooner() {
        let pace = pace_at(Some(100.0), Duration::from_secs(2), None);
        assert_eq!(pace.nap(50), Some(Duration::from_millis(500)));
        assert_eq!(pace.nap(1), Some(SOON));
        assert_eq!(pace.nap(0), Some(SOON));
    }

    #[test]
    fn looks_again_soon_after_the_first_poll_and_waits_out_a_stall() {
        let interval = Duration::from_secs(60);
        assert_eq!(pace_at(None, interval, None).nap(10), Some(FIRST_LOOK));
        assert_eq!(pace_at(Some(0.0), interval, None).nap(10), Some(interval));
        let short = Duration::from_millis(50);
        assert_eq!(pace_at(None, short, None).nap(10), Some(short));
    }

    #[test]
    fn never_sleeps_past_the_timeout() {
        let pace = pace_at(
            Some(0.0),
            Duration::from_secs(60),
            Some(Duration::from_secs(1)),
        );
        let nap = pace.nap(10).expect("before the timeout");
        assert!(
            nap <= Duration::from_secs(1) && nap > Duration::from_millis(500),
            "{nap:?}"
        );
        let over = pace_at(Some(0.0), Duration::from_secs(60), Some(Duration::ZERO));
        assert_eq!(over.nap(10), None);
    }

    #[test]
    fn speed_is_the_average_since_the_first_poll() {
        let mut pace = Pace::new(Duration::from_secs(1), None);
        assert_eq!(pace.polled(10, 1 << 20), None);
        std::thread::sleep(Duration::from_millis(20));
        let speed = pace
            .polled(30, 1 << 20)
            .expect("a second poll gives a speed");
        // 20 MiB in at least 20 ms, and not in an age.
        assert!(speed > 20.0 && speed <= 1000.0, "{speed}");
    }
}
