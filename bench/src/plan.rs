//! What is measured: the servers (the rows of every table), the loads (one table each), and
//! where a model cannot take a load as it stands, what the bench does instead, said in the table.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Every step's row, with its step number: a binary's name, or for step 9, whose one binary
/// spreads connections in two ways, `step09-` and the `--balance` of the row.
pub const STEPS: [(u8, &str); 12] = [
    (1, "step01-iterative"),
    (2, "step02-fork"),
    (3, "step03-threads"),
    (4, "step04-pool"),
    (5, "step05-busy-poll"),
    (6, "step06-select"),
    (7, "step07-epoll"),
    (7, "step07-mio"),
    (8, "step08-reactor-pool"),
    (9, "step09-reuseport"),
    (9, "step09-handoff"),
    (10, "step10-io-uring"),
];

/// Step 9's binary, which both of its rows run, each with its own `--balance`.
const MULTI_REACTOR: &str = "step09-multi-reactor";

/// The binary a row runs, and the `--balance` it gives it (step 9 only).
fn binary(row: &str) -> (&str, Option<&str>) {
    match row.strip_prefix("step09-") {
        Some(balance) => (MULTI_REACTOR, Some(balance)),
        None => (row, None),
    }
}

/// The most idle connections `step06-select` is given: `select` cannot watch a descriptor
/// numbered 1024 (`FD_SETSIZE`) or more, and the server's own descriptors come first.
const SELECT_MAX_IDLE: usize = 1000;

/// The most workers `step04-pool` accepts (`--workers`).
const POOL_MAX_WORKERS: usize = 10_000;

/// One server under test.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub program: Program,
}

#[derive(Clone, Debug)]
pub enum Program {
    Step { number: u8, bin: PathBuf },
    Nginx(PathBuf),
}

impl Row {
    fn step(&self) -> Option<u8> {
        match self.program {
            Program::Step { number, .. } => Some(number),
            Program::Nginx(_) => None,
        }
    }

    /// Whether the server holds each connection in a process of its own (the fork step): then
    /// the connections it holds are its processes, not its descriptors.
    pub fn forks(&self) -> bool {
        self.step() == Some(2)
    }
}

/// The rows for `steps` (all when empty), with their binaries in `bin_dir`, plus nginx.
pub fn rows(bin_dir: &Path, steps: &[u8], nginx: Option<PathBuf>) -> Result<Vec<Row>> {
    if let Some(unknown) = steps.iter().find(|n| !STEPS.iter().any(|(s, _)| s == *n)) {
        let last = STEPS.last().map_or(0, |&(number, _)| number);
        bail!("there is no step {unknown}: the steps are 1 to {last}");
    }
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    for (number, name) in STEPS {
        if !steps.is_empty() && !steps.contains(&number) {
            continue;
        }
        let bin = bin_dir.join(binary(name).0);
        if !bin.is_file() && !missing.contains(&binary(name).0) {
            missing.push(binary(name).0);
        }
        rows.push(Row {
            name: name.to_string(),
            program: Program::Step { number, bin },
        });
    }
    if !missing.is_empty() {
        bail!(
            "the step binaries {} are not in {}.\nBuild them first, in the same profile as \
             the bench:\n    cargo build --release --workspace\nthen run the bench with \
             `cargo run --release -p bench`, or give their folder with --bin-dir.",
            missing.join(", "),
            bin_dir.display()
        );
    }
    if let Some(nginx) = nginx {
        rows.push(Row {
            name: "nginx".to_string(),
            program: Program::Nginx(nginx),
        });
    }
    Ok(rows)
}

/// One load: a table of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// `c` keep-alive connections, each sending its next request when answered.
    KeepAlive(usize),
    /// `c` clients, each opening a new connection for every request.
    PerRequest(usize),
    /// Ten clients, a new connection per request, and one request in 20 is `/sleep/100`.
    SlowMix,
    /// `n` idle connections, and one client making requests beside them.
    Idle(usize),
}

/// The concurrency of the slow mix.
pub const SLOW_MIX_CLIENTS: usize = 10;
/// One request in this many is `/sleep/100` in the slow mix.
pub const SLOW_EVERY: u64 = 20;

impl Load {
    /// The loads of a run: the idle ones up to `max_idle` connections.
    pub fn all(max_idle: usize) -> Vec<Load> {
        let mut loads: Vec<Load> = [1, 10, 100, 1000].map(Load::KeepAlive).to_vec();
        loads.extend([10, 100].map(Load::PerRequest));
        loads.push(Load::SlowMix);
        loads.extend(
            [100, 1000, 10_000]
                .into_iter()
                .filter(|&n| n <= max_idle)
                .map(Load::Idle),
        );
        loads
    }

    /// The table's title.
    pub fn title(self) -> String {
        match self {
            Load::KeepAlive(c) => format!("Keep-alive, {c} connection{}", plural(c)),
            Load::PerRequest(c) => format!("A new connection per request, {c} clients"),
            Load::SlowMix => format!(
                "Slow mix: {SLOW_MIX_CLIENTS} clients, a new connection per request, \
                 1 request in {SLOW_EVERY} is /sleep/100"
            ),
            Load::Idle(n) => format!("{} idle connections and one active client", thousands(n)),
        }
    }

    /// A short name, for charts and progress lines.
    pub fn short(self) -> String {
        match self {
            Load::KeepAlive(c) => format!("keep-alive c={c}"),
            Load::PerRequest(c) => format!("new connection c={c}"),
            Load::SlowMix => "slow mix".to_string(),
            Load::Idle(n) => format!("{n} idle"),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `10000` as `10,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// How a row takes a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setup {
    /// Run it: the server's extra flags, the idle connections to open (for an idle load),
    /// and what the table should say about it.
    Run {
        args: Vec<String>,
        idle: usize,
        note: Option<String>,
    },
    /// The model cannot take this load at all; why.
    Skip(String),
}

/// Idle connections must outlive the measurement: the servers' default is 10 s.
const SERVER_TIMEOUT: &str = "300";

/// How `row` takes `load`.
pub fn setup(row: &Row, load: Load) -> Setup {
    let mut args = Vec::new();
    if row.step().is_some() {
        args.extend(["--timeout-secs".to_string(), SERVER_TIMEOUT.to_string()]);
    }
    if let (_, Some(balance)) = binary(&row.name) {
        args.extend(["--balance".to_string(), balance.to_string()]);
    }
    let idle = match load {
        Load::Idle(n) => n,
        _ => 0,
    };
    let mut run = |extra: Option<(&str, usize)>, idle: usize, note: Option<String>| {
        if let Some((flag, value)) = extra {
            args.extend([flag.to_string(), value.to_string()]);
        }
        Setup::Run {
            args: args.clone(),
            idle,
            note,
        }
    };
    match (row.step(), load) {
        (Some(1), Load::KeepAlive(c)) if c > 1 => Setup::Skip(
            "not run: one connection at a time, so the other clients would wait out the run"
                .to_string(),
        ),
        (Some(1), Load::Idle(_)) => Setup::Skip(
            "not run: one connection at a time, so the first idle one blocks everybody".to_string(),
        ),
        // A worker is busy for as long as its client stays connected, so a pool smaller than
        // the number of keep-alive clients would leave the rest waiting for the whole run.
        (Some(4), Load::KeepAlive(c)) if c > 4 => {
            run(Some(("--workers", c)), 0, Some(format!("--workers {c}")))
        }
        // One worker per idle connection, and one for the active client.
        (Some(4), Load::Idle(n)) if n >= POOL_MAX_WORKERS => run(
            Some(("--workers", POOL_MAX_WORKERS)),
            POOL_MAX_WORKERS - 1,
            Some(format!(
                "capped at {}: --workers allows at most {}, one is for the active client",
                thousands(POOL_MAX_WORKERS - 1),
                thousands(POOL_MAX_WORKERS)
            )),
        ),
        (Some(4), Load::Idle(n)) => run(
            Some(("--workers", n + 1)),
            n,
            Some(format!("--workers {}", n + 1)),
        ),
        (Some(6), Load::Idle(n)) if n > SELECT_MAX_IDLE => run(
            None,
            SELECT_MAX_IDLE,
            Some(format!(
                "capped at {}: select cannot watch descriptors past 1023",
                thousands(SELECT_MAX_IDLE)
            )),
        ),
        (None, Load::SlowMix) => {
            Setup::Skip("not run: nginx's `return 200` has no slow request".to_string())
        }
        _ => run(None, idle, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(number: u8) -> Row {
        Row {
            name: format!("step{number}"),
            program: Program::Step {
                number,
                bin: PathBuf::from("x"),
            },
        }
    }

    #[test]
    fn models_that_cannot_take_a_load_say_so() {
        assert!(matches!(
            setup(&row(1), Load::KeepAlive(10)),
            Setup::Skip(_)
        ));
        assert!(matches!(
            setup(&row(1), Load::KeepAlive(1)),
            Setup::Run { .. }
        ));
        assert!(matches!(setup(&row(1), Load::Idle(100)), Setup::Skip(_)));
        let Setup::Run { args, idle, note } = setup(&row(4), Load::Idle(100)) else {
            panic!("step 4 holds idle connections with enough workers");
        };
        assert_eq!(args[2..], ["--workers", "101"]);
        assert_eq!((idle, note.as_deref()), (100, Some("--workers 101")));
        let Setup::Run { args, idle, .. } = setup(&row(4), Load::Idle(10_000)) else {
            panic!("step 4 is capped, not skipped");
        };
        assert_eq!(
            (&args[2..], idle),
            (&["--workers".into(), "10000".into()][..], 9999)
        );
        let Setup::Run { idle, note, .. } = setup(&row(6), Load::Idle(10_000)) else {
            panic!("step 6 is capped, not skipped");
        };
        assert_eq!(idle, SELECT_MAX_IDLE);
        assert!(note.is_some_and(|note| note.contains("select")));
        let plain = setup(&row(7), Load::Idle(10_000));
        let expected = Setup::Run {
            args: vec!["--timeout-secs".into(), SERVER_TIMEOUT.into()],
            idle: 10_000,
            note: None,
        };
        assert_eq!(plain, expected);
        let handoff = Row {
            name: "step09-handoff".into(),
            ..row(9)
        };
        let Setup::Run { args, .. } = setup(&handoff, Load::KeepAlive(10)) else {
            panic!("step 9 takes every load");
        };
        assert_eq!(args[2..], ["--balance", "handoff"]);
    }

    #[test]
    fn missing_binaries_are_explained() {
        let err = rows(Path::new("/nonexistent"), &[1, 7], None).expect_err("nothing there");
        let text = err.to_string();
        assert!(text.contains("cargo build --release --workspace"), "{text}");
        assert!(
            text.contains("step01-iterative, step07-epoll, step07-mio"),
            "{text}"
        );
        let err = rows(Path::new("/"), &[11], None).expect_err("no step 11");
        assert!(err.to_string().contains("there is no step 11"), "{err}");
        // Step 9's two rows run one binary, named once.
        let err = rows(Path::new("/nonexistent"), &[9], None).expect_err("nothing there");
        assert!(
            err.to_string()
                .contains("binaries step09-multi-reactor are not"),
            "{err}"
        );
    }

    #[test]
    fn loads_and_numbers_read_well() {
        assert_eq!(Load::all(1000).len(), 9);
        assert_eq!(Load::all(10_000).len(), 10);
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(100), "100");
        assert_eq!(Load::KeepAlive(1).title(), "Keep-alive, 1 connection");
    }
}
