//! The bench end to end, for a moment: it runs two steps, prints tables of the right shape
//! with no errors, and leaves no server behind, also when interrupted. The figures themselves
//! are never checked: they belong to the machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The folder of the bench's executable, where cargo also puts the step binaries.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bench"))
        .parent()
        .expect("the bench's folder")
        .to_path_buf()
}

/// Builds the step binaries the tests run, in the profile of this test: `cargo test
/// --workspace` has built them already (then this takes a moment), `cargo test -p bench` has not.
fn build(packages: &[&str]) {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet"]);
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    for package in packages {
        cargo.args(["-p", package]);
    }
    let status = cargo.status().expect("running cargo build");
    assert!(status.success(), "cargo build {packages:?} failed");
}

/// Starts the bench with `args`, on the step binaries of [`bin_dir`].
fn start_bench(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .arg("--bin-dir")
        .arg(bin_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the bench")
}

/// Waits at most `within` for `child` to exit, killing it if it does not.
fn finish(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("waitpid").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("its output");
            panic!(
                "the bench did not finish within {within:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("its output")
}

/// The processes running one of our binaries of `steps` (by the path of their executable:
/// the two tests run at once, each on steps of its own).
fn step_processes(steps: &[&str]) -> Vec<i32> {
    let binaries: Vec<PathBuf> = steps.iter().map(|step| bin_dir().join(step)).collect();
    let ours = |pid: &i32| {
        fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| binaries.contains(&exe))
    };
    fs::read_dir("/proc")
        .expect("reading /proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(ours)
        .collect()
}

/// Whether every process of [`step_processes`] is gone within a few seconds (a killed process
/// re-parented to init may take a moment to be reaped).
fn none_left(steps: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if step_processes(steps).is_empty() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The cells of a Markdown table line: `| a | b |` is `["a", "b"]`.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner
        .split('|')
        .map(|cell| cell.trim().to_string())
        .collect()
}

#[test]
fn a_quick_run_prints_whole_tables_without_errors_and_leaves_nothing_behind() {
    let steps = ["step03-threads", "step07-epoll", "step07-mio"];
    build(&steps[..2]);
    let args = [
        "--quick",
        "--steps",
        "3,7",
        "--no-nginx",
        "--duration-ms",
        "80",
        "--max-idle",
        "100",
    ];
    let output = finish(start_bench(&args), Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the bench failed:\n{stderr}");

    let tables: Vec<&str> = stdout.split("### ").skip(1).collect();
    // Keep-alive at four concurrencies, a new connection per request at two, the slow mix,
    // and 100 idle connections.
    assert_eq!(tables.len(), 8, "tables:\n{stdout}");
    for table in tables {
        let (title, body) = table.split_once('\n').expect("a title line");
        let lines: Vec<&str> = body.lines().filter(|line| line.starts_with('|')).collect();
        let header = cells(lines[0]);
        assert_eq!(header[0], "server", "{title}");
        let errors = header
            .iter()
            .position(|h| h == "errors")
            .expect("an errors column");
        let rate = header
            .iter()
            .position(|h| h == "req/s")
            .expect("a req/s column");
        let rows: Vec<Vec<String>> = lines[2..].iter().map(|line| cells(line)).collect();
        let servers: Vec<&str> = rows.iter().map(|row| row[0].as_str()).collect();
        assert_eq!(servers, steps, "{title}");
        for row in &rows {
            assert_eq!(row.len(), header.len(), "{title}: {row:?}");
            assert_eq!(row[errors], "0", "{title}: {row:?}");
            assert!(
                row[rate].chars().any(|c| c.is_ascii_digit()),
                "{title}: {row:?}"
            );
        }
    }
    assert!(
        none_left(&steps),
        "left running: {:?}",
        step_processes(&steps)
    );
}

#[test]
fn ctrl_c_kills_the_servers_and_what_they_forked() {
    let steps = ["step02-fork"];
    build(&steps);
    let args = ["--steps", "2", "--no-nginx", "--duration-ms", "20000"];
    let bench = start_bench(&args);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(bench.id()).expect("a pid"));
    // Wait until the server has forked children for the keep-alive load.
    let deadline = Instant::now() + Duration::from_secs(30);
    while step_processes(&steps).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no server with children appeared"
        );
        thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("kill -INT");
    let output = finish(bench, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "interrupted, the bench must fail");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        none_left(&steps),
        "left running: {:?}",
        step_processes(&steps)
    );
}
