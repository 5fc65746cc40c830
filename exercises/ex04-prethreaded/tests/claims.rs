//! What the exercise claims: there is no accept thread: with `--workers 3`, idle, each of the
//! three workers waits in `accept` itself (the kernel's `inet_csk_accept`, seen in
//! `/proc/PID/task/TID/wchan`), and the process has no thread but the main one and the workers.
//!
//! If this fails, see the book, chapter "Step 4: a pool of threads", section "Exercises",
//! "Code: the prethreaded server".

use std::fs;
use std::time::Duration;

use testkit::procfs::threads;
use testkit::{Client, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_ex04-prethreaded");

/// How many of the process's threads wait in `accept` right now.
fn in_accept(pid: i32) -> usize {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    tasks
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("wchan")).ok())
        .filter(|wchan| wchan.contains("accept"))
        .count()
}

#[test]
fn every_worker_waits_in_accept() {
    let server = Server::start(BIN, &["--workers", "3"]);
    assert!(
        wait_until(Duration::from_secs(5), || in_accept(server.pid) == 3),
        "with --workers 3, idle, three threads should wait in accept; {} do (one accept \
         thread handing out connections is what step 4 does)",
        in_accept(server.pid)
    );
    assert_eq!(threads(server.pid), 4, "the main thread and three workers");
}

#[test]
fn three_workers_serve_three_clients_at_once() {
    let server = Server::start(BIN, &["--workers", "3"]);
    let mut slow: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for client in &mut slow {
        client.send(b"GET /sleep/1000 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    }
    let started = std::time::Instant::now();
    for client in &mut slow {
        let response = client
            .read_response(false, Duration::from_secs(10))
            .expect("answer");
        assert_eq!(response.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "three /sleep/1000 took {:?}: not served side by side",
        started.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(5), || in_accept(server.pid) == 3),
        "after serving, the workers should all wait in accept again"
    );
}
