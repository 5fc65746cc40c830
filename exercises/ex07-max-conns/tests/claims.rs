//! What the exercise claims: with `--max-conns 3`, three idle connections are held; a fourth is
//! answered `503` at once and closed, and the server never holds more than three; when one
//! leaves, a new client is served.
//!
//! If this fails, see the book, chapter "Step 7: epoll", section "Exercises".

use std::time::{Duration, Instant};

use testkit::procfs::sockets;
use testkit::{Client, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_ex07-max-conns");

#[test]
fn the_connection_beyond_the_limit_gets_503() {
    let server = Server::start(BIN, &["--max-conns", "3", "--timeout-secs", "30"]);
    let mut idle: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len() == 4),
        "the listener and three connections: {:?}",
        sockets(server.pid)
    );
    for i in 1..=3 {
        let started = Instant::now();
        let response = server.get("/");
        assert_eq!(
            response.status, 503,
            "client {i} beyond --max-conns 3 must be refused with 503"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the 503 must come at once"
        );
    }
    assert!(
        sockets(server.pid).len() <= 4,
        "the server holds more than 3 connections: {:?}",
        sockets(server.pid)
    );
    assert_eq!(
        idle[0].get("/").status,
        200,
        "the connections it holds are served"
    );
    idle.pop();
    assert!(
        wait_until(Duration::from_secs(5), || sockets(server.pid).len() == 3),
        "a connection whose client left is still held"
    );
    assert_eq!(
        server.get("/").status,
        200,
        "with room again, a new client is served"
    );
}

#[test]
fn without_the_flag_there_is_no_limit() {
    let server = Server::start(BIN, &[]);
    let _idle: Vec<Client> = (0..10).map(|_| server.connect()).collect();
    assert_eq!(server.get("/").status, 200);
}
