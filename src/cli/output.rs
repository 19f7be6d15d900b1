//! Text rendering for `essctl`: aligned tables, `key: value` blocks and
//! human-readable durations.

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
}
