//! `bench --vs-wrk`: is the load generator fast enough to measure the servers, or does it
//! measure itself? It runs against the same server as `wrk`, in turns, at the same load
//! (100 keep-alive connections, the same number of threads), and the ratio of their rates
//! should be at least 0.9.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::load::{self, Spec};
use crate::plan::{self, Load, Row, Setup};
use crate::progress::Progress;
use crate::report::{Align, Table, thousands_f};
use crate::run::{self, Timing};
use crate::server::{Process, Scratch};

/// The connections of the comparison.
pub const CONNECTIONS: usize = 100;
/// The least ratio at which the generator is not the bottleneck.
pub const GOAL: f64 = 0.9;

/// The rates of both generators against one server, one per round.
pub struct Comparison {
    pub server: String,
    pub ours: Vec<f64>,
    pub wrk: Vec<f64>,
}

impl Comparison {
    /// Our median rate over wrk's.
    pub fn ratio(&self) -> f64 {
        median(&self.ours) / median(&self.wrk)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs both generators in turn, `rounds` times each, against every row.
pub fn compare(
    wrk: &Path,
    rows: &[Row],
    timing: &Timing,
    rounds: usize,
    scratch: &Scratch,
) -> Result<Vec<Comparison>> {
    let mut progress = Progress::new((rows.len() * rounds * 2) as u64);
    let mut comparisons = Vec::new();
    for row in rows {
        let Setup::Run { args, .. } = plan::setup(row, Load::KeepAlive(CONNECTIONS)) else {
            bail!(
                "{} cannot take {CONNECTIONS} keep-alive connections",
                row.name
            );
        };
        let server = run::start(row, &args, scratch)?;
        // wrk counts from its start, connecting included: so do we, here.
        // wrk pipelines nothing (without a script of its own): neither do we, here.
        let from_start = Timing {
            warmup: Duration::ZERO,
            pipeline: 1,
            ..*timing
        };
        let spec = run::spec(Load::KeepAlive(CONNECTIONS), &server, &from_start);
        let mut comparison = Comparison {
            server: row.name.clone(),
            ours: Vec::new(),
            wrk: Vec::new(),
        };
        for round in 1..=rounds {
            progress.start(&format!("{}: bench, round {round}", row.name));
            let outcome = load::run(&spec)?;
            if outcome.errors.total() > 0 {
                bail!("errors against {}: {}", row.name, outcome.errors);
            }
            comparison.ours.push(outcome.rate());
            progress.finish_one();
            progress.start(&format!("{}: wrk, round {round}", row.name));
            comparison.wrk.push(run_wrk(wrk, &spec, scratch)?);
            progress.finish_one();
        }
        comparisons.push(comparison);
    }
    Ok(comparisons)
}

/// Runs `wrk` with `spec`'s address, connections, threads and duration; returns its rate.
fn run_wrk(wrk: &Path, spec: &Spec, scratch: &Scratch) -> Result<f64> {
    let seconds = spec.duration.as_secs().max(1);
    let output = scratch.path().join("wrk.out");
    let mut command = Command::new(wrk);
    command
        .arg(format!("-t{}", spec.threads))
        .arg(format!("-c{}", spec.connections))
        .arg(format!("-d{seconds}s"))
        .arg(format!("http://{}/", spec.addr));
    let mut process = Process::spawn(&mut command, &output)?;
    let deadline = Instant::now() + Duration::from_secs(seconds + 30);
    let Some(status) = process.wait_until(deadline)? else {
        bail!("wrk did not finish within {seconds} s and 30 more");
    };
    let text = fs::read_to_string(&output).context("reading wrk's output")?;
    if !status.success() {
        bail!("wrk failed ({status}):\n{text}\n{}", process.stderr_tail());
    }
    if text.contains("Socket errors") || text.contains("Non-2xx") {
        bail!("wrk saw errors:\n{text}");
    }
    requests_per_second(&text)
        .with_context(|| format!("no `Requests/sec:` in wrk's output:\n{text}"))
}

/// The figure of wrk's `Requests/sec:   12345.67` line.
fn requests_per_second(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))?;
    line.trim().parse().ok()
}

/// The table: each round's rates, and the ratio of the medians.
pub fn table(comparisons: &[Comparison], seconds: u64) -> Table {
    let title = format!(
        "The bench's generator beside wrk: {CONNECTIONS} keep-alive connections, {seconds} s \
         runs in turns"
    );
    let columns = [
        ("server", Align::Left),
        ("bench req/s", Align::Right),
        ("wrk req/s", Align::Right),
        ("ratio", Align::Right),
        ("goal", Align::Left),
    ];
    let mut table = Table::new(title, &columns);
    let list = |rates: &[f64]| {
        rates
            .iter()
            .map(|&r| thousands_f(r))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for comparison in comparisons {
        let ratio = comparison.ratio();
        let verdict = if ratio >= GOAL { "met" } else { "missed" };
        table.rows.push(vec![
            comparison.server.clone(),
            list(&comparison.ours),
            list(&comparison.wrk),
            format!("{ratio:.2}"),
            format!("{verdict} (at least {GOAL})"),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_s_rate() {
        let text = "Running 2s test @ http://127.0.0.1:8080/\n  2 threads and 100 connections\n\
                    163544 requests in 2.00s, 15.60MB read\nRequests/sec:  81733.32\n\
                    Transfer/sec:      7.80MB\n";
        assert_eq!(requests_per_second(text), Some(81733.32));
        assert_eq!(requests_per_second("nothing"), None);
    }

    #[test]
    fn the_ratio_is_of_medians() {
        let comparison = Comparison {
            server: "s".into(),
            ours: vec![90.0, 1.0, 95.0],
            wrk: vec![100.0, 100.0, 1000.0],
        };
        assert_eq!(comparison.ratio(), 0.9);
    }
}
