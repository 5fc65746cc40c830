//! What the exercise claims: a connection whose deadline passes while its `recv` is in flight is
//! really closed (its client reads end-of-file), whether it sent nothing or half a head; and the
//! server goes on serving. Closing it early without waiting for the `recv` leaves the socket open
//! inside the kernel, held by the operation: the client never sees the close.
//!
//! If this fails, see the book, chapter "Step 10: `io_uring`, the proactor", section "Exercises".

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use testkit::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_ex10-cancel-and-wait");

/// Waits (at most `within`) for the server to close `client`: end-of-file, or a reset.
fn closed_within(client: &mut Client, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    client
        .stream
        .set_read_timeout(Some(within))
        .expect("set_read_timeout");
    let mut buffer = [0; 4096];
    loop {
        match client.stream.read(&mut buffer) {
            Ok(0) => return Ok(started.elapsed()),
            Ok(_) => {} // an answer (there should be none): keep reading
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("still open after {:?}", started.elapsed()));
            }
            Err(_) => return Ok(started.elapsed()), // reset: closed all the same
        }
    }
}

#[test]
fn silent_connections_are_closed_at_their_deadline() {
    let server = Server::start(BIN, &["--timeout-secs", "1"]);
    let mut silent: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for (i, client) in silent.iter_mut().enumerate() {
        if let Err(why) = closed_within(client, Duration::from_secs(5)) {
            panic!(
                "silent client {} with --timeout-secs 1: {why}; its `recv` was in flight when \
                 its deadline passed: was the connection dropped before the `recv` completed?",
                i + 1
            );
        }
    }
    assert_eq!(server.get("/").status, 200, "served after closing them");
}

#[test]
fn half_a_head_is_closed_at_its_deadline() {
    let server = Server::start(BIN, &["--timeout-secs", "1"]);
    let mut client = server.connect();
    client.send(b"GET / HTTP/1.1\r\nHost: te");
    if let Err(why) = closed_within(&mut client, Duration::from_secs(5)) {
        panic!("a client that sent half a head, with --timeout-secs 1: {why}");
    }
    assert_eq!(server.get("/").status, 200, "served after closing it");
}
