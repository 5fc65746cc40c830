//! Measuring one server under one load: start it, drive it, sample its `/proc`, stop it.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::load::{self, Outcome, Reuse, Spec};
use crate::plan::{self, Load, Program, Row, Setup};
use crate::procfs::{self, Sampler, Usage};
use crate::server::{Scratch, Server};
use crate::stop;

/// How often `/proc` is sampled during a load.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Idle connections are opened this many at a time, then the server is given time to accept
/// them: never more than this many wait in its accept queue, which holds 128 (the listen
/// backlog Rust's std asks for), so no handshake is dropped and retried a second later.
const IDLE_BATCH: usize = 100;
/// How long the server may take to take a batch of idle connections.
const HOLD_WITHIN: Duration = Duration::from_secs(5);

/// How long each load runs, with how many generator threads, and how many requests each
/// keep-alive connection keeps outstanding (pipelined).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
    pub threads: usize,
    pub timeout: Duration,
    pub pipeline: usize,
}

/// What one server did under one load.
pub struct Measured {
    /// What the load generator saw (for an idle load: the one active client).
    pub outcome: Outcome,
    /// The peaks of the server's usage while the load ran.
    pub usage: Usage,
    /// The server's CPU time over the wall time: 1.0 is one core busy all along.
    pub cpu: f64,
    pub idle: Option<Idle>,
    pub note: Option<String>,
}

/// What holding idle connections cost.
pub struct Idle {
    /// How many idle connections the server held.
    pub held: u64,
    /// The server's memory (PSS) while holding them.
    pub memory_kib: u64,
    /// The memory beyond an idle server's, per idle connection held.
    pub per_connection_bytes: Option<f64>,
}

/// One cell of a table: a measurement, or why there is none.
pub enum Cell {
    Done(Box<Measured>),
    Skipped(String),
}

/// Measures `row` under `load`.
pub fn measure(row: &Row, load: Load, timing: &Timing, scratch: &Scratch) -> Result<Cell> {
    let (args, idle, note) = match plan::setup(row, load) {
        Setup::Skip(reason) => return Ok(Cell::Skipped(reason)),
        Setup::Run { args, idle, note } => (args, idle, note),
    };
    let baseline = match load {
        // Measured on a server with its default flags (step 4's default pool, say), so that
        // the memory per connection includes what the model had to add to hold them.
        Load::Idle(_) => Some(idle_memory(row, scratch)?),
        _ => None,
    };
    let server = start(row, &args, scratch)?;
    let spec = spec(load, &server, timing);
    let mut measured = match baseline {
        Some(baseline) => hold_idle(row, &server, idle, baseline, &spec)?,
        None => under_load(&server, &spec)?,
    };
    measured.note = join_notes([note, measured.note.take()]);
    Ok(Cell::Done(Box::new(measured)))
}

/// Starts the server of `row` with `args`.
pub fn start(row: &Row, args: &[String], scratch: &Scratch) -> Result<Server> {
    match &row.program {
        Program::Step { bin, .. } => Server::start_step(bin, args, scratch),
        Program::Nginx(nginx) => Server::start_nginx(nginx, scratch),
    }
    .with_context(|| format!("starting {}", row.name))
}

/// The generator's load for `load`.
pub fn spec(load: Load, server: &Server, timing: &Timing) -> Spec {
    let keep_alive = Reuse::KeepAlive { pipeline: 1 };
    let (connections, reuse, slow_every) = match load {
        Load::KeepAlive(c) => {
            let pipelined = Reuse::KeepAlive {
                pipeline: timing.pipeline,
            };
            (c, pipelined, None)
        }
        Load::PerRequest(c) => (c, Reuse::PerRequest, None),
        Load::SlowMix => (
            plan::SLOW_MIX_CLIENTS,
            Reuse::PerRequest,
            Some(plan::SLOW_EVERY),
        ),
        Load::Idle(_) => (1, keep_alive, None),
    };
    Spec {
        addr: server.addr,
        connections,
        threads: timing.threads,
        reuse,
        slow_every,
        warmup: timing.warmup,
        duration: timing.duration,
        timeout: timing.timeout,
    }
}

/// Runs `spec` against `server` while sampling its `/proc`.
fn under_load(server: &Server, spec: &Spec) -> Result<Measured> {
    let before = procfs::usage(server.pid);
    let started = Instant::now();
    let sampler = Sampler::start(server.pid, SAMPLE_EVERY);
    let outcome = load::run(spec);
    let usage = sampler.finish(server.pid);
    let cpu = usage.cpu.saturating_sub(before.cpu).as_secs_f64() / started.elapsed().as_secs_f64();
    let outcome = outcome?;
    let note = (outcome.errors.total() > 0).then(|| format!("errors: {}", outcome.errors));
    Ok(Measured {
        outcome,
        usage,
        cpu,
        idle: None,
        note,
    })
}

/// The memory (PSS, KiB) of `row`'s server with its default flags, serving nobody.
fn idle_memory(row: &Row, scratch: &Scratch) -> Result<u64> {
    let args = match plan::setup(row, Load::KeepAlive(1)) {
        Setup::Run { args, .. } => args,
        Setup::Skip(_) => Vec::new(),
    };
    let server = start(row, &args, scratch)?;
    // One request first, so that what serving sets up once (buffers the allocator then keeps)
    // is in the baseline rather than spread over the idle connections.
    let once = Timing {
        warmup: Duration::ZERO,
        duration: Duration::from_millis(50),
        threads: 1,
        timeout: Duration::from_secs(5),
        pipeline: 1,
    };
    let active = spec(Load::Idle(0), &server, &once);
    load::run(&active)?;
    Ok(procfs::pss_kib(server.pid))
}

/// Opens `n` idle connections to `server`, then measures one active client beside them, and
/// what holding them costs beyond `baseline_kib`.
fn hold_idle(
    row: &Row,
    server: &Server,
    n: usize,
    baseline_kib: u64,
    spec: &Spec,
) -> Result<Measured> {
    // What the server holds: its descriptors, or for the fork step its processes.
    let holding = || -> u64 {
        let group = procfs::group(server.pid);
        if row.forks() {
            group.len() as u64
        } else {
            group.into_iter().map(procfs::fd_count).sum()
        }
    };
    let before = holding();
    let held = || holding().saturating_sub(before);
    let wait_held = |target: usize| -> Result<bool> {
        let deadline = Instant::now() + HOLD_WITHIN;
        while held() < target as u64 {
            stop::check()?;
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(true)
    };
    let mut idle = Vec::with_capacity(n);
    let mut trouble = None;
    'opening: while idle.len() < n {
        for _ in 0..IDLE_BATCH.min(n - idle.len()) {
            match TcpStream::connect_timeout(&server.addr, HOLD_WITHIN) {
                Ok(stream) => idle.push(stream),
                Err(err) => {
                    trouble = Some(format!("connection {} failed: {err}", idle.len() + 1));
                    break 'opening;
                }
            }
        }
        if !wait_held(idle.len().saturating_sub(IDLE_BATCH))? {
            break;
        }
    }
    wait_held(idle.len())?;
    let held = held();
    let memory_kib = procfs::pss_kib(server.pid);
    let mut measured = under_load(server, spec)?;
    let extra = memory_kib.saturating_sub(baseline_kib) as f64 * 1024.0;
    measured.idle = Some(Idle {
        held,
        memory_kib,
        per_connection_bytes: (held > 0).then(|| extra / held as f64),
    });
    if held < n as u64 {
        let short = format!("held {held} of {n}");
        trouble = Some(trouble.map_or(short.clone(), |why| format!("{short}: {why}")));
    }
    measured.note = join_notes([trouble, measured.note.take()]);
    drop(idle); // the idle connections close only now, after the measurement
    Ok(measured)
}

/// The notes that are there, joined with `; `.
fn join_notes<const N: usize>(notes: [Option<String>; N]) -> Option<String> {
    let notes: Vec<String> = notes.into_iter().flatten().collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}
