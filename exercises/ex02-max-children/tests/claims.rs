//! What the exercise claims: with `--max-children 2`, two slow clients each hold a child; a
//! third concurrent client is answered `503` at once by the parent; once the slow ones are done,
//! clients are served again.
//!
//! If this fails, see the book, chapter "Step 2: a process per connection", section
//! "Exercises", "`--max-children N`".

use std::time::{Duration, Instant};

use testkit::procfs::children;
use testkit::{Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_ex02-max-children");

#[test]
fn the_child_beyond_the_limit_gets_503() {
    let server = Server::start(BIN, &["--max-children", "2"]);
    let mut slow: Vec<_> = (0..2).map(|_| server.connect()).collect();
    for client in &mut slow {
        client.send(b"GET /sleep/2000 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    }
    assert!(
        wait_until(Duration::from_secs(5), || children(server.pid).len() == 2),
        "two slow clients should be served by two children: {:?}",
        children(server.pid)
    );
    let started = Instant::now();
    let third = server.get("/");
    assert_eq!(
        third.status, 503,
        "a third concurrent client must be refused with 503 while 2 children serve"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the 503 came only after {:?}: it must come at once",
        started.elapsed()
    );
    for client in &mut slow {
        let response = client
            .read_response(false, Duration::from_secs(10))
            .expect("the slow answers");
        assert_eq!(response.status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(5), || children(server.pid).is_empty()),
        "the children did not go away"
    );
    assert_eq!(
        server.get("/").status,
        200,
        "once the children are gone, clients must be served again: is the count coming down?"
    );
}

#[test]
fn without_the_flag_there_is_no_limit() {
    let server = Server::start(BIN, &[]);
    let mut slow: Vec<_> = (0..3).map(|_| server.connect()).collect();
    for client in &mut slow {
        client.send(b"GET /sleep/500 HTTP/1.1\r\nHost: test\r\n\r\n");
    }
    assert_eq!(server.get("/").status, 200);
}
