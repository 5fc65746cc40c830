//! What the exercise claims: idle, the loop no longer burns a core (under a fifth of one), and
//! it still answers at once: a quick request takes well under a second, and 100 keep-alive
//! clients are all served.
//!
//! If this fails, see the book, chapter "Step 5: busy polling", section "Exercises".

use std::time::{Duration, Instant};

use testkit::shared::cpu_in_a_second;
use testkit::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_ex05-idle-backoff");

#[test]
fn idle_it_burns_little() {
    let server = Server::start(BIN, &[]);
    let _idle: Vec<Client> = (0..10).map(|_| server.connect()).collect();
    let burnt = cpu_in_a_second(&server) + cpu_in_a_second(&server);
    assert!(
        burnt < Duration::from_millis(400),
        "idle, with 10 quiet connections, the loop burnt {burnt:?} of CPU in 2 s: it still \
         spins (back off when a whole pass does nothing)"
    );
}

#[test]
fn it_still_answers_at_once() {
    let server = Server::start(BIN, &[]);
    std::thread::sleep(Duration::from_millis(500)); // long idle: the back-off is at its longest
    let started = Instant::now();
    assert_eq!(server.get("/").status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "a request after a quiet spell took {:?}: the back-off is too long",
        started.elapsed()
    );
    let mut clients: Vec<Client> = (0..100).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    }
    for client in &mut clients {
        let response = client
            .read_response(false, Duration::from_secs(10))
            .expect("answer");
        assert_eq!(response.status, 200);
    }
}
