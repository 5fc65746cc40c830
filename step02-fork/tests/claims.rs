//! What step 2 claims: a process per connection serves slow clients at once; how children are
//! reaped decides whether zombies pile up; the parent must close its copy of each connection,
//! or its descriptors leak and the client never sees the connection end.
//!
//! Timings only tell "blocked" from "served", with wide margins; every wait is bounded.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::procfs::{children, fd_count, group, sockets, zombies};
use testkit::{Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_step02-fork");
const SERVED: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(5);

/// `n` requests, each on a connection of its own, each answered and closed.
fn requests(server: &Server, n: usize) {
    for _ in 0..n {
        assert_eq!(server.get("/").status, 200);
    }
}

/// Starts a `/sleep/MS` request on a new connection and returns it with the pid of the child
/// that serves it (the one child that was not there before).
fn slow_request(server: &Server, ms: u32) -> (testkit::Client, i32) {
    let before: Vec<i32> = children(server.pid).iter().map(|&(pid, _)| pid).collect();
    let mut client = server.connect();
    client.send(format!("GET /sleep/{ms} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    let mut child = None;
    let appeared = wait_until(SETTLE, || {
        child = children(server.pid)
            .into_iter()
            .map(|(pid, _)| pid)
            .find(|pid| !before.contains(pid));
        child.is_some()
    });
    assert!(appeared, "no child process appeared for the connection");
    (client, child.expect("found above"))
}

/// Sends `/sleep/MS` on `n` connections at once, runs `meanwhile`, then checks that every one
/// is answered and that all of them together took less than `within`, which the caller sets
/// well under `n * MS`, the time they would take one after the other.
fn slow_clients_served_at_once(
    server: &Server,
    (n, ms): (u32, u32),
    within: Duration,
    meanwhile: impl FnOnce(),
) {
    let started = Instant::now();
    let mut slow: Vec<_> = (0..n).map(|_| server.connect()).collect();
    for client in &mut slow {
        client.send(format!("GET /sleep/{ms} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    }
    meanwhile();
    for client in &mut slow {
        let response = client.read_response(false, SERVED).expect("slow answer");
        assert_eq!(response.status, 200);
    }
    assert!(
        started.elapsed() < within,
        "{n} requests of {ms} ms took {:?}: not served at once (one after the other: {} ms)",
        started.elapsed(),
        n * ms
    );
}

#[test]
fn two_slow_clients_served_at_once() {
    let server = Server::start(BIN, &[]);
    slow_clients_served_at_once(&server, (2, 3000), Duration::from_millis(4500), || {
        // While both sleep, a third client is answered at once.
        let quick = Instant::now();
        assert_eq!(server.get("/").status, 200);
        assert!(
            quick.elapsed() < Duration::from_millis(1000),
            "a quick request waited {:?} behind two slow ones",
            quick.elapsed()
        );
    });
}

#[test]
fn slow_clients_served_at_once_in_every_reap_mode() {
    for mode in ["sigchld", "none", "ignore", "double-fork"] {
        let server = Server::start(BIN, &["--reap", mode]);
        // Three of 1.5 s would take 4.5 s one after the other.
        slow_clients_served_at_once(&server, (3, 1500), Duration::from_millis(3000), || {});
    }
}

#[test]
fn double_fork_serves_from_a_grandchild() {
    let server = Server::start(BIN, &["--reap", "double-fork"]);
    let mut client = server.connect();
    client.send(b"GET /sleep/1500 HTTP/1.1\r\nHost: test\r\n\r\n");
    // The processes of the server's group, other than the server, that hold a socket: once the
    // middle child has exited, that is the grandchild alone, and init (or a subreaper) has
    // adopted it. A middle child that served the connection itself would be our child.
    let mut holders = Vec::new();
    let adopted = wait_until(SETTLE, || {
        holders = group(server.pid)
            .into_iter()
            .filter(|&(pid, _)| pid != server.pid && !sockets(pid).is_empty())
            .collect();
        !holders.is_empty() && holders.iter().all(|&(_, ppid)| ppid != server.pid)
    });
    assert!(
        adopted,
        "with --reap double-fork, the process serving a connection must not be the server's \
         child (server {}): (pid, ppid) of the holders {holders:?}",
        server.pid
    );
    assert_eq!(
        client.read_response(false, SERVED).expect("answer").status,
        200
    );
}

/// A process inherits its parent's `SIGCHLD` disposition and signal mask (a shell or a
/// supervisor may start it with `SIGCHLD` ignored or blocked); each mode sets its own.
#[test]
fn inherited_sigchld_ignored_changes_no_mode() {
    let ignoring = ["env", "--ignore-signal=CHLD"];
    let server = Server::start_wrapped(&ignoring, BIN, &["--reap", "none"]);
    requests(&server, 3);
    assert!(
        wait_until(SETTLE, || zombies(server.pid) == 3),
        "--reap none, started with SIGCHLD ignored: expected 3 zombies, found {:?}",
        children(server.pid)
    );
    let server = Server::start_wrapped(&ignoring, BIN, &["--reap", "double-fork"]);
    requests(&server, 3);
    thread::sleep(Duration::from_millis(300)); // a failed waitpid would be logged by now
    assert!(
        !server.stderr().contains("waitpid"),
        "--reap double-fork, started with SIGCHLD ignored: the parent could not wait for its \
         middle child:\n{}",
        server.stderr_tail(10)
    );
}

#[test]
fn inherited_sigchld_blocked_is_unblocked() {
    let server = Server::start_wrapped(&["env", "--block-signal=CHLD"], BIN, &[]);
    requests(&server, 5);
    assert!(
        wait_until(SETTLE, || children(server.pid).is_empty()),
        "--reap sigchld, started with SIGCHLD blocked: children left {:?}",
        children(server.pid)
    );
}

#[test]
fn reap_none_leaves_zombies() {
    let server = Server::start(BIN, &["--reap", "none"]);
    requests(&server, 3);
    assert!(
        wait_until(SETTLE, || zombies(server.pid) == 3),
        "expected 3 zombies, found {:?}",
        children(server.pid)
    );
    // They stay: nobody will ever wait for them.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(zombies(server.pid), 3, "{:?}", children(server.pid));
}

/// In the three reaping modes, every child is gone once the clients are done.
fn no_zombies_with(mode: &str) {
    let server = Server::start(BIN, &["--reap", mode]);
    requests(&server, 5);
    assert!(
        wait_until(SETTLE, || children(server.pid).is_empty()),
        "--reap {mode}: children left behind: {:?}",
        children(server.pid)
    );
    assert_eq!(server.get("/").status, 200, "--reap {mode}: still serving");
}

#[test]
fn reap_sigchld_leaves_no_zombies() {
    no_zombies_with("sigchld");
}

#[test]
fn reap_ignore_leaves_no_zombies() {
    no_zombies_with("ignore");
}

#[test]
fn reap_double_fork_leaves_no_zombies() {
    no_zombies_with("double-fork");
}

#[test]
fn reap_sigchld_reaps_a_burst_of_exits() {
    // Thirty children that exit at about the same moment: their SIGCHLDs merge (a pending
    // signal is a bit, not a counter), so a handler that reaped one child per signal would
    // leave zombies behind. Ours loops until waitpid finds no more.
    let server = Server::start(BIN, &[]);
    let mut clients: Vec<_> = (0..30).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.send(b"GET /sleep/300 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    }
    for client in &mut clients {
        assert_eq!(
            client.read_response(false, SERVED).expect("answer").status,
            200
        );
    }
    assert!(
        wait_until(SETTLE, || children(server.pid).is_empty()),
        "children left after a burst of exits: {:?}",
        children(server.pid)
    );
}

#[test]
fn leak_grows_parent_fds() {
    let server = Server::start(BIN, &["--leak"]);
    let base = fd_count(server.pid);
    requests(&server, 5);
    assert!(
        wait_until(SETTLE, || fd_count(server.pid) == base + 5),
        "with --leak, 5 connections should leave 5 more descriptors: {base} then {}",
        fd_count(server.pid)
    );
}

#[test]
fn no_leak_keeps_parent_fds_flat() {
    let server = Server::start(BIN, &[]);
    let base = fd_count(server.pid);
    requests(&server, 5);
    assert!(wait_until(SETTLE, || children(server.pid).is_empty()));
    assert_eq!(
        fd_count(server.pid),
        base,
        "the parent's descriptor count moved"
    );
}

/// Sends an HTTP/1.0 request, which the child answers before it closes its copy of the
/// connection and exits; tells whether the client then sees the connection end within `within`.
fn answered_then_closed(args: &[&str], within: Duration) -> bool {
    let server = Server::start(BIN, args);
    let mut client = server.connect();
    client.send(b"GET / HTTP/1.0\r\n\r\n");
    let response = client.read_response(false, SERVED).expect("answer");
    assert_eq!(response.status, 200);
    client.closed_within(within)
}

#[test]
fn leaked_connection_never_sees_eof() {
    // The parent's leaked copy keeps the connection open: no end-of-file ever arrives.
    assert!(
        !answered_then_closed(&["--leak"], Duration::from_millis(1500)),
        "the connection closed although the parent kept a copy of it"
    );
}

#[test]
fn child_exit_closes_socket() {
    assert!(
        answered_then_closed(&[], SETTLE),
        "the child exited but the client saw no end-of-file"
    );
}

/// The sockets a child holds once it has closed the listener it inherited (it does so right
/// after `fork`, so a look at once may still catch it).
fn sockets_without(child: i32, listener: u64) -> Vec<(i32, u64)> {
    let closed = wait_until(SETTLE, || {
        sockets(child).iter().all(|&(_, inode)| inode != listener)
    });
    assert!(
        closed,
        "the child still holds the listener: {:?}",
        sockets(child)
    );
    sockets(child)
}

#[test]
fn child_closes_listener() {
    let server = Server::start(BIN, &[]);
    // Idle, the parent's only socket is the listener.
    let listener = sockets(server.pid);
    assert_eq!(listener.len(), 1, "parent sockets: {listener:?}");
    let (mut client, child) = slow_request(&server, 1500);
    let held = sockets_without(child, listener[0].1);
    assert_eq!(
        held.len(),
        1,
        "the child should hold its connection only: {held:?}"
    );
    assert_eq!(
        client.read_response(false, SERVED).expect("answer").status,
        200
    );
}

#[test]
fn lowest_fd_reused_without_leak() {
    for leak in [false, true] {
        let server = Server::start(BIN, if leak { &["--leak"][..] } else { &[] });
        let listener = sockets(server.pid)[0].1;
        let (mut first, first_child) = slow_request(&server, 1500);
        let (mut second, second_child) = slow_request(&server, 1500);
        let first_held = sockets_without(first_child, listener);
        let second_held = sockets_without(second_child, listener);
        // Each child's own connection is its newest descriptor.
        let first_fd = first_held.iter().map(|&(fd, _)| fd).max();
        let second_fd = second_held.iter().map(|&(fd, _)| fd).max();
        if leak {
            // The parent's leaked copy of the first connection still occupies that number, so
            // the second connection gets the next one; and the second child inherited the leak.
            assert_eq!(
                second_fd,
                first_fd.map(|fd| fd + 1),
                "with --leak the numbers climb"
            );
            assert_eq!(
                second_held.len(),
                2,
                "the second child inherits the leaked copy too"
            );
        } else {
            // The parent closed its copy of the first connection before accepting the second,
            // so accept handed out the lowest free number again.
            assert_eq!(first_fd, second_fd, "without --leak the number is reused");
            assert_eq!(second_held.len(), 1);
        }
        for client in [&mut first, &mut second] {
            assert_eq!(
                client.read_response(false, SERVED).expect("answer").status,
                200
            );
        }
    }
}

#[test]
fn sigchld_burst_leaves_parent_serving() {
    let server = Server::start(BIN, &[]);
    let mut slow = server.connect();
    slow.send(b"GET /sleep/500 HTTP/1.1\r\nHost: test\r\n\r\n");
    // A thousand SIGCHLDs with no child to reap: each runs the handler, which finds nothing to
    // wait for (ECHILD or StillAlive) and returns; the parent's accept is restarted each time.
    let parent = Pid::from_raw(server.pid);
    for _ in 0..1000 {
        kill(parent, Signal::SIGCHLD).expect("kill(SIGCHLD)");
    }
    assert!(server.is_alive(), "the parent died of the signal burst");
    assert_eq!(server.get("/").status, 200);
    assert_eq!(
        slow.read_response(false, SERVED)
            .expect("slow answer")
            .status,
        200
    );
    drop(slow); // its child now reads end-of-file and exits
    assert!(
        wait_until(SETTLE, || children(server.pid).is_empty()),
        "children left: {:?}",
        children(server.pid)
    );
}

#[test]
fn resets_mid_response_leave_no_zombies() {
    let server = Server::start(BIN, &[]);
    for _ in 0..50 {
        let mut client = server.connect();
        client.send(b"GET /bytes/8388608 HTTP/1.1\r\nHost: test\r\n\r\n");
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut client.stream, &mut first).expect("first byte");
        client.reset(); // RST, not FIN: the child's next write fails with ECONNRESET or EPIPE
    }
    assert!(
        wait_until(SERVED, || children(server.pid).is_empty()),
        "children left after resets: {:?}",
        children(server.pid)
    );
    assert!(server.is_alive());
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn parent_needs_one_descriptor_of_room() {
    // Room for a single connection in the parent: it holds each one only from accept to fork,
    // so that is enough to serve several slow clients at once.
    let server = Server::start_with_fd_room(BIN, &[], 1);
    slow_clients_served_at_once(&server, (3, 2000), Duration::from_millis(4500), || {});
}

#[test]
fn leak_runs_out_of_fds_without_spinning() {
    // Room for three descriptors: with --leak, three connections fill it for good.
    let server = Server::start_with_fd_room(BIN, &["--leak"], 3);
    requests(&server, 3);
    // Now every descriptor is taken by a leaked connection: each new client gets 503.
    for _ in 0..3 {
        assert_eq!(server.get("/").status, 503);
    }
    // And the parent does not spin: it waits in accept with its spare descriptor closed.
    testkit::shared::assert_refusing_without_spinning(&server, Duration::ZERO);
    assert!(
        server.has_logged("out of file descriptors"),
        "the refusals were not logged"
    );
}

#[test]
fn fork_failure_answers_503() {
    // Under RLIMIT_NPROC every fork fails with EAGAIN (see `start_unable_to_spawn`).
    let server = Server::start_unable_to_spawn(BIN, &[]);
    let response = server.get("/");
    assert_eq!(response.status, 503, "a fork that failed must answer 503");
    assert!(server.is_alive(), "the parent died when fork failed");
    assert!(server.has_logged("fork"), "the failure was not logged");
    // It goes on refusing, and living, as long as the limit holds.
    assert_eq!(server.get("/").status, 503);
}
