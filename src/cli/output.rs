//! Text rendering for `essctl`: aligned tables, `key: value` blocks,
//! human-readable durations, percentages, rates and progress bars.

use std::fmt::Write as _;

/// Renders rows under upper-case headers, columns separated by two spaces.
/// The last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let width = widths.get(i).copied().unwrap_or(0);
            let _ = write!(text, "{cell:<width$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Renders `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let label = format!("{key}:");
        let _ = writeln!(out, "{label:<width$} {value}");
    }
    out
}

/// Formats seconds as `3d 4h 5m 6s`, leaving out leading zero units.
pub fn duration(secs: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = Vec::new();
    let mut rest = secs;
    for (size, unit) in units {
        let n = rest / size;
        rest %= size;
        if n > 0 || !out.is_empty() || size == 1 {
            out.push(format!("{n}{unit}"));
        }
    }
    out.join(" ")
}

/// `yes` or `no`.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// The value, or `-` when absent or empty.
pub fn or_dash(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => "-".to_string(),
    }
}

/// A percentage with one decimal, rounded down so that `100.0%` means
/// complete: `99.96` is `99.9%`.
pub fn percent(p: f64) -> String {
    let p = if p.is_finite() {
        p.clamp(0.0, 100.0)
    } else {
        0.0
    };
    format!("{:.1}%", (p * 10.0).floor() / 10.0)
}

/// A throughput in MiB/s, e.g. `45.0 MiB/s`.
pub fn mib_per_s(r: f64) -> String {
    if r > 0.0 && r < 0.1 {
        format!("{r:.3} MiB/s")
    } else {
        format!("{r:.1} MiB/s")
    }
}

/// A copy rate limit: `unlimited` or MiB/s.
pub fn rate(limit_mib_s: Option<f64>) -> String {
    limit_mib_s.map_or_else(|| "unlimited".to_string(), mib_per_s)
}

/// A duration in milliseconds: `0.8 ms`, `12.3 ms`, `4.56 s`, `2m 5s`.
pub fn millis(ms: f64) -> String {
    if ms < 1_000.0 {
        format!("{ms:.1} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1_000.0)
    } else {
        duration((ms / 1_000.0).round() as u64)
    }
}

/// A bar of `width` characters, `#` for the done `fraction` (0 to 1) and
/// `.` for the rest.
pub fn progress_bar(fraction: f64, width: usize) -> String {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let done = ((fraction * width as f64).floor() as usize).min(width);
    format!("{}{}", "#".repeat(done), ".".repeat(width - done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_tables() {
        let t = table(
            &["ID", "SIZE", "NOTE"],
            &[
                vec!["000FCA31".into(), "1.0 GiB".into(), "".into()],
                vec!["1".into(), "12 B".into(), "x".into()],
            ],
        );
        assert_eq!(
            t,
            "ID        SIZE     NOTE\n000FCA31  1.0 GiB\n1         12 B     x\n"
        );
    }

    #[test]
    fn aligns_key_values() {
        assert_eq!(
            key_values(&[("id", "A".into()), ("read-only", "no".into())]),
            "id:        A\nread-only: no\n"
        );
    }

    #[test]
    fn formats_durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(3_600), "1h 0m 0s");
        assert_eq!(duration(90_061), "1d 1h 1m 1s");
    }

    #[test]
    fn formats_percentages_and_rates() {
        assert_eq!(percent(0.0), "0.0%");
        assert_eq!(percent(53.27), "53.2%");
        assert_eq!(percent(99.96), "99.9%");
        assert_eq!(percent(100.0), "100.0%");
        assert_eq!(percent(f64::NAN), "0.0%");
        assert_eq!(mib_per_s(45.04), "45.0 MiB/s");
        assert_eq!(mib_per_s(0.0), "0.0 MiB/s");
        assert_eq!(mib_per_s(0.05), "0.050 MiB/s");
        assert_eq!(rate(None), "unlimited");
        assert_eq!(rate(Some(1.0)), "1.0 MiB/s");
        assert_eq!(millis(0.25), "0.2 ms");
        assert_eq!(millis(1_234.0), "1.23 s");
        assert_eq!(millis(125_000.0), "2m 5s");
    }

    #[test]
    fn draws_progress_bars() {
        assert_eq!(progress_bar(0.0, 10), "..........");
        assert_eq!(progress_bar(0.532, 10), "#####.....");
        assert_eq!(progress_bar(1.0, 10), "##########");
        assert_eq!(progress_bar(2.0, 4), "####");
        assert_eq!(progress_bar(-1.0, 4), "....");
    }
}
