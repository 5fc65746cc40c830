//! Claims that hold for several steps but not for all, so they are not in the contract: each
//! step whose model makes the claim true calls the function from its own `tests/claims.rs`.

use std::io;
use std::thread;
use std::time::Duration;

use crate::client::Client;
use crate::procfs::{cpu_time, sockets, wait_until};
use crate::server::Server;

/// For servers whose connections all live in the one process (threads, pools, event loops):
/// with room for two descriptors, two idle clients fill it; the next client is refused with
/// `503` (or closed) while the server neither dies nor spins; once the two leave, clients are
/// served again. (Steps 1 and 2 never hold two connections in the accepting process.)
pub fn out_of_fds_until_clients_leave(bin: &str, args: &[&str]) {
    let server = Server::start_with_fd_room(bin, &[args, &["--timeout-secs", "30"]].concat(), 2);
    let idle: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    // The listener and the two connections. (Counting all descriptors would not do: with no
    // room left, the server closes its spare as soon as it calls `accept` again.)
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len() == 3),
        "the server did not take both idle connections: sockets {:?}",
        sockets(server.pid)
    );
    assert_refusing_without_spinning(&server);
    drop(idle);
    // The server reads their end-of-file and closes both: only the listener is left.
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len() == 1),
        "the server did not close the connections its clients left: sockets {:?}",
        sockets(server.pid)
    );
    assert_served_again(&server, "the idle clients left");
}

/// Out of descriptors: three new clients each get `503` or a close (never a hang), the server
/// burns almost no CPU over an idle second (a naive accept loop burns all of it), and lives.
#[track_caller]
pub fn assert_refusing_without_spinning(server: &Server) {
    for i in 1..=3 {
        let outcome = try_get(server, Duration::from_secs(5));
        assert!(
            refused_for_want_of_fds(&outcome),
            "client {i} with no descriptor left must get 503 or a close, got {outcome:?}; \
             server stderr:\n{}",
            server.stderr_tail(30)
        );
    }
    let before = cpu_time(server.pid);
    thread::sleep(Duration::from_secs(1));
    let burnt = cpu_time(server.pid).saturating_sub(before);
    assert!(
        burnt < Duration::from_millis(250),
        "out of descriptors and idle, the server burnt {burnt:?} of CPU in 1 s: it spins"
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
