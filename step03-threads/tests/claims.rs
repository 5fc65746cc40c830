//! What step 3 claims: a thread per connection serves slow clients side by side; the thread
//! count follows the open connections and falls back when they close; hundreds of keep-alive
//! clients are held at once; when no thread can be had, the answer is `503`.
//!
//! Timings only tell "blocked" from "served", with wide margins; every wait is bounded.

use std::time::{Duration, Instant};

use testkit::procfs::threads;
use testkit::{Client, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_step03-threads");
const SERVED: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(5);

#[test]
fn slow_and_idle_clients_do_not_block_others() {
    let server = Server::start(BIN, &[]);
    let _idle = server.connect();
    let mut slow: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    for client in &mut slow {
        client.send(b"GET /sleep/2000 HTTP/1.1\r\nHost: test\r\n\r\n");
    }
    let quick = Instant::now();
    assert_eq!(server.get("/").status, 200);
    assert!(
        quick.elapsed() < Duration::from_millis(1000),
        "a quick request waited {:?} behind an idle and two slow clients",
        quick.elapsed()
    );
    for client in &mut slow {
        assert_eq!(
            client.read_response(false, SERVED).expect("slow").status,
            200
        );
    }
}

#[test]
fn thread_count_follows_connections() {
    let server = Server::start(BIN, &[]);
    let base = threads(server.pid);
    assert_eq!(base, 1, "idle, the server is its main thread alone");
    let clients: Vec<Client> = (0..20).map(|_| server.connect()).collect();
    assert!(
        wait_until(SETTLE, || threads(server.pid) == base + 20),
        "20 open connections should mean 20 more threads: {}",
        threads(server.pid)
    );
    drop(clients); // each thread reads end-of-file, returns, and is gone
    assert!(
        wait_until(SETTLE, || threads(server.pid) == base),
        "the thread count did not return to {base}: {}",
        threads(server.pid)
    );
}

#[test]
fn hundreds_of_keep_alive_clients_are_answered() {
    let server = Server::start(BIN, &[]);
    let mut clients: Vec<Client> = (0..300).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    }
    for client in &mut clients {
        let response = client.read_response(false, SERVED).expect("answer");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("Connection"), Some("keep-alive"));
    }
    // Every connection is still open, so every thread is still there.
    assert_eq!(threads(server.pid), 301);
}

#[test]
fn spawn_failure_answers_503() {
    // RLIMIT_NPROC counts threads too (each is a task of the user): no thread can start.
    let server = Server::start_unable_to_spawn(BIN, &[]);
    for _ in 0..3 {
        assert_eq!(
            server.get("/").status,
            503,
            "a failed spawn must answer 503"
        );
    }
    assert!(server.is_alive(), "the server died when spawn failed");
    assert!(server.has_logged("spawn"), "the failure was not logged");
    assert_eq!(threads(server.pid), 1);
}

#[test]
fn out_of_fds_until_clients_leave() {
    testkit::shared::out_of_fds_until_clients_leave(BIN, &[]);
}
