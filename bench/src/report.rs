//! The tables: one per load, one row per server, as Markdown whose columns line up, so that
//! the same text reads well on a terminal and renders in the book.

use hdrhistogram::Histogram;

use crate::plan::Load;
use crate::run::{Cell, Measured};

/// How a column's cells are aligned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A column's name and alignment.
pub type Column = (&'static str, Align);

/// How the cells of a row after its first come from a measurement.
type Cells = fn(&Measured) -> Vec<String>;

/// A table with a title.
pub struct Table {
    pub title: String,
    pub columns: Vec<(String, Align)>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: String, columns: &[Column]) -> Table {
        Table {
            title,
            columns: columns
                .iter()
                .map(|&(name, align)| (name.to_string(), align))
                .collect(),
            rows: Vec::new(),
        }
    }

    /// `### title`, then the table, padded so that its columns line up.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                let cells = self.rows.iter().filter_map(|row| row.get(i));
                let header = self.columns[i].0.chars().count();
                cells
                    .map(|cell| cell.chars().count())
                    .fold(header.max(3), usize::max)
            })
            .collect();
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        let pad = |text: &str, i: usize| {
            let width = widths[i];
            match self.columns[i].1 {
                Align::Left => format!("{text:<width$}"),
                Align::Right => format!("{text:>width$}"),
            }
        };
        let mut out = format!("### {}\n\n", self.title);
        out += &line(
            (0..widths.len())
                .map(|i| pad(&self.columns[i].0, i))
                .collect(),
        );
        out += &line(
            widths
                .iter()
                .zip(&self.columns)
                .map(|(&width, (_, align))| match align {
                    Align::Left => "-".repeat(width),
                    Align::Right => format!("{}:", "-".repeat(width - 1)),
                })
                .collect(),
        );
        for row in &self.rows {
            out += &line(
                (0..widths.len())
                    .map(|i| pad(row.get(i).map_or("", String::as_str), i))
                    .collect(),
            );
        }
        out
    }
}

/// A load's results: one cell per server.
pub struct LoadResults {
    pub load: Load,
    pub cells: Vec<(String, Cell)>,
}

use Align::{Left, Right};

/// The table of one load.
pub fn table(results: &LoadResults) -> Table {
    let (columns, cells): (&[Column], Cells) = match results.load {
        Load::KeepAlive(_) | Load::PerRequest(_) => (
            &[
                ("server", Left),
                ("req/s", Right),
                ("p50", Right),
                ("p99", Right),
                ("p99.9", Right),
                ("max", Right),
                ("errors", Right),
                ("CPU", Right),
                ("RSS", Right),
                ("threads", Right),
                ("procs", Right),
                ("fds", Right),
                ("note", Left),
            ],
            |m| {
                let mut cells = vec![rate(m)];
                cells.extend(latencies(&m.outcome.fast, &[0.5, 0.99, 0.999, 1.0]));
                cells.extend([errors(m), cpu(m.cpu), kib(m.usage.rss_kib)]);
                cells.extend(counts(m));
                cells
            },
        ),
        Load::SlowMix => (
            &[
                ("server", Left),
                ("req/s", Right),
                ("fast p50", Right),
                ("fast p99", Right),
                ("fast max", Right),
                ("slow p50", Right),
                ("errors", Right),
                ("CPU", Right),
                ("threads", Right),
                ("procs", Right),
                ("note", Left),
            ],
            |m| {
                let mut cells = vec![rate(m)];
                cells.extend(latencies(&m.outcome.fast, &[0.5, 0.99, 1.0]));
                cells.extend(latencies(&m.outcome.slow, &[0.5]));
                cells.extend([errors(m), cpu(m.cpu)]);
                cells.extend(counts(m).into_iter().take(2));
                cells
            },
        ),
        Load::Idle(_) => (
            &[
                ("server", Left),
                ("idle held", Right),
                ("req/s", Right),
                ("p50", Right),
                ("p99", Right),
                ("max", Right),
                ("memory", Right),
                ("per idle conn", Right),
                ("errors", Right),
                ("threads", Right),
                ("procs", Right),
                ("fds", Right),
                ("note", Left),
            ],
            |m| {
                let (held, memory, per) = m.idle.as_ref().map_or_else(Default::default, |idle| {
                    let per = idle.per_connection_bytes.map_or("-".to_string(), bytes);
                    (idle.held.to_string(), kib(idle.memory_kib), per)
                });
                let mut cells = vec![held, rate(m)];
                cells.extend(latencies(&m.outcome.fast, &[0.5, 0.99, 1.0]));
                cells.extend([memory, per, errors(m)]);
                cells.extend(counts(m));
                cells
            },
        ),
    };
    let mut table = Table::new(results.load.title(), columns);
    for (server, cell) in &results.cells {
        let mut row = vec![server.clone()];
        match cell {
            Cell::Done(measured) => {
                row.extend(cells(measured));
                row.push(measured.note.clone().unwrap_or_default());
            }
            Cell::Skipped(why) => {
                row.extend((2..columns.len()).map(|_| "-".to_string()));
                row.push(why.clone());
            }
        }
        table.rows.push(row);
    }
    table
}

/// Threads, processes and descriptors, at their peak.
fn counts(m: &Measured) -> [String; 3] {
    [m.usage.threads, m.usage.processes, m.usage.fds].map(|n| n.to_string())
}

/// The latencies at `quantiles` (1.0 is the maximum), or `-` where nothing was recorded.
fn latencies(histogram: &Histogram<u64>, quantiles: &[f64]) -> Vec<String> {
    quantiles
        .iter()
        .map(|&q| match histogram.is_empty() {
            true => "-".to_string(),
            false => micros(histogram.value_at_quantile(q)),
        })
        .collect()
}

fn errors(m: &Measured) -> String {
    m.outcome.errors.total().to_string()
}

fn rate(m: &Measured) -> String {
    thousands_f(m.outcome.rate())
}

/// A rate, rounded, with thousands separators: `12,345`.
pub fn thousands_f(value: f64) -> String {
    crate::plan::thousands(value.round().max(0.0) as usize)
}

/// A latency in microseconds, in the unit that reads best: `85 µs`, `1.24 ms`, `1.50 s`.
pub fn micros(us: u64) -> String {
    let us = us as f64;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{} ms", three_digits(us / 1000.0))
    } else {
        format!("{} s", three_digits(us / 1_000_000.0))
    }
}

/// A size in KiB: `812 KiB`, `2.31 MiB`, `1.05 GiB`.
pub fn kib(kib: u64) -> String {
    bytes(kib as f64 * 1024.0)
}

/// A size in bytes: `312 B`, `9.81 KiB`, `2.31 MiB`.
pub fn bytes(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB"];
    let mut value = bytes;
    for unit in units {
        if value < 1024.0 {
            return match unit {
                "B" => format!("{value:.0} B"),
                _ => format!("{} {unit}", three_digits(value)),
            };
        }
        value /= 1024.0;
    }
    format!("{} GiB", three_digits(value))
}

/// A CPU share as a percentage of one core: `97%` (above 100% on more than one core).
fn cpu(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// Three significant digits: `1.24`, `12.4`, `124`.
fn three_digits(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let mut table = Table::new("T".into(), &[("server", Left), ("n", Right)]);
        table.rows.push(vec!["a".into(), "12345".into()]);
        table.rows.push(vec!["longer name".into(), "1".into()]);
        let expected = "### T\n\n\
                        | server      |     n |\n\
                        | ----------- | ----: |\n\
                        | a           | 12345 |\n\
                        | longer name |     1 |\n";
        assert_eq!(table.render(), expected);
    }

    #[test]
    fn units_read_well() {
        assert_eq!(micros(85), "85 µs");
        assert_eq!(micros(1240), "1.24 ms");
        assert_eq!(micros(103_000), "103 ms");
        assert_eq!(micros(1_500_000), "1.50 s");
        assert_eq!(kib(812), "812 KiB");
        assert_eq!(kib(2365), "2.31 MiB");
        assert_eq!(bytes(312.4), "312 B");
        assert_eq!(bytes(10_045.0), "9.81 KiB");
        assert_eq!(cpu(0.974), "97%");
        assert_eq!(thousands_f(12_345.6), "12,346");
    }
}
