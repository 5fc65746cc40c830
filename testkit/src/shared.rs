//! Claims that hold for several steps but not for all, so they are not in the contract: each
//! step whose model makes the claim true calls the function from its own `tests/claims.rs`.

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::procfs::{cpu_time, sockets, wait_until};
use crate::server::Server;

/// For servers whose connections all live in the one process (threads, pools, event loops):
/// with room for two descriptors, two idle clients fill it; the next client is refused with
/// `503` (or closed) while the server neither dies nor spins; once the two leave, clients are
/// served again. (Steps 1 and 2 never hold two connections in the accepting process.)
pub fn out_of_fds_until_clients_leave(bin: &str, args: &[&str]) {
    let server = Server::start_with_fd_room(bin, &[args, &["--timeout-secs", "30"]].concat(), 2);
    let idle = cpu_in_a_second(&server);
    // Its listening sockets: one, or one per event loop (step 9).
    let listening = sockets(server.pid).len();
    let clients: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    // The listeners and the two connections. (Counting all descriptors would not do: with no
    // room left, the server closes its spare as soon as it calls `accept` again.)
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len()
            == listening + 2),
        "the server did not take both idle connections: sockets {:?}",
        sockets(server.pid)
    );
    assert_refusing_without_spinning(&server, idle);
    drop(clients);
    // The server reads their end-of-file and closes both: only the listeners are left.
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len()
            == listening),
        "the server did not close the connections its clients left: sockets {:?}",
        sockets(server.pid)
    );
    assert_served_again(&server, "the idle clients left");
}

/// The CPU time the server burns over one second: about none for a server that sleeps while
/// it waits, about a whole second for one that polls without end (step 5).
pub fn cpu_in_a_second(server: &Server) -> Duration {
    let before = cpu_time(server.pid);
    thread::sleep(Duration::from_secs(1));
    cpu_time(server.pid).saturating_sub(before)
}

/// Out of descriptors: three new clients each get `503` or a close (never a hang), and over the
/// next second the server burns no more CPU than it did idle with descriptors to spare (`idle`,
/// from [`cpu_in_a_second`]; a naive accept loop burns a whole core retrying `accept`) and
/// logs no more than a few lines (a naive loop logs every failed `accept`), and it lives.
#[track_caller]
pub fn assert_refusing_without_spinning(server: &Server, idle: Duration) {
    for i in 1..=3 {
        let outcome = try_get(server, Duration::from_secs(5));
        assert!(
            refused_for_want_of_fds(&outcome),
            "client {i} with no descriptor left must get 503 or a close, got {outcome:?}; \
             server stderr:\n{}",
            server.stderr_tail(30)
        );
    }
    assert_not_spinning(server, idle);
}

/// Out of descriptors, over the next second the server burns no more CPU than it did idle with
/// descriptors to spare (`idle`), logs no more than a few lines, and lives.
#[track_caller]
pub fn assert_not_spinning(server: &Server, idle: Duration) {
    let logged = server.stderr().len();
    let burnt = cpu_in_a_second(server);
    assert!(
        burnt < idle + Duration::from_millis(250),
        "out of descriptors and idle, the server burnt {burnt:?} of CPU in 1 s (idle with \
         descriptors to spare: {idle:?}): it spins"
    );
    let more = server.stderr().len().saturating_sub(logged);
    assert!(
        more < 4096,
        "out of descriptors and idle, the server logged {more} bytes in 1 s: it logs each \
         failed accept; stderr ends:\n{}",
        server.stderr_tail(10)
    );
    assert!(
        server.is_alive(),
        "the server died out of descriptors:\n{}",
        server.stderr_tail(30)
    );
}

/// Descriptors are back (`since` says how): the very first client after that is answered
/// `200`, and so are the next two. A server that has descriptors again must not refuse anyone
/// because it was short of them a moment ago, even if it was waiting in `accept` with its spare
/// descriptor closed when the client came.
#[track_caller]
pub fn assert_served_again(server: &Server, since: &str) {
    for i in 1..=3 {
        let outcome = try_get(server, Duration::from_secs(5));
        assert!(
            matches!(outcome, Ok(200)),
            "client {i} after {since} got {outcome:?}, not 200; server stderr:\n{}",
            server.stderr_tail(30)
        );
    }
}

/// One `GET /` with `Connection: close` on a new connection: the status, or why there is none.
pub fn try_get(server: &Server, within: Duration) -> io::Result<u16> {
    let mut client = server.connect();
    client.try_send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    Ok(client.read_response(false, within)?.status)
}

/// Whether `outcome` is one a server out of descriptors may give: `503`, or a close unanswered.
pub fn refused_for_want_of_fds(outcome: &io::Result<u16>) -> bool {
    match outcome {
        Ok(status) => *status == 503,
        Err(err) => err.kind() != io::ErrorKind::TimedOut,
    }
}

/// For single-threaded event loops: `/sleep/MS` runs on the loop's one thread, so a quick
/// request on another connection waits until it is done.
pub fn sleep_stalls_everybody(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut slow = server.connect();
    slow.send(b"GET /sleep/1500 HTTP/1.1\r\nHost: test\r\n\r\n");
    thread::sleep(Duration::from_millis(200)); // the loop takes it, and sleeps in the handler
    let started = Instant::now();
    let quick = server.get("/");
    let waited = started.elapsed();
    assert_eq!(quick.status, 200);
    assert!(
        waited >= Duration::from_millis(800),
        "a quick request on another connection was answered after {waited:?}, while \
         /sleep/1500 ran on the loop's one thread"
    );
    let response = slow
        .read_response(false, Duration::from_secs(10))
        .expect("the slow answer");
    assert_eq!(response.status, 200);
}

/// For servers that serve many connections at once: a client that reads `/bytes/67108864`
/// slowly (64 KiB every 100 ms) does not hold the others up: quick requests on other
/// connections are answered meanwhile, between its partial writes; then it reads the rest at
/// full speed and gets every byte, in the pattern.
pub fn slow_reader_gets_everything_while_others_are_served(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let n: usize = 64 << 20;
    let mut slow = server.connect();
    slow.send(format!("GET /bytes/{n} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    let (early, ended) = slow.read_paced(64 << 10, Duration::from_secs(1));
    assert!(ended.is_none(), "the slow reader was cut off: {ended:?}");
    assert!(
        early < n,
        "the slow reader got everything in a second: not slow"
    );
    for i in 1..=3 {
        let started = Instant::now();
        assert_eq!(server.get("/").status, 200, "quick request {i}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "quick request {i} waited {:?} behind a slow reader",
            started.elapsed()
        );
        slow.read_paced(64 << 10, Duration::from_millis(300));
    }
    let response = slow
        .read_response(false, Duration::from_secs(60))
        .expect("the rest of 64 MiB");
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), n, "body length");
    assert_eq!(
        crate::contract::pattern_mismatch(&response.body),
        None,
        "a byte of the body breaks the pattern"
    );
}

/// For event loops: out of descriptors with several clients already waiting in the listen
/// queue, every one of them is answered `503` or closed, none is left hanging. (An
/// edge-triggered loop hears of the queue once: it must empty it then.) The clients queue up
/// while the server is stopped (`SIGSTOP`), so that they are all there when it wakes.
pub fn queued_clients_refused_when_out_of_fds(bin: &str, args: &[&str]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let server = Server::start_with_fd_room(bin, &[args, &["--timeout-secs", "30"]].concat(), 2);
    let listening = sockets(server.pid).len();
    let _held: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len()
            == listening + 2),
        "the server did not take both idle connections: sockets {:?}",
        sockets(server.pid)
    );
    let pid = Pid::from_raw(server.pid);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let mut queued: Vec<Client> = (0..3)
        .map(|_| {
            let mut client = server.connect();
            let _ = client.try_send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
            client
        })
        .collect();
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    for (i, client) in queued.iter_mut().enumerate() {
        let outcome = client
            .read_response(false, Duration::from_secs(5))
            .map(|response| response.status);
        assert!(
            refused_for_want_of_fds(&outcome),
            "queued client {} of 3, out of descriptors: {outcome:?} (left waiting?); stderr:\n{}",
            i + 1,
            server.stderr_tail(10)
        );
    }
}
