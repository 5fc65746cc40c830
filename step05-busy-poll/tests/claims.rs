//! What step 5 claims: one thread serves many clients; it never sleeps, so it burns a core even
//! idle; a slow request stalls everybody; a slow reader does not.
//!
//! The busy-poll servers these tests start each burn a core, so the tests take turns (one lock)
//! rather than fight over the machine's cores; timings are only generous bounds.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use testkit::procfs::threads;
use testkit::shared::cpu_in_a_second;
use testkit::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_step05-busy-poll");

/// One busy-poll server at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn one_thread_answers_200_keep_alive_clients() {
    let _turn = one_at_a_time();
    let server = Server::start(BIN, &[]);
    let mut clients: Vec<Client> = (0..200).map(|_| server.connect()).collect();
    for client in &mut clients {
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let response = client
            .read_response(false, Duration::from_secs(10))
            .unwrap_or_else(|err| panic!("client {i}: {err}"));
        assert_eq!(response.status, 200);
        assert_eq!(response.header("Connection"), Some("keep-alive"));
    }
    assert_eq!(threads(server.pid), 1, "all of them, by one thread");
}

#[test]
fn idle_it_burns_a_core() {
    let _turn = one_at_a_time();
    let server = Server::start(BIN, &[]);
    let burnt = cpu_in_a_second(&server);
    assert!(
        burnt >= Duration::from_millis(500),
        "with no client at all, the busy loop burnt only {burnt:?} of CPU in a second"
    );
}

#[test]
fn sleep_stalls_everybody() {
    let _turn = one_at_a_time();
    testkit::shared::sleep_stalls_everybody(BIN, &[]);
}

#[test]
fn slow_reader_gets_everything_while_others_are_served() {
    let _turn = one_at_a_time();
    testkit::shared::slow_reader_gets_everything_while_others_are_served(BIN, &[]);
}

#[test]
fn out_of_fds_until_clients_leave() {
    let _turn = one_at_a_time();
    testkit::shared::out_of_fds_until_clients_leave(BIN, &[]);
}

#[test]
fn queued_clients_refused_when_out_of_fds() {
    let _turn = one_at_a_time();
    testkit::shared::queued_clients_refused_when_out_of_fds(BIN, &[]);
}
