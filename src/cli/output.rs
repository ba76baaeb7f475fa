//! Output of the client commands: aligned tables for people by default,
//! JSON with `--json`.

use std::fmt::Write as _;

/// The `--json` option of commands that print data.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Formats rows under a header, each column as wide as its widest cell
/// and separated by two spaces. The last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if index < widths.len() {
                widths[index] = widths[index].max(cell.chars().count());
            }
        }
    }
    let mut text = String::new();
    let header: Vec<String> = header.iter().map(|title| title.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            if index + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[index]);
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Formats pairs as a two-column KEY VALUE table.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let rows: Vec<Vec<String>> = pairs.iter().map(|(key, value)| vec![key.to_string(), value.clone()]).collect();
    table(&["KEY", "VALUE"], &rows)
}

/// Pretty JSON with a final newline.
pub fn json<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("API values serialize to JSON");
    text.push('\n');
    text
}

/// Formats a byte count with binary units, such as `1.5 MiB`.
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let text = table(&["HANDLE", "STATE"], &[vec!["a-long-one".into(), "active".into()], vec!["b".into(), "stopped".into()]]);
        assert_eq!(text, "HANDLE      STATE\na-long-one  active\nb           stopped\n");
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(17 << 20), "17.0 MiB");
    }
}
