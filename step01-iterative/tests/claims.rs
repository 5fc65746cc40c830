//! What step 1 claims: one client at a time. While a client holds the server (idle, or waiting
//! on a slow request), the next client is connected but not served; it is served once the first
//! leaves or times out.
//!
//! The timings here only tell "blocked" from "served": each bound is several times wider than
//! the effect it detects.

use std::time::{Duration, Instant};

use testkit::Server;

const BIN: &str = env!("CARGO_BIN_EXE_step01-iterative");

/// How long we watch a waiting client to call it blocked.
const BLOCKED: Duration = Duration::from_millis(800);
/// How long a served client may take before we call the test failed.
const SERVED: Duration = Duration::from_secs(10);

#[test]
fn second_client_waits_while_first_is_idle() {
    let server = Server::start(BIN, &["--timeout-secs", "60"]);
    // The first client connects and says nothing: the server accepts it and blocks in read.
    let first = server.connect();
    let mut second = server.connect();
    second.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(
        second.read_response(false, BLOCKED).is_err(),
        "the second client was answered while the first held the server"
    );
    drop(first); // the server reads end-of-file, closes, and accepts the next client
    let response = second
        .read_response(false, SERVED)
        .expect("the second client is served once the first leaves");
    assert_eq!(response.status, 200);
}

#[test]
fn second_client_waits_while_first_sleeps() {
    let server = Server::start(BIN, &[]);
    let mut first = server.connect();
    first.send(b"GET /sleep/2000 HTTP/1.1\r\nHost: test\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100)); // let the server take the first request
    let mut second = server.connect();
    second.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(
        second.read_response(false, BLOCKED).is_err(),
        "the second client was answered while the first one's request was still sleeping"
    );
    // The first gets its answer, then its connection stays open (keep-alive) and still holds
    // the server: the second is served only when the first closes.
    assert_eq!(
        first
            .read_response(false, SERVED)
            .expect("slow answer")
            .status,
        200
    );
    assert!(
        second.read_response(false, BLOCKED).is_err(),
        "the second client was answered while the first kept its connection open"
    );
    drop(first);
    let response = second
        .read_response(false, SERVED)
        .expect("served after the first left");
    assert_eq!(response.status, 200);
}

#[test]
fn second_client_served_after_first_times_out() {
    let server = Server::start(BIN, &["--timeout-secs", "2"]);
    let mut first = server.connect();
    let started = Instant::now();
    let mut second = server.connect();
    second.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = second
        .read_response(false, SERVED)
        .expect("the second client is served once the first one's deadline passes");
    assert_eq!(response.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the second client was served after {:?}, before the first one's 2 s deadline",
        started.elapsed()
    );
    assert!(
        first.closed_within(SERVED),
        "the idle first client was not closed"
    );
}
