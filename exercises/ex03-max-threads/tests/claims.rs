//! What the exercise claims: with `--max-threads 2`, two idle clients each hold a thread; a
//! third client is answered `503` at once; when one leaves, clients are served again; the
//! thread count never passes 2 + 1.
//!
//! If this fails, see the book, chapter "Step 3: a thread per connection", section
//! "Exercises", "Code: `--max-threads N`".

use std::time::{Duration, Instant};

use testkit::procfs::threads;
use testkit::{Client, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_ex03-max-threads");

#[test]
fn the_thread_beyond_the_limit_gets_503() {
    let server = Server::start(BIN, &["--max-threads", "2"]);
    let idle: Vec<Client> = (0..2).map(|_| server.connect()).collect();
    assert!(
        wait_until(Duration::from_secs(5), || threads(server.pid) == 3),
        "two idle clients should hold two threads: {} threads",
        threads(server.pid)
    );
    let started = Instant::now();
    assert_eq!(
        server.get("/").status,
        503,
        "a third client must be refused with 503 while 2 threads serve"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the 503 must come at once"
    );
    assert!(
        threads(server.pid) <= 3,
        "more threads than --max-threads 2 allows"
    );
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(5), || threads(server.pid) == 1),
        "the threads did not end when their clients left"
    );
    assert_eq!(
        server.get("/").status,
        200,
        "once the threads are gone, clients must be served again: is the count coming down?"
    );
}

#[test]
fn without_the_flag_there_is_no_limit() {
    let server = Server::start(BIN, &[]);
    let _idle: Vec<Client> = (0..5).map(|_| server.connect()).collect();
    assert_eq!(server.get("/").status, 200);
}
