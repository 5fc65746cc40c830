//! The bench: every step's server side by side, under the same loads, on your machine.
//!
//! It starts each step's release binary in turn (and nginx as a reference, when installed),
//! drives it with its own load generator over loopback, samples the server's `/proc` while the
//! load runs, and prints one table per load: requests per second, latency percentiles, errors,
//! and what the server used (CPU, memory, threads, processes, descriptors).
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p bench -- --quick          # under a minute
//! cargo run --release -p bench                     # about five minutes on two cores
//! cargo run --release -p bench -- --steps 1,4,7    # some steps only
//! cargo run --release -p bench -- --vs-wrk         # is the generator fast enough?
//! cargo run --release -p bench -- tlpi             # poll, select, epoll over N descriptors
//! ```

mod book;
mod charts;
mod http;
mod load;
mod plan;
mod procfs;
mod progress;
mod report;
mod run;
mod server;
mod stop;
mod tlpi;
mod wrk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::plan::{Load, Row};
use crate::progress::Progress;
use crate::report::LoadResults;
use crate::run::{Cell, Timing};
use crate::server::Scratch;

/// Compare every step's server under the same loads: requests per second, latency, errors,
/// and what each server uses.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Option<Commands>,

    /// The steps to run, such as `1,4,7` (7 is both step07-epoll and step07-mio; 9 is step 9 with
    /// each --balance). Default: all.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    steps: Vec<u8>,

    /// Leave out the nginx reference row.
    #[arg(long)]
    no_nginx: bool,

    /// A short run, under a minute: shorter loads, at most 1,000 idle connections.
    #[arg(long, global = true)]
    quick: bool,

    /// Also write the tables and charts into the book (book/src/bench/).
    #[arg(long, global = true)]
    write_book: bool,

    /// Where --write-book writes. Default: book/src/bench/ in this workspace.
    #[arg(long, value_name = "DIR", global = true)]
    book_dir: Option<PathBuf>,

    /// Where the step binaries are. Default: beside the bench's own executable.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Threads of the load generator, each one event loop over its share of the connections.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,

    /// Measure each load for this many milliseconds (default: 2000, or 300 with --quick).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=600_000))]
    duration_ms: Option<u64>,

    /// Requests each keep-alive connection keeps outstanding, sent without waiting for the
    /// answers (HTTP pipelining; the servers answer them in order).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pipeline: u16,

    /// At most this many idle connections (default: 10,000, or 1,000 with --quick).
    #[arg(long, value_name = "N")]
    max_idle: Option<usize>,

    /// Instead of the comparison, run the generator and wrk in turns against step07-epoll and
    /// nginx, at 100 keep-alive connections, and print the ratio of their rates.
    #[arg(long)]
    vs_wrk: bool,
}

#[derive(Subcommand)]
enum Commands {
    /// The classic measurement: 100,000 operations of poll, select and epoll over N = 10 to
    /// 10,000 descriptors, one ready each time, beside the figures published in 2006.
    Tlpi,
}

fn main() -> Result<()> {
    let args = Args::parse();
    stop::install()?;
    // Orphans of a killed server (the fork step's children, nginx's worker) are re-parented to
    // us rather than to init, so that we can reap them.
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    let fd_limit = raise_fd_limit()?;
    keep_inherited_descriptors();
    if cfg!(debug_assertions) && !args.quick {
        warn("this bench is a debug build, and its generator will be slow: use --release");
    }
    // This crate's folder is in the workspace, beside the book's.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    let book_dir = args
        .book_dir
        .clone()
        .unwrap_or_else(|| workspace.unwrap_or(Path::new(".")).join("book/src/bench"));
    if let Some(Commands::Tlpi) = args.command {
        return tlpi_command(&args, &book_dir);
    }
    let scratch = Scratch::new()?;
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("finding the bench's own executable")?
            .parent()
            .context("the bench's executable has no folder")?
            .to_path_buf(),
    };
    let nginx = if args.no_nginx {
        None
    } else {
        installed("nginx", &["/usr/sbin/nginx"])
    };
    let duration =
        Duration::from_millis(
            args.duration_ms
                .unwrap_or(if args.quick { 300 } else { 2000 }),
        );
    let timing = Timing {
        // Answers are not counted for a quarter of the measured time, after every connection
        // has been answered once.
        warmup: duration / 4,
        duration,
        threads: usize::from(args.threads),
        timeout: Duration::from_secs(if args.quick { 2 } else { 5 }),
        pipeline: usize::from(args.pipeline),
    };
    if args.vs_wrk {
        return vs_wrk(&args, &bin_dir, nginx, &timing, &scratch, &book_dir);
    }
    let rows = plan::rows(&bin_dir, &args.steps, nginx.clone())?;
    let mut extra = Vec::new();
    if nginx.is_none() && !args.no_nginx {
        let note = "nginx is not installed, so there is no reference row (`apt-get install nginx`)";
        warn(note);
        extra.push(format!("- **nginx**: {note}"));
    } else if let Some(nginx) = &nginx {
        extra.push(format!("- **nginx**: {}", book::version(nginx)));
    }
    if args.pipeline > 1 {
        let note = format!(
            "{} requests pipelined on every keep-alive connection",
            args.pipeline
        );
        extra.push(format!("- **Pipelining**: {note}"));
    }
    let wanted_idle = args
        .max_idle
        .unwrap_or(if args.quick { 1000 } else { 10_000 });
    // The bench holds the idle connections too, and needs a few descriptors of its own.
    let room = usize::try_from(fd_limit.saturating_sub(100)).unwrap_or(usize::MAX);
    if wanted_idle > room {
        let note = format!("at most {room} idle connections: the descriptor limit is {fd_limit}");
        warn(&note);
        extra.push(format!("- **Idle connections**: {note}"));
    }
    let loads = Load::all(wanted_idle.min(room));
    let preface = book::preface(&extra);
    let results = compare(&rows, &loads, &timing, &scratch)?;
    if args.write_book {
        book::write_results(&book_dir, &results, &preface)?;
        eprintln_ok(&format!("wrote {}", book_dir.display()));
    }
    Ok(())
}

/// Runs every load against every row, printing each load's table as soon as it is done.
fn compare(
    rows: &[Row],
    loads: &[Load],
    timing: &Timing,
    scratch: &Scratch,
) -> Result<Vec<LoadResults>> {
    let mut progress = Progress::new((rows.len() * loads.len()) as u64);
    let mut all = Vec::new();
    for &load in loads {
        let mut cells = Vec::new();
        for row in rows {
            progress.start(&format!("{}: {}", row.name, load.short()));
            let cell = match run::measure(row, load, timing, scratch) {
                Ok(cell) => cell,
                // One server failing is a finding for its row; Ctrl-C ends the run.
                Err(err) if !stop::requested() => Cell::Skipped(failure(&err)),
                Err(err) => return Err(err),
            };
            progress.finish_one();
            cells.push((row.name.clone(), cell));
        }
        let results = LoadResults { load, cells };
        progress.print(&(report::table(&results).render() + "\n"))?;
        all.push(results);
    }
    Ok(all)
}

/// A failure in one line for a table's note: the error's chain, up to its first line break.
fn failure(err: &anyhow::Error) -> String {
    let text = format!("failed: {err:#}");
    text.lines().next().unwrap_or_default().to_string()
}

fn tlpi_command(args: &Args, book_dir: &Path) -> Result<()> {
    let budget = Duration::from_millis(if args.quick { 200 } else { 3000 });
    let mut progress = Progress::new((tlpi::SIZES.len() * tlpi::MECHANISMS.len()) as u64);
    let mut started = false;
    let results = tlpi::run(budget, |what| {
        if started {
            progress.finish_one();
        }
        started = true;
        progress.start(what);
    })?;
    drop(progress);
    let text = tlpi::table(&results).render() + "\n" + &tlpi::footnote(&results) + "\n";
    Progress::new(0).print(&text)?;
    if args.write_book {
        book::write_tlpi(book_dir, &results, &book::preface(&[]))?;
        eprintln_ok(&format!("wrote {}", book_dir.display()));
    }
    Ok(())
}

fn vs_wrk(
    args: &Args,
    bin_dir: &Path,
    nginx: Option<PathBuf>,
    timing: &Timing,
    scratch: &Scratch,
    book_dir: &Path,
) -> Result<()> {
    let Some(wrk) = installed("wrk", &[]) else {
        bail!("wrk is not installed (`apt-get install wrk`): there is nothing to compare with");
    };
    let mut rows = plan::rows(bin_dir, &[7], nginx.clone())?;
    rows.retain(|row| row.name != "step07-mio");
    if nginx.is_none() {
        warn("nginx is not installed: comparing against step07-epoll only");
    }
    let seconds = timing.duration.as_secs().max(1);
    let timing = Timing {
        duration: Duration::from_secs(seconds),
        ..*timing
    };
    let comparisons = wrk::compare(
        &wrk,
        &rows,
        &timing,
        if args.quick { 1 } else { 3 },
        scratch,
    )?;
    let table = wrk::table(&comparisons, seconds);
    Progress::new(0).print(&(table.render() + "\n"))?;
    if args.write_book {
        let extra = [format!("- **wrk**: {}", book::version(&wrk))];
        book::write_vs_wrk(book_dir, &table, &book::preface(&extra))?;
        eprintln_ok(&format!("wrote {}", book_dir.display()));
    }
    Ok(())
}

/// Raises the soft limit on descriptors to the hard one (idle connections and the TLPI
/// measurement need thousands); returns it.
fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    Ok(hard)
}

/// Marks every descriptor above stderr close-on-exec. Descriptors the bench inherited open
/// without that flag (from a shell, an editor, a CI runner) would otherwise be passed on to
/// every server it starts, and counted in the servers' descriptors.
fn keep_inherited_descriptors() {
    let (first, last) = (3, libc::c_uint::MAX);
    let flags = libc::CLOSE_RANGE_CLOEXEC;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors: it closes
    // none and touches no memory. On a kernel without it (before 5.11) it fails, harmlessly.
    let _ = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
}

/// Where `program` is: on the PATH, or at one of `also`.
fn installed(program: &str, also: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .chain(also.iter().map(PathBuf::from))
        .find(|candidate| candidate.is_file())
}

fn warn(text: &str) {
    eprintln_ok(&format!("bench: {text}"));
}

/// A line on stderr; one that cannot be written is dropped (`eprintln!` would panic).
fn eprintln_ok(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}
