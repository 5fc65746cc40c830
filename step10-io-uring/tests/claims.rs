//! What step 10 claims: under keep-alive load the server makes far fewer system calls than step
//! 7 (no `read`, `write` or `epoll_wait` at all, and fewer `io_uring_enter` than requests);
//! idle, it burns no CPU, with one thread; where the kernel refuses io_uring it says so in one
//! line and exits non-zero; and, as in step 7, a slow reader gets everything, a slow request
//! stalls everybody, and running out of descriptors is survived without spinning.
//!
//! Timings are only generous bounds; every wait is bounded.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::procfs::{sockets, threads, tracer};
use testkit::shared::cpu_in_a_second;
use testkit::{Client, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_step10-io-uring");

#[test]
fn idle_it_burns_no_cpu_on_one_thread() {
    let server = Server::start(BIN, &[]);
    assert_eq!(server.get("/").status, 200);
    // A hundred idle connections: a hundred `recv`s in flight, and nothing to do.
    let held: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || sockets(server.pid).len() > 100),
        "the server holds only {} sockets of 100 idle connections",
        sockets(server.pid).len()
    );
    let burnt = cpu_in_a_second(&server) + cpu_in_a_second(&server);
    assert!(
        burnt < Duration::from_millis(100),
        "idle with 100 connections open, the server burnt {burnt:?} of CPU in 2 s"
    );
    // No kernel worker threads either (`iou-wrk-*` would show in /proc/PID/task): sockets are
    // polled by the kernel, never handed to a thread that blocks.
    assert_eq!(threads(server.pid), 1, "threads of the server");
    drop(held);
}

/// The calls of each name that `strace -c` counted, from its summary table.
fn strace_counts(summary: &str) -> Vec<(String, u64)> {
    summary
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let calls = fields.get(3)?.parse().ok()?;
            let name = fields.last()?;
            (fields.len() >= 5 && *name != "total").then(|| (name.to_string(), calls))
        })
        .collect()
}

/// How many keep-alive requests the load makes: `CLIENTS` connections at once, each sending
/// its requests one after the other.
const CLIENTS: usize = 20;
const EACH: usize = 500;

/// `CLIENTS` threads, each with one connection, each making `EACH` keep-alive requests.
fn keep_alive_load(addr: SocketAddr) {
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            thread::spawn(move || {
                let mut client = Client::new(TcpStream::connect(addr).expect("connect"));
                for _ in 0..EACH {
                    assert_eq!(client.get("/").status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client thread");
    }
}

/// Runs `bin` under `strace -f -c` through [`keep_alive_load`]; returns strace's summary.
fn strace_under_load(bin: &str) -> String {
    let server = Server::start(bin, &[]);
    assert_eq!(server.get("/").status, 200); // set up and warm
    let summary = std::env::temp_dir().join(format!("step10-strace-{}.txt", server.pid));
    let pid = server.pid.to_string();
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&summary)
        .args(["-p", &pid])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting strace");
    let attached = wait_until(Duration::from_secs(10), || tracer(server.pid) != 0);
    if attached {
        keep_alive_load(server.addr);
    }
    let strace_pid = Pid::from_raw(i32::try_from(strace.id()).expect("a pid"));
    let _ = kill(strace_pid, Signal::SIGINT); // detach and write the summary
    let _ = strace.wait();
    assert!(attached, "strace did not attach to {bin} within 10 s");
    let text = fs::read_to_string(&summary).expect("strace's summary");
    let _ = fs::remove_file(&summary);
    text
}

/// The calls named in `names`, summed, from a summary.
fn calls(summary: &str, names: &[&str]) -> u64 {
    strace_counts(summary)
        .iter()
        .filter(|(call, _)| names.contains(&call.as_str()))
        .map(|&(_, n)| n)
        .sum()
}

/// Step 7's calls per request, and ours: `read`/`write` (std calls them `recvfrom`/`sendto` on
/// a socket) and `epoll_wait` against `io_uring_enter`.
const REACTOR_CALLS: [&str; 8] = [
    "read",
    "recvfrom",
    "write",
    "sendto",
    "writev",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
];

#[test]
fn keep_alive_load_costs_far_fewer_system_calls_than_step_7() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("SKIPPED: strace is not installed (apt-get install strace; .ci/run does)");
        return;
    }
    let requests = (CLIENTS * EACH) as u64;
    let ours = strace_under_load(BIN);
    let enters = calls(&ours, &["io_uring_enter"]);
    let reactor = calls(&ours, &REACTOR_CALLS);
    eprintln!("step 10, {requests} keep-alive requests from {CLIENTS} clients:\n{ours}");
    assert_eq!(
        reactor, 0,
        "step 10 made {reactor} read/write/epoll calls; all its I/O goes through the ring:\n{ours}"
    );
    // Step 7 makes at least one `read` and one `write` per request (its claims test proves it);
    // we must make fewer than half a system call per request.
    assert!(
        enters > 0 && enters * 2 < requests,
        "{requests} keep-alive requests from {CLIENTS} clients made {enters} io_uring_enter \
         calls: not far fewer than step 7's two per request:\n{ours}"
    );
    // And side by side with step 7 itself on the same load, when it has been built beside us
    // (`cargo test --workspace` builds it).
    let step7 = Path::new(BIN).with_file_name("step07-epoll");
    if !step7.is_file() {
        eprintln!(
            "not compared with step 7 on this run: {} is not built (cargo build -p step07-epoll)",
            step7.display()
        );
        return;
    }
    let theirs = strace_under_load(step7.to_str().expect("a UTF-8 path"));
    let reactor = calls(&theirs, &REACTOR_CALLS);
    eprintln!("step 7, the same load:\n{theirs}");
    eprintln!(
        "per request: step 7 {:.2} read/write/epoll calls, step 10 {:.2} io_uring_enter",
        reactor as f64 / requests as f64,
        enters as f64 / requests as f64
    );
    assert!(
        enters * 4 < reactor,
        "step 10 made {enters} io_uring_enter calls, step 7 {reactor} read/write/epoll calls \
         on the same load: not far fewer"
    );
}

#[test]
fn strace_summary_is_parsed() {
    let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                ------ ----------- ----------- --------- --------- ----------------\n \
                60.00    0.000600           0      1000           io_uring_enter\n \
                40.00    0.000400           0      1001         1 write\n\
                ------ ----------- ----------- --------- --------- ----------------\n\
                100.00    0.001000           0      2001         1 total\n";
    assert_eq!(
        strace_counts(text),
        vec![
            ("io_uring_enter".to_string(), 1000),
            ("write".to_string(), 1001)
        ]
    );
    assert_eq!(calls(text, &["io_uring_enter"]), 1000);
}

// ANCHOR: refused
/// A classic BPF instruction, as `<linux/filter.h>` builds them.
fn bpf(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

#[test]
fn refused_io_uring_is_one_clear_line_and_a_failure() {
    // What a container's seccomp profile does (recent versions of Docker's default one do):
    // `io_uring_setup` fails with EPERM. The filter is installed in the child between
    // `fork` and `exec`, and only there; the server inherits it.
    // `<linux/bpf_common.h>`: load a 32-bit word at a fixed offset; jump if equal to a
    // constant; return a constant (BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K).
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let setup = u32::try_from(libc::SYS_io_uring_setup).expect("a syscall number");
    let errno = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut filter = [
        bpf(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        bpf(JEQ_K, setup, 0, 1),
        bpf(RET_K, errno, 0, 0),
        bpf(RET_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ];
    let mut command = Command::new(BIN);
    command.args(["--addr", "127.0.0.1:0"]);
    // anyhow adds a backtrace to the error when asked to: here, nobody asks.
    command
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    // SAFETY: between `fork` and `exec` the closure makes only two `prctl` calls, which are
    // async-signal-safe, and allocates nothing; the kernel copies the filter during the call,
    // from the closure's own copy, which lives until the closure returns.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            let no_new_privs = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            let filtered = libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            );
            if no_new_privs != 0 || filtered != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the server under a seccomp filter");
    let pid = child.id();
    let exited = wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let output = child.wait_with_output().expect("the server's output");
    assert!(
        exited,
        "refused io_uring, the server did not exit within 10 s"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "refused io_uring, the server exited with success; stderr:\n{stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "refused io_uring, the server printed a banner:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("Error: ") && lines[0].contains("io_uring"),
        "refused io_uring, the server must say so in one line `Error: ... io_uring ...`; it \
         said:\n{stderr}"
    );
}
// ANCHOR_END: refused

#[test]
fn slow_reader_gets_everything_while_others_are_served() {
    testkit::shared::slow_reader_gets_everything_while_others_are_served(BIN, &[]);
}

#[test]
fn sleep_stalls_everybody() {
    testkit::shared::sleep_stalls_everybody(BIN, &[]);
}

#[test]
fn out_of_fds_until_clients_leave() {
    testkit::shared::out_of_fds_until_clients_leave(BIN, &[]);
}

#[test]
fn queued_clients_refused_when_out_of_fds() {
    testkit::shared::queued_clients_refused_when_out_of_fds(BIN, &[]);
}
