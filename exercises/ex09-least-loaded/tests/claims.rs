//! What the exercise claims: with `--balance least` and two loops, when the connections of one
//! loop have closed, the next new connections go to that loop until both hold as many; with
//! `--balance handoff` they still go in turn.
//!
//! If this fails, see the book, chapter "Step 9: a loop per core, on one port", section
//! "Exercises".

use std::fs;
use std::thread;
use std::time::Duration;

use testkit::procfs::sockets;
use testkit::{Client, Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_ex09-least-loaded");

/// How many connections each loop holds, fewest first: each loop's epoll instance lists what
/// it watches in `/proc/PID/fdinfo/FD`, one `tfd:` line each, its inbox's eventfd among them.
fn per_loop(pid: i32) -> Vec<usize> {
    let mut counts: Vec<usize> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the server's descriptors")
        .flatten()
        .filter(|entry| {
            fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:[eventpoll]")
        })
        .map(|entry| {
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let text = fs::read_to_string(&info).unwrap_or_default();
            text.lines().filter(|line| line.starts_with("tfd:")).count() - 1
        })
        .collect();
    counts.sort_unstable();
    counts
}

/// Waits until the server holds `n` connections (beside its one listener), and its loops
/// watch them all: the acceptor holds a new connection a moment before the loop it is handed
/// to has taken it from its inbox and added it to its epoll set.
#[track_caller]
fn holds(server: &Server, n: usize) {
    let settled =
        || sockets(server.pid).len() == n + 1 && per_loop(server.pid).iter().sum::<usize>() == n;
    assert!(
        wait_until(Duration::from_secs(5), settled),
        "the server should hold {n} connections, all watched by its loops: sockets {:?}, \
         per loop {:?}",
        sockets(server.pid),
        per_loop(server.pid)
    );
}

/// Four idle connections, two per loop; the first and the third close (with turns, both were
/// loop 0's); two new ones come. Returns how many each loop then holds.
fn spread_after_closing_two(balance: &str) -> Vec<usize> {
    let server = Server::start(
        BIN,
        &[
            "--threads",
            "2",
            "--balance",
            balance,
            "--timeout-secs",
            "60",
        ],
    );
    let mut held: Vec<Option<Client>> = Vec::new();
    for i in 1..=4 {
        held.push(Some(server.connect()));
        holds(&server, i);
    }
    assert_eq!(
        per_loop(server.pid),
        [2, 2],
        "--balance {balance}: 4 connections"
    );
    held[0] = None;
    held[2] = None;
    holds(&server, 2);
    thread::sleep(Duration::from_millis(200)); // the loops have counted what closed
    for i in 3..=4 {
        held.push(Some(server.connect()));
        holds(&server, i);
    }
    per_loop(server.pid)
}

#[test]
fn the_least_loaded_loop_gets_the_new_connections() {
    let spread = spread_after_closing_two("least");
    assert_eq!(
        spread,
        [2, 2],
        "--balance least: after one loop's two connections closed, the next two should both go \
         to it; the loops hold {spread:?} connections"
    );
}

#[test]
fn handoff_still_deals_in_turn() {
    let spread = spread_after_closing_two("handoff");
    assert_eq!(
        spread,
        [1, 3],
        "--balance handoff must still deal in turn: the loops hold {spread:?} connections"
    );
}
