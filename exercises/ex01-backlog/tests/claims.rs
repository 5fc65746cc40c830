//! What the exercise claims: `--backlog N` sets the listen queue. While the server is busy with
//! one client, the kernel completes the handshakes of at most N + 1 more and queues them; the
//! others' `connect` waits (their SYN is dropped and retried a second later).
//!
//! If this fails, see the book, chapter "Step 1: one client at a time", section "Exercises",
//! "Code: a `--backlog` flag".

use std::net::TcpStream;
use std::time::Duration;

use testkit::Server;

const BIN: &str = env!("CARGO_BIN_EXE_ex01-backlog");

/// How many of `tries` new clients get connected within half a second each, while `server` is
/// busy with another client.
fn connected(server: &Server, tries: usize) -> Vec<TcpStream> {
    (0..tries)
        .filter_map(|_| TcpStream::connect_timeout(&server.addr, Duration::from_millis(500)).ok())
        .collect()
}

#[test]
fn backlog_flag_bounds_the_listen_queue() {
    let server = Server::start(BIN, &["--backlog", "2"]);
    let busy = server.connect(); // accepted: the server now reads it and waits
    std::thread::sleep(Duration::from_millis(200));
    let queued = connected(&server, 8);
    assert!(
        queued.len() <= 4,
        "with --backlog 2 and the server busy, {} of 8 clients were connected: the listen \
         queue is not 2 long (Linux queues backlog + 1)",
        queued.len()
    );
    drop((busy, queued));
}

#[test]
fn default_backlog_is_128() {
    let server = Server::start(BIN, &[]);
    let busy = server.connect();
    std::thread::sleep(Duration::from_millis(200));
    let queued = connected(&server, 20);
    assert_eq!(
        queued.len(),
        20,
        "without --backlog, 20 waiting clients should all be queued (the default is 128)"
    );
    drop(busy);
}
