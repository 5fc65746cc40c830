//! What step 8 claims: a slow request no longer stalls other clients, since it runs on a worker
//! while the loop goes on; the server has 1 + `--workers` threads, before, during and after
//! load; a slow request beyond the workers and the queue gets `503` at once; a client that
//! leaves mid-job never has its answer sent to the next client on the same descriptor number;
//! requests pipelined behind a slow one are answered after it, in order; and the loop sleeps in
//! `epoll_wait` while the workers work. And, as in step 7: idle CPU is zero, a slow reader gets
//! everything while others are served, and running out of descriptors is survived without
//! spinning.
//!
//! Timings are only generous bounds, to tell "blocked" from "served"; every wait is bounded.

use std::thread;
use std::time::{Duration, Instant};

use testkit::contract::HELLO;
use testkit::procfs::{sockets, threads};
use testkit::shared::cpu_in_a_second;
use testkit::{Client, Response, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_step08-reactor-pool");

/// Both trigger modes.
const MODES: [&[&str]; 2] = [&[], &["--edge"]];

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

/// The descriptor numbers of the server's sockets.
fn socket_fds(pid: i32) -> Vec<i32> {
    sockets(pid).into_iter().map(|(fd, _)| fd).collect()
}

#[test]
fn sleep_no_longer_stalls_other_clients() {
    for args in MODES {
        let server = Server::start(BIN, args);
        let started = Instant::now();
        let mut slow = send_sleep(&server, 1500);
        thread::sleep(Duration::from_millis(200)); // a worker has it by now
        let asked = Instant::now();
        let quick = server.get("/");
        let waited = asked.elapsed();
        assert_eq!(quick.status, 200);
        assert!(
            waited < Duration::from_millis(700),
            "{args:?}: a quick request on another connection was answered after {waited:?}, \
             while /sleep/1500 ran: the slow request is not off the loop"
        );
        let response = answer(&server, &mut slow, "/sleep/1500");
        assert_eq!(response.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(1450));
    }
}

#[test]
fn threads_are_one_plus_workers_before_during_and_after_load() {
    for (args, workers) in [(&[][..], 4), (&["--workers", "2"][..], 2)] {
        let server = Server::start(BIN, args);
        let want = 1 + workers;
        assert_eq!(threads(server.pid), want, "{args:?}: at start");
        // Twice as many slow requests as workers (half of them queued), quick ones beside.
        let mut slow: Vec<Client> = (0..2 * workers).map(|_| send_sleep(&server, 600)).collect();
        for _ in 0..10 {
            assert_eq!(server.get("/").status, 200);
        }
        assert_eq!(
            threads(server.pid),
            want,
            "{args:?}: with slow requests out"
        );
        for (i, client) in slow.iter_mut().enumerate() {
            let response = answer(&server, client, &format!("slow request {}", i + 1));
            assert_eq!(response.status, 200);
        }
        assert_eq!(threads(server.pid), want, "{args:?}: after the load");
    }
}

#[test]
fn slow_request_beyond_workers_and_queue_gets_503_at_once() {
    let server = Server::start(BIN, &["--workers", "1", "--max-queue", "1"]);
    let mut first = send_sleep(&server, 1500);
    thread::sleep(Duration::from_millis(200)); // the worker has taken it: the queue is empty
    let mut second = send_sleep(&server, 1500);
    thread::sleep(Duration::from_millis(200)); // it waits in the queue
    let asked = Instant::now();
    let mut third = send_sleep(&server, 1500);
    let refused = answer(&server, &mut third, "the third slow request");
    let took = asked.elapsed();
    assert_eq!(
        refused.status, 503,
        "with the one worker busy and one request queued, a third slow request must be refused"
    );
    assert!(
        took < Duration::from_millis(700),
        "the 503 came after {took:?}, not at once"
    );
    assert!(
        third.closed_within(Duration::from_secs(5)),
        "the connection stays open after its 503"
    );
    assert_eq!(server.get("/").status, 200, "a quick request meanwhile");
    for (client, what) in [(&mut first, "the first"), (&mut second, "the second")] {
        let response = answer(&server, client, what);
        assert_eq!(response.status, 200, "{what} slow request");
    }
}

#[test]
fn a_reused_descriptor_never_gets_a_stale_answer() {
    for args in MODES {
        let server = Server::start(BIN, args);
        let before = socket_fds(server.pid);
        // The client that leaves asks to close after its answer: if that answer ever reached
        // the next client, it would say `Connection: close` and come too early.
        let mut leaving = server.connect();
        leaving.send(b"GET /sleep/1500 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        let mut fd = -1;
        assert!(
            wait_until(Duration::from_secs(5), || {
                let new = socket_fds(server.pid)
                    .into_iter()
                    .find(|n| !before.contains(n));
                fd = new.unwrap_or(-1);
                new.is_some()
            }),
            "{args:?}: the server did not take the connection"
        );
        thread::sleep(Duration::from_millis(100)); // its job is with a worker
        leaving.reset();
        // Well before the job ends: the server closes the connection while the job runs.
        assert!(
            wait_until(Duration::from_millis(700), || !socket_fds(server.pid)
                .contains(&fd)),
            "{args:?}: the server kept descriptor {fd} of a client that reset its connection \
             while its job ran; stderr:\n{}",
            server.stderr_tail(10)
        );
        let asked = Instant::now();
        let mut next = server.connect();
        next.send(b"HEAD /sleep/2000 HTTP/1.1\r\nHost: test\r\n\r\n");
        assert!(
            wait_until(Duration::from_secs(5), || socket_fds(server.pid)
                .contains(&fd)),
            "{args:?}: the next client did not get descriptor {fd} (the lowest free one): \
             sockets {:?}",
            socket_fds(server.pid)
        );
        let response = next
            .read_response(true, Duration::from_secs(10))
            .expect("the next client's answer");
        let took = asked.elapsed();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("Connection"),
            Some("keep-alive"),
            "{args:?}: the next client on descriptor {fd} got an answer that closes: the one \
             meant for the client that left"
        );
        assert!(
            took >= Duration::from_millis(1950),
            "{args:?}: HEAD /sleep/2000 on descriptor {fd} was answered after {took:?}: with \
             the answer meant for the client that left"
        );
        // Nothing else came with it: the next answer on the connection is exactly its own.
        let hello = next.get("/");
        assert_eq!((hello.status, &hello.body[..]), (200, HELLO));
    }
}

#[test]
fn pipelined_requests_wait_behind_a_slow_one() {
    for args in MODES {
        let server = Server::start(BIN, args);
        let mut client = server.connect();
        let paths = ["/sleep/300", "/bytes/5", "/sleep/100", "/bytes/7"];
        let batch: String = paths
            .iter()
            .map(|path| format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
            .collect();
        client.send(batch.as_bytes()); // one write: all four arrive together
        for (path, length) in paths.iter().zip([HELLO.len(), 5, HELLO.len(), 7]) {
            let response = answer(&server, &mut client, path);
            assert_eq!(response.status, 200, "{args:?}: {path}");
            assert_eq!(
                response.body.len(),
                length,
                "{args:?}: the answer to {path} is not next: answers out of order"
            );
        }
    }
}

#[test]
fn half_closed_slow_request_still_answered() {
    let server = Server::start(BIN, &[]);
    let mut client = send_sleep(&server, 300);
    client.shutdown_write();
    let response = answer(&server, &mut client, "/sleep/300 then shutdown(SHUT_WR)");
    assert_eq!((response.status, &response.body[..]), (200, HELLO));
    assert!(client.closed_within(Duration::from_secs(5)));
}

#[test]
fn the_loop_sleeps_while_idle_and_while_workers_work() {
    // Head deadlines of 1 s, shorter than the jobs: a connection waiting for a worker must
    // neither be closed at its deadline nor make the loop spin on it.
    let server = Server::start(BIN, &["--timeout-secs", "1"]);
    let idle = cpu_in_a_second(&server);
    assert!(
        idle < Duration::from_millis(50),
        "idle, the server burnt {idle:?} of CPU in 1 s"
    );
    let mut slow: Vec<Client> = (0..4).map(|_| send_sleep(&server, 3000)).collect();
    thread::sleep(Duration::from_millis(300)); // the four workers have them
    let busy = cpu_in_a_second(&server) + cpu_in_a_second(&server);
    assert!(
        busy < Duration::from_millis(150),
        "with four /sleep/3000 out with the workers, the server burnt {busy:?} of CPU in 2 s: \
         the loop does not sleep while it waits for them"
    );
    for (i, client) in slow.iter_mut().enumerate() {
        let response = answer(&server, client, &format!("slow request {}", i + 1));
        assert_eq!(response.status, 200);
    }
}

#[test]
fn slow_reader_gets_everything_while_others_are_served() {
    for args in MODES {
        testkit::shared::slow_reader_gets_everything_while_others_are_served(BIN, args);
    }
}

#[test]
fn out_of_fds_until_clients_leave() {
    for args in MODES {
        testkit::shared::out_of_fds_until_clients_leave(BIN, args);
    }
}

#[test]
fn queued_clients_refused_when_out_of_fds() {
    for args in MODES {
        testkit::shared::queued_clients_refused_when_out_of_fds(BIN, args);
    }
}
