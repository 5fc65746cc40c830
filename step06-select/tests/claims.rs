//! What step 6 claims: it sleeps in `select` while idle; a connection whose descriptor is past
//! `FD_SETSIZE` is refused while the others are served; like step 5, a slow request stalls
//! everybody and a slow reader does not.
//!
//! Timings are only generous bounds; every wait is bounded.

use std::time::Duration;

use testkit::procfs::{raise_own_fd_limit, threads};
use testkit::shared::cpu_in_a_second;
use testkit::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_step06-select");

#[test]
fn idle_it_sleeps() {
    let server = Server::start(BIN, &[]);
    let _idle: Vec<Client> = (0..10).map(|_| server.connect()).collect();
    let burnt = cpu_in_a_second(&server) + cpu_in_a_second(&server);
    assert!(
        burnt < Duration::from_millis(100),
        "idle, with 10 quiet connections, the server burnt {burnt:?} of CPU in 2 s: it should \
         be asleep in select"
    );
    assert_eq!(threads(server.pid), 1);
}

#[test]
fn past_fd_setsize_is_refused_and_the_rest_served() {
    assert!(
        raise_own_fd_limit() >= 2400,
        "this test needs 2400 descriptors"
    );
    let server = Server::start(BIN, &["--max-fds", "4096", "--timeout-secs", "60"]);
    // The server numbers its connections from about 5 up, in the order they come: the first
    // thousand fit under 1024, the last fifty do not.
    let mut clients: Vec<Client> = (0..1100).map(|_| server.connect()).collect();
    let mut outcomes = Vec::new();
    for client in &mut clients {
        let sent = client.try_send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        let answer = sent.and_then(|()| client.read_response(false, Duration::from_secs(10)));
        outcomes.push(answer.map(|response| response.status));
    }
    for (i, outcome) in outcomes.iter().enumerate().take(900) {
        assert!(
            matches!(outcome, Ok(200)),
            "connection {i} (well under fd 1024): {outcome:?}; stderr:\n{}",
            server.stderr_tail(10)
        );
    }
    for (i, outcome) in outcomes.iter().enumerate().skip(1050) {
        let refused = match outcome {
            Ok(status) => *status == 503,
            Err(err) => err.kind() != std::io::ErrorKind::TimedOut,
        };
        assert!(
            refused,
            "connection {i} (past fd 1023) must get 503 or a close: {outcome:?}"
        );
    }
    assert!(
        server.has_logged("FD_SETSIZE"),
        "the refusals were not logged"
    );
    assert!(server.is_alive(), "the server died past FD_SETSIZE");
    let again = clients[0].get("/");
    assert_eq!(again.status, 200, "an early connection, asked again");
}

#[test]
fn sleep_stalls_everybody() {
    testkit::shared::sleep_stalls_everybody(BIN, &[]);
}

#[test]
fn slow_reader_gets_everything_while_others_are_served() {
    testkit::shared::slow_reader_gets_everything_while_others_are_served(BIN, &[]);
}

#[test]
fn out_of_fds_until_clients_leave() {
    testkit::shared::out_of_fds_until_clients_leave(BIN, &[]);
}

#[test]
fn queued_clients_refused_when_out_of_fds() {
    testkit::shared::queued_clients_refused_when_out_of_fds(BIN, &[]);
}
