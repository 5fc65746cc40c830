//! `--write-book`: the tables and charts that the book's comparison chapter includes, written
//! to `book/src/bench/`, each file saying on what machine and by what command it was made.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::charts::{self, Bars, Series};
use crate::plan::Load;
use crate::report::{self, LoadResults};
use crate::run::{Cell, Measured};
use crate::tlpi;

/// The comparison run: `results.md` (the tables) and three charts.
pub fn write_results(dir: &Path, results: &[LoadResults], preface: &str) -> Result<()> {
    let mut text = header(preface);
    for load in results {
        text += &report::table(load).render();
        text.push('\n');
    }
    write(dir, "results.md", &text)?;
    let categories: Vec<String> = results
        .first()
        .map(|load| load.cells.iter().map(|(name, _)| short(name)).collect())
        .unwrap_or_default();
    let series =
        |wanted: &dyn Fn(Load) -> bool, value: fn(&Measured) -> Option<f64>| -> Vec<Series> {
            results
                .iter()
                .filter(|load| wanted(load.load))
                .map(|load| {
                    let values = load.cells.iter().map(|(_, cell)| match cell {
                        Cell::Done(measured) => value(measured),
                        Cell::Skipped(_) => None,
                    });
                    (load.load.short(), values.collect())
                })
                .collect()
        };
    let busy = |load| matches!(load, Load::KeepAlive(_) | Load::PerRequest(_));
    let rate = |m: &Measured| (m.outcome.answers() > 0).then(|| m.outcome.rate());
    charts::bars(
        &dir.join("requests.svg"),
        &Bars {
            title: "Requests per second, by server and load (higher is better)",
            y_desc: "requests/s",
            categories: categories.clone(),
            series: series(&busy, rate),
            unit: |y| report::thousands_f(y),
        },
    )?;
    let p99 = |m: &Measured| {
        let fast = &m.outcome.fast;
        (!fast.is_empty()).then(|| fast.value_at_quantile(0.99) as f64)
    };
    charts::bars(
        &dir.join("p99.svg"),
        &Bars {
            title: "99th percentile latency of the fast requests (lower is better)",
            y_desc: "p99 latency",
            categories: categories.clone(),
            series: series(&|load| busy(load) || load == Load::SlowMix, p99),
            unit: |y| report::micros(y as u64),
        },
    )?;
    let per_idle = |m: &Measured| m.idle.as_ref()?.per_connection_bytes.filter(|b| *b > 0.0);
    charts::bars(
        &dir.join("idle-memory.svg"),
        &Bars {
            title: "Memory per idle connection (PSS beyond an idle server; lower is better)",
            y_desc: "bytes per idle connection",
            categories,
            series: series(&|load| matches!(load, Load::Idle(_)), per_idle),
            unit: |y| format!("{} B", report::thousands_f(y)),
        },
    )
}

/// `bench tlpi`: `tlpi.md` and its chart.
pub fn write_tlpi(dir: &Path, results: &tlpi::Results, preface: &str) -> Result<()> {
    let mut text = header(preface);
    text += &tlpi::table(results).render();
    text += &format!("\n{}\n", tlpi::footnote(results).replace('\n', "\n\n"));
    write(dir, "tlpi.md", &text)?;
    let x: Vec<f64> = tlpi::SIZES.iter().map(|&n| n as f64).collect();
    let mut series: Vec<Series> = (0..3)
        .map(|m| {
            let values = results.iter().map(|cells| cells[m].seconds()).collect();
            (tlpi::MECHANISMS[m].to_string(), values)
        })
        .collect();
    series.extend((0..3).map(|m| {
        let values = tlpi::PUBLISHED.iter().map(|row| Some(row[m])).collect();
        (format!("{} (2006)", tlpi::MECHANISMS[m]), values)
    }));
    let title = "Seconds for 100,000 operations, one of N descriptors ready (log-log)";
    charts::log_lines(&dir.join("tlpi.svg"), title, &x, &series, "seconds")
}

/// `bench --vs-wrk`: `vs-wrk.md`.
pub fn write_vs_wrk(dir: &Path, table: &report::Table, preface: &str) -> Result<()> {
    write(dir, "vs-wrk.md", &(header(preface) + &table.render()))
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// What every file starts with: that it is generated, the machine, the date, the command.
fn header(preface: &str) -> String {
    let mut text = String::from(
        "<!-- Written by the bench (`--write-book`): rerun it rather than edit this file. -->\n\n",
    );
    let _ = writeln!(text, "{preface}");
    text
}

/// The machine, the date and the exact command, as a few lines of Markdown.
pub fn preface(extra: &[String]) -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut lines = vec![
        format!("- **Machine**: {}", machine()),
        format!("- **Date**: {} (UTC)", today()),
        format!(
            "- **Command**: `cargo build --release --workspace && cargo run --release -p bench -- {}`",
            args.join(" ")
        ),
    ];
    lines.extend(extra.iter().cloned());
    lines.join("\n") + "\n"
}

/// `2 cores (AMD EPYC), 23 GiB of memory, Linux 6.18.44`.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, model)| {
            model.trim().to_string()
        });
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {} GiB of memory, Linux {}",
        memory_kib / 1024 / 1024,
        kernel.trim()
    )
}

/// What `PROGRAM -v` says (nginx and wrk print their version that way), first line only.
pub fn version(program: &Path) -> String {
    Command::new(program)
        .arg("-v")
        .output()
        .map(|out| {
            let text = [out.stdout, out.stderr].concat();
            let text = String::from_utf8_lossy(&text).into_owned();
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// Today's date, `2026-05-01`, from the system clock (days since 1970 to a civil date: Howard
/// Hinnant's `civil_from_days`).
fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `step07-epoll` as `7 epoll`, for the charts' axis.
fn short(name: &str) -> String {
    name.strip_prefix("step")
        .and_then(|rest| rest.split_once('-'))
        .map_or(name.to_string(), |(number, what)| {
            format!("{} {what}", number.trim_start_matches('0'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dates_read_well() {
        assert_eq!(short("step07-epoll"), "7 epoll");
        assert_eq!(short("step05-busy-poll"), "5 busy-poll");
        assert_eq!(short("nginx"), "nginx");
        let date = today();
        assert_eq!(date.len(), 10, "{date}");
        assert!(date.starts_with("20"), "{date}");
    }
}
