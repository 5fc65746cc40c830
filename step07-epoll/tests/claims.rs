//! What step 7 claims: ten thousand idle connections cost a few hundred bytes each and no CPU,
//! while an active client is answered at once; a keep-alive request costs one `read`, one
//! `write` and no `epoll_ctl`; edge-triggered, pipelined requests are never lost; and, as in
//! step 6, a slow reader gets everything, a slow request stalls everybody, and running out of
//! descriptors is survived without spinning.
//!
//! Timings are only generous bounds; every wait is bounded.

use std::fs;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::procfs::{raise_own_fd_limit, rss_kib, sockets, threads, tracer};
use testkit::shared::cpu_in_a_second;
use testkit::{Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_step07-epoll");
const MIO: &str = env!("CARGO_BIN_EXE_step07-mio");

#[test]
fn ten_thousand_idle_connections_cost_little() {
    let idle: usize = 10_000;
    let limit = raise_own_fd_limit();
    assert!(
        limit > idle as u64 + 100,
        "this test holds {idle} connections, and this machine's hard limit on descriptors is \
         {limit} (see `ulimit -Hn`): raise it to run the test"
    );
    // Connecting ten thousand takes seconds: the first ones must not time out meanwhile.
    let server = Server::start(BIN, &["--timeout-secs", "300"]);
    assert_eq!(server.get("/").status, 200); // its buffers and table are warm
    let before = rss_kib(server.pid);
    let held: Vec<TcpStream> = (0..idle)
        .map(|i| {
            TcpStream::connect(server.addr).unwrap_or_else(|err| panic!("connection {i}: {err}"))
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || sockets(server.pid).len() > idle),
        "the server holds only {} sockets of {idle} idle connections",
        sockets(server.pid).len()
    );
    let grown = rss_kib(server.pid).saturating_sub(before) * 1024;
    let each = grown / idle as u64;
    assert!(
        each < 2048,
        "{idle} idle connections grew the server's RSS by {grown} bytes: {each} bytes each"
    );
    for i in 1..=10 {
        let started = Instant::now();
        assert_eq!(server.get("/").status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} beside {idle} idle connections took {:?}",
            started.elapsed()
        );
    }
    let burnt = cpu_in_a_second(&server) + cpu_in_a_second(&server);
    assert!(
        burnt < Duration::from_millis(100),
        "idle with {idle} connections open, the server burnt {burnt:?} of CPU in 2 s"
    );
    assert_eq!(threads(server.pid), 1);
    drop(held);
}

#[test]
fn edge_triggered_pipelining_loses_nothing() {
    let server = Server::start(BIN, &["--edge"]);
    let mut client = server.connect();
    let batch: String = (0..100)
        .map(|i| format!("GET /bytes/{} HTTP/1.1\r\nHost: test\r\n\r\n", i * 1000))
        .collect();
    client.send(batch.as_bytes()); // one write: one edge for all of it
    for i in 0..100 {
        let response = client
            .read_response(false, Duration::from_secs(10))
            .unwrap_or_else(|err| panic!("answer {} of 100 never came: {err}", i + 1));
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body.len(),
            i * 1000,
            "answer {} out of order",
            i + 1
        );
    }
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

#[test]
fn keep_alive_request_costs_one_read_one_write_and_no_epoll_ctl() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("SKIPPED: strace is not installed (apt-get install strace; .ci/run does)");
        return;
    }
    let server = Server::start(BIN, &[]);
    let mut client = server.connect();
    assert_eq!(client.get("/").status, 200); // accepted and on the interest list already
    let summary = std::env::temp_dir().join(format!("step07-strace-{}.txt", server.pid));
    let pid = server.pid.to_string();
    let mut strace = Command::new("strace")
        .args([
            "-c",
            "-e",
            "trace=read,recvfrom,write,sendto,writev,epoll_ctl",
            "-o",
        ])
        .arg(&summary)
        .args(["-p", &pid])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting strace");
    let attached = wait_until(Duration::from_secs(10), || tracer(server.pid) != 0);
    let requests = 1000;
    if attached {
        for _ in 0..requests {
            assert_eq!(client.get("/").status, 200);
        }
    }
    let strace_pid = Pid::from_raw(i32::try_from(strace.id()).expect("a pid"));
    let _ = kill(strace_pid, Signal::SIGINT); // detach and write the summary
    let _ = strace.wait();
    assert!(attached, "strace did not attach to the server within 10 s");
    let text = fs::read_to_string(&summary).expect("strace's summary");
    let _ = fs::remove_file(&summary);
    let counts = strace_counts(&text);
    let calls = |name: &str| {
        counts
            .iter()
            .find(|(call, _)| call == name)
            .map_or(0, |&(_, n)| n)
    };
    assert_eq!(
        calls("epoll_ctl"),
        0,
        "keep-alive requests made epoll_ctl calls:\n{text}"
    );
    // std's `read` and `write` on a socket are the `recv` and `send` system calls.
    let reads = calls("read") + calls("recvfrom");
    let writes = calls("write") + calls("sendto") + calls("writev");
    for (call, n) in [("read", reads), ("write", writes)] {
        assert!(
            (requests..=requests + 5).contains(&n),
            "{requests} keep-alive requests made {n} {call} calls, not one each:\n{text}"
        );
    }
}

#[test]
fn strace_summary_is_parsed() {
    let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                ------ ----------- ----------- --------- --------- ----------------\n \
                60.00    0.000600           0      1000           read\n \
                40.00    0.000400           0      1001         1 write\n\
                ------ ----------- ----------- --------- --------- ----------------\n\
                100.00    0.001000           0      2001         1 total\n";
    assert_eq!(
        strace_counts(text),
        vec![("read".to_string(), 1000), ("write".to_string(), 1001)]
    );
}

#[test]
fn slow_reader_gets_everything_while_others_are_served() {
    for args in [&[][..], &["--edge"]] {
        testkit::shared::slow_reader_gets_everything_while_others_are_served(BIN, args);
    }
    testkit::shared::slow_reader_gets_everything_while_others_are_served(MIO, &[]);
}

#[test]
fn sleep_stalls_everybody() {
    testkit::shared::sleep_stalls_everybody(BIN, &[]);
}

#[test]
fn out_of_fds_until_clients_leave() {
    for args in [&[][..], &["--edge"]] {
        testkit::shared::out_of_fds_until_clients_leave(BIN, args);
    }
    testkit::shared::out_of_fds_until_clients_leave(MIO, &[]);
}

#[test]
fn queued_clients_refused_when_out_of_fds() {
    for args in [&[][..], &["--edge"]] {
        testkit::shared::queued_clients_refused_when_out_of_fds(BIN, args);
    }
    testkit::shared::queued_clients_refused_when_out_of_fds(MIO, &[]);
}
