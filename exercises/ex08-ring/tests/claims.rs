//! What the exercise claims. The ring itself (`src/ring.rs`, included here as it is): a ring of
//! N slots holds N - 1 items and gives the next one back; items come out in the order they went
//! in, around the ring many times; an empty ring pops nothing; two threads pass millions of
//! items through a small ring with none lost, doubled or reordered; items left in a dropped ring
//! are dropped with it. And the server on it: with rings of two slots (one answer per worker at
//! a time) every slow answer still arrives, a slow request does not stall the others, the
//! threads are still 1 + workers, and an answer never reaches the wrong client.
//!
//! If this fails, see the book, chapter "Step 8: the loop hands slow work to a pool", sections
//! "A lock-free ring" and "Exercises".

#[path = "../src/ring.rs"]
mod ring;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use testkit::procfs::{sockets, threads};
use testkit::{Client, Response, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_ex08-ring");

/// Where the book explains what failed.
const SEE: &str = "see the book, chapter 8, section \"A lock-free ring\"";

#[test]
fn a_ring_of_n_slots_holds_n_minus_1() {
    let (mut tx, mut rx) = ring::ring::<u32>(4);
    for i in 1..=3 {
        assert!(
            tx.push(i).is_ok(),
            "a ring of 4 slots refused item {i} of 3: push must store the item at `tail` and \
             move `tail` on ({SEE})"
        );
    }
    assert_eq!(
        tx.push(4),
        Err(4),
        "a ring of 4 slots took a 4th item: one slot must stay empty, or a full ring would look \
         empty (head == tail); push gives the item back when full ({SEE})"
    );
    assert_eq!(
        rx.pop(),
        Some(1),
        "pop must give back the oldest item ({SEE})"
    );
    assert!(
        tx.push(4).is_ok(),
        "after one pop, a full ring must take one item again ({SEE})"
    );
}

#[test]
fn items_come_out_in_the_order_they_went_in() {
    let (mut tx, mut rx) = ring::ring::<usize>(5);
    let mut next_in = 0;
    let mut next_out = 0;
    // Three in, two out, again and again: `head` and `tail` go round the ring many times.
    for round in 0..100 {
        for _ in 0..3 {
            if tx.push(next_in).is_ok() {
                next_in += 1;
            }
        }
        for _ in 0..2 {
            if let Some(got) = rx.pop() {
                assert_eq!(
                    got, next_out,
                    "round {round}: items came out of order, or doubled ({SEE})"
                );
                next_out += 1;
            }
        }
    }
    while let Some(got) = rx.pop() {
        assert_eq!(got, next_out, "draining: items came out of order ({SEE})");
        next_out += 1;
    }
    assert!(
        next_in > 200,
        "the ring took only {next_in} items in 100 rounds of three pushes and two pops: push \
         refuses items it has room for ({SEE})"
    );
    assert_eq!(
        next_out, next_in,
        "{next_in} items went in, {next_out} came out ({SEE})"
    );
}

#[test]
fn an_empty_ring_pops_nothing() {
    let (mut tx, mut rx) = ring::ring::<String>(3);
    assert_eq!(rx.pop(), None, "a new ring is empty ({SEE})");
    assert!(
        tx.push("one".to_string()).is_ok(),
        "a new ring must take an item ({SEE})"
    );
    assert_eq!(
        rx.pop().as_deref(),
        Some("one"),
        "pop must give the item back ({SEE})"
    );
    assert_eq!(
        rx.pop(),
        None,
        "after its one item was popped, the ring is empty again: head == tail ({SEE})"
    );
}

#[test]
fn two_threads_lose_duplicate_or_reorder_nothing() {
    const ITEMS: u64 = 2_000_000;
    let (mut tx, mut rx) = ring::ring::<u64>(64);
    // Every wait is bounded, so that a ring that never takes or never gives fails the test
    // instead of hanging it: each side gives up after 10 s without progress.
    const STALL: Duration = Duration::from_secs(10);
    let producer = thread::spawn(move || {
        for i in 0..ITEMS {
            let mut item = i;
            let since = Instant::now();
            while let Err(back) = tx.push(item) {
                item = back;
                if since.elapsed() > STALL {
                    return Err(format!(
                        "the producer could not push item {i} for {STALL:?}: the ring stays \
                         full although the consumer pops"
                    ));
                }
                thread::yield_now();
            }
        }
        Ok(())
    });
    let mut expected = 0;
    let mut since = Instant::now();
    while expected < ITEMS {
        match rx.pop() {
            Some(got) => {
                assert_eq!(
                    got, expected,
                    "item {expected} expected, {got} came: lost, doubled or reordered. Is \
                     `tail` stored with Release after the slot is written, and loaded with \
                     Acquire before it is read? ({SEE})"
                );
                expected += 1;
                since = Instant::now();
            }
            None if producer.is_finished() && rx.pop().is_none() => break,
            None => {
                assert!(
                    since.elapsed() < STALL,
                    "no item {expected} within {STALL:?} ({SEE})"
                );
                thread::yield_now();
            }
        }
    }
    let pushed = producer.join().expect("the producer thread panicked");
    if let Err(why) = pushed {
        panic!("{why} ({SEE})");
    }
    assert_eq!(
        expected, ITEMS,
        "{ITEMS} items pushed, {expected} popped ({SEE})"
    );
}

/// Counts its drops.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn items_left_in_a_ring_are_dropped_with_it() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (mut tx, mut rx) = ring::ring::<Counted>(8);
    for i in 0..5 {
        assert!(
            tx.push(Counted(Arc::clone(&drops))).is_ok(),
            "a ring of 8 slots refused item {i} ({SEE})"
        );
    }
    drop(rx.pop());
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "a popped item is the caller's, dropped once ({SEE})"
    );
    drop((tx, rx));
    assert_eq!(
        drops.load(Ordering::SeqCst),
        5,
        "the four items left in the ring must be dropped with it, once each ({SEE})"
    );
}

/// Opens a connection and sends `GET /sleep/MS` on it.
fn send_sleep(server: &Server, ms: u64) -> Client {
    let mut client = server.connect();
    client.send(format!("GET /sleep/{ms} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    client
}

/// Reads one answer to a `GET` within 10 s, or fails saying `what` and what the server logged.
#[track_caller]
fn answer(server: &Server, client: &mut Client, what: &str) -> Response {
    client
        .read_response(false, Duration::from_secs(10))
        .unwrap_or_else(|err| {
            panic!(
                "{what}: no answer: {err}; server stderr:\n{}",
                server.stderr_tail(10)
            )
        })
}

#[test]
fn a_full_ring_makes_the_worker_wait_and_drops_no_answer() {
    // Rings of two slots: each worker can leave one answer at a time; quick jobs on two
    // workers fill them faster than one turn of the loop may empty them.
    let server = Server::start(
        BIN,
        &[
            "--workers",
            "2",
            "--max-queue",
            "100",
            "--ring-capacity",
            "2",
        ],
    );
    for round in 0..5 {
        let mut slow: Vec<Client> = (0..40).map(|_| send_sleep(&server, 1)).collect();
        for (i, client) in slow.iter_mut().enumerate() {
            let response = answer(
                &server,
                client,
                &format!(
                    "round {round}, slow request {} with --ring-capacity 2",
                    i + 1
                ),
            );
            assert_eq!(
                response.status,
                200,
                "round {round}, slow request {}: a full ring must make the worker wait, not \
                 lose the answer ({SEE})",
                i + 1
            );
        }
    }
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn sleep_no_longer_stalls_other_clients() {
    let server = Server::start(BIN, &[]);
    let mut slow = send_sleep(&server, 1500);
    thread::sleep(Duration::from_millis(200)); // a worker has it by now
    let asked = Instant::now();
    let quick = server.get("/");
    let waited = asked.elapsed();
    assert_eq!(quick.status, 200);
    assert!(
        waited < Duration::from_millis(700),
        "a quick request was answered after {waited:?}, while /sleep/1500 ran: the slow \
         request is not off the loop"
    );
    assert_eq!(answer(&server, &mut slow, "/sleep/1500").status, 200);
}

#[test]
fn threads_are_one_plus_workers() {
    let server = Server::start(BIN, &["--workers", "3"]);
    assert_eq!(threads(server.pid), 4, "the loop and 3 workers, at start");
    let mut slow: Vec<Client> = (0..6).map(|_| send_sleep(&server, 300)).collect();
    assert_eq!(server.get("/").status, 200);
    assert_eq!(threads(server.pid), 4, "with slow requests out");
    for (i, client) in slow.iter_mut().enumerate() {
        let what = format!("slow request {}", i + 1);
        assert_eq!(answer(&server, client, &what).status, 200);
    }
    assert_eq!(threads(server.pid), 4, "after the load");
}

#[test]
fn a_reused_descriptor_never_gets_a_stale_answer() {
    let server = Server::start(BIN, &[]);
    let before: Vec<i32> = sockets(server.pid).into_iter().map(|(fd, _)| fd).collect();
    let mut leaving = server.connect();
    leaving.send(b"GET /sleep/1500 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let mut fd = -1;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let new = sockets(server.pid)
                .into_iter()
                .map(|(fd, _)| fd)
                .find(|n| !before.contains(n));
            fd = new.unwrap_or(-1);
            new.is_some()
        }),
        "the server did not take the connection"
    );
    thread::sleep(Duration::from_millis(100)); // its job is with a worker
    leaving.reset();
    assert!(
        wait_until(Duration::from_millis(700), || !sockets(server.pid)
            .iter()
            .any(|&(n, _)| n == fd)),
        "the server kept descriptor {fd} of a client that reset its connection mid-job"
    );
    let asked = Instant::now();
    let mut next = server.connect();
    next.send(b"HEAD /sleep/2000 HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = next
        .read_response(true, Duration::from_secs(10))
        .expect("the next client's answer");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("Connection"),
        Some("keep-alive"),
        "the next client got an answer that closes: the one meant for the client that left"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(1950),
        "HEAD /sleep/2000 was answered early: with the answer meant for the client that left"
    );
}
