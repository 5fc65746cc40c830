//! What step 4 claims: the thread count is fixed at workers + 1 whatever the load; `workers`
//! idle clients stall everybody else until the head deadline frees a worker; a full queue
//! answers `503` at once instead of queueing forever; a dribbling client cannot hold a worker
//! past `--timeout-secs`.
//!
//! Timings only tell "blocked" from "served", with wide margins; every wait is bounded.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use testkit::procfs::threads;
use testkit::server::run_unable_to_spawn;
use testkit::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_step04-pool");
const BLOCKED: Duration = Duration::from_millis(800);
const SERVED: Duration = Duration::from_secs(10);

#[test]
fn thread_count_is_workers_plus_one() {
    let server = Server::start(BIN, &["--workers", "3"]);
    assert_eq!(threads(server.pid), 4, "before any client");
    let mut clients: Vec<Client> = (0..30).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.send(b"GET /sleep/200 HTTP/1.1\r\nHost: test\r\n\r\n");
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(threads(server.pid), 4, "under load");
    drop(clients);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(threads(server.pid), 4, "after the clients left");
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn idle_clients_exhaust_the_pool() {
    let server = Server::start(BIN, &["--workers", "2", "--timeout-secs", "2"]);
    let started = Instant::now();
    let _idle: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    let mut third = server.connect();
    third.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(
        third.read_response(false, BLOCKED).is_err(),
        "answered although two idle clients held both workers"
    );
    let response = third
        .read_response(false, SERVED)
        .expect("served after the deadline");
    assert_eq!(response.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "served after {:?}, before the idle clients' 2 s deadline freed a worker",
        started.elapsed()
    );
}

#[test]
fn full_queue_answers_503() {
    let server = Server::start(BIN, &["--workers", "1", "--max-queue", "2"]);
    // One idle client holds the only worker; the next two wait in the queue.
    let holder = server.connect();
    thread::sleep(Duration::from_millis(200)); // let the worker take it
    // (`Connection: close`: a keep-alive client would hold the worker after its answer too.)
    let mut queued: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    for client in &mut queued {
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    }
    thread::sleep(Duration::from_millis(200)); // let the accept loop queue them
    // Now the pool is full: more clients are refused at once, not queued.
    for _ in 0..3 {
        let quick = Instant::now();
        let response = server.get("/");
        assert_eq!(
            response.status, 503,
            "a client beyond the queue must get 503"
        );
        assert!(
            quick.elapsed() < Duration::from_secs(2),
            "the 503 itself waited"
        );
    }
    // The queued ones are served once the worker is free.
    drop(holder);
    for client in &mut queued {
        assert_eq!(
            client.read_response(false, SERVED).expect("queued").status,
            200
        );
    }
    assert!(server.has_logged("queue full"), "refusals were not logged");
}

#[test]
fn dribbled_head_cannot_hold_a_worker() {
    let server = Server::start(BIN, &["--workers", "1", "--timeout-secs", "2"]);
    let mut dribbler = server.connect().stream;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        // A client that sends a byte of header every 100 ms and never finishes its head.
        scope.spawn(|| {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVED {
                if dribbler.write_all(b"X").is_err() {
                    break; // the server closed it
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        thread::sleep(Duration::from_millis(200)); // the dribbler holds the only worker
        let started = Instant::now();
        let mut second = server.connect();
        second.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        let response = second.read_response(false, SERVED);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(
            response.expect("served once the dribbler is cut").status,
            200
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1000),
            "served after {:?}: the dribbler did not hold the worker at all",
            started.elapsed()
        );
    });
}

#[test]
fn out_of_fds_until_clients_leave() {
    testkit::shared::out_of_fds_until_clients_leave(BIN, &[]);
}

#[test]
fn pool_that_cannot_start_is_a_one_line_error() {
    // threadpool unwraps its spawns: unhandled, no thread to start means a panic at start-up.
    let finished = run_unable_to_spawn(BIN, &["--addr", "127.0.0.1:0"], SERVED);
    let first = finished.stderr.lines().next().unwrap_or("");
    assert!(
        !finished.status.success() && first.starts_with("Error: cannot start 4 worker threads"),
        "exit {}, first line of stderr {first:?}",
        finished.status
    );
    assert!(
        !finished.stderr.contains("panicked"),
        "a panic instead of an error:\n{}",
        finished.stderr
    );
    assert!(
        !finished.stdout.contains("listening"),
        "the banner came before the pool"
    );
}
