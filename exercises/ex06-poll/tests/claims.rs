//! What the exercise claims: `poll(2)` has no `FD_SETSIZE`: with 1,100 connections open, those
//! whose descriptors are past 1023 are served like the others; idle, it still sleeps.
//!
//! If this fails, see the book, chapter "Step 6: select", section "Exercises", "Port step 6 to
//! `poll(2)`".

use std::time::Duration;

use testkit::procfs::raise_own_fd_limit;
use testkit::shared::cpu_in_a_second;
use testkit::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_ex06-poll");

#[test]
fn past_fd_1023_is_served() {
    assert!(
        raise_own_fd_limit() >= 2400,
        "this test needs 2400 descriptors"
    );
    let server = Server::start(BIN, &["--max-fds", "4096", "--timeout-secs", "60"]);
    let mut clients: Vec<Client> = (0..1100).map(|_| server.connect()).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let sent = client.try_send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        let answer = sent.and_then(|()| client.read_response(false, Duration::from_secs(10)));
        assert!(
            matches!(answer, Ok(ref response) if response.status == 200),
            "connection {i} of 1100 was not served: {:?} (select cannot watch fds past 1023; \
             poll can)",
            answer.map(|response| response.status)
        );
    }
}

#[test]
fn idle_it_sleeps() {
    let server = Server::start(BIN, &[]);
    let _idle: Vec<Client> = (0..10).map(|_| server.connect()).collect();
    let burnt = cpu_in_a_second(&server) + cpu_in_a_second(&server);
    assert!(
        burnt < Duration::from_millis(100),
        "idle, it burnt {burnt:?} in 2 s"
    );
}
