//! Step 7 on mio: the same server as `step07-epoll`, written on the portable layer tokio stands
//! on (`Poll`, `Registry`, `Token`, `Interest`, `Events`). On Linux, mio *is* epoll underneath:
//! `diff src/main.rs src/bin/step07-mio.rs` shows what it hides and what it does not.
//!
//! It hides the system calls and their flags, and it works the same on kqueue (BSD, macOS) and
//! IOCP (Windows). It does not hide the model: mio is always edge-triggered, so every read and
//! write must go on until `WouldBlock`, exactly as `--edge` does in the epoll binary; and the
//! connections still need their own state machine (`conn.rs`, shared with that binary) and
//! their own deadlines. What changes: a connection is named by a `Token` we choose (an index in
//! our table), not by its descriptor.
//!
//! Run it:
//!
//! ```text
//! cargo run -p step07-epoll --bin step07-mio
//! strace -f -e trace=epoll_ctl,epoll_wait -p PID   # mio's calls: epoll, edge-triggered
//! ```

#[path = "../conn.rs"]
mod conn;
#[path = "../http.rs"]
mod http;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use conn::{Connection, Progress};
use plumbing::{Reserve, set_fd_limit};

/// `eprintln!` that never panics. Logging must never be fatal, and `eprintln!` panics when the
/// write fails: with stderr piped into `head -1`, say, once `head` has left (`EPIPE`). A log
/// line that cannot be written is dropped.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

// After the macro, which it uses.
#[path = "../plumbing.rs"]
mod plumbing;

/// The listener's token: one no connection can have.
const LISTENER: Token = Token(usize::MAX);

fn main() -> anyhow::Result<()> {
    // ANCHOR: setup
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_secs);
    set_fd_limit(args.max_fds)?;
    let listener =
        TcpListener::bind(&args.addr).with_context(|| format!("cannot listen on {}", args.addr))?;
    // Non-blocking: `accept` with nobody waiting fails with `WouldBlock` instead of sleeping.
    listener
        .set_nonblocking(true)
        .context("cannot make the listener non-blocking")?;
    let mut reserve = Reserve::open()?;
    announce(&listener)?;
    // ANCHOR_END: setup

    // ANCHOR: event_loop
    // The same loop as the epoll binary's, in mio's words.
    let mut poll = Poll::new().context("Poll::new")?;
    // `SourceFd` registers any descriptor: our sockets stay std's, so that `conn.rs` is the
    // very file the epoll binary uses.
    poll.registry()
        .register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )
        .context("registering the listener")?;
    let mut table = Table::default();
    let mut timers = Timers::default();
    let mut again: Vec<Token> = Vec::new(); // yielded last turn: more to do at once
    let mut events = Events::with_capacity(1024);
    loop {
        // ANCHOR: wait
        let sleep = if again.is_empty() {
            timers.sleep(Instant::now())
        } else {
            Some(Duration::ZERO)
        };
        // mio passes EINTR up too, as `Interrupted`: go round.
        match poll.poll(&mut events, sleep) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err).context("poll"),
        }
        // ANCHOR_END: wait
        let mut due = std::mem::take(&mut again);
        for event in &events {
            if event.token() == LISTENER {
                let registry = poll.registry();
                accept_all(
                    &listener,
                    &mut reserve,
                    registry,
                    &mut table,
                    &mut due,
                    timeout,
                );
            } else {
                due.push(event.token());
            }
        }
        let now = Instant::now();
        timers.expire(now, &mut table, &mut due);
        // A connection may be due twice (an event, a timer, a turn left over): once is enough.
        due.sort_unstable();
        due.dedup();
        for token in due {
            serve(
                token,
                now,
                poll.registry(),
                &mut table,
                &mut timers,
                &mut again,
            );
        }
    }
    // ANCHOR_END: event_loop
}

// ANCHOR: serve
/// Gives connection `token` its turn, then brings its deadline up to date. Nothing to tell the
/// kernel: mio registered it for reading and writing, edge-triggered, once and for all.
fn serve(
    token: Token,
    now: Instant,
    registry: &Registry,
    table: &mut Table,
    timers: &mut Timers,
    again: &mut Vec<Token>,
) {
    let Some(slot) = table.get_mut(token) else {
        return; // closed earlier in this same turn
    };
    match slot.conn.drive(now) {
        Progress::Blocked => {}
        Progress::Yielded => again.push(token),
        Progress::Closed(why) => {
            if let Some(err) = why {
                log!("{}: {err}", slot.conn.peer);
            }
            // mio asks for a source to be deregistered before it is closed (on other systems
            // closing does not do it for us); on Linux that is one epoll_ctl(DEL).
            let _ = registry.deregister(&mut SourceFd(&slot.conn.stream.as_raw_fd()));
            table.remove(token);
            return;
        }
    }
    timers.follow(token, slot);
}
// ANCHOR_END: serve

// ANCHOR: table
/// A connection in the table, with what the timers hold of it.
struct Slot {
    conn: Connection,
    /// Which connection this is: a token is reused as soon as its connection is closed.
    generation: u64,
    /// The time of its live entry in the timer heap, if it has one.
    timer: Option<Instant>,
}

/// The connections, indexed by their token, which we choose: the index of a free place in the
/// table (a slab), rather than the descriptor number the epoll binary uses.
#[derive(Default)]
struct Table {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    generations: u64,
}

impl Table {
    /// Takes a free place and returns its token.
    fn insert(&mut self, conn: Connection) -> Token {
        self.generations += 1;
        let slot = Some(Slot {
            conn,
            generation: self.generations,
            timer: None,
        });
        match self.free.pop() {
            Some(at) => {
                self.slots[at] = slot;
                Token(at)
            }
            None => {
                self.slots.push(slot);
                Token(self.slots.len() - 1)
            }
        }
    }

    fn get_mut(&mut self, token: Token) -> Option<&mut Slot> {
        self.slots.get_mut(token.0)?.as_mut()
    }

    /// Drops the connection, which closes its socket, and frees its place.
    fn remove(&mut self, token: Token) {
        if let Some(slot) = self.slots.get_mut(token.0)
            && slot.take().is_some()
        {
            self.free.push(token.0);
        }
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}
// ANCHOR_END: table

// ANCHOR: timers
/// The deadlines, earliest first, as in the epoll binary (where the comments explain them).
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    /// How long `poll` may sleep: until the earliest entry, or without end. (mio rounds a
    /// timeout up to whole milliseconds itself.)
    fn sleep(&self, now: Instant) -> Option<Duration> {
        let Reverse((at, _, _)) = self.heap.peek()?;
        Some(at.saturating_duration_since(now))
    }

    fn follow(&mut self, token: Token, slot: &mut Slot) {
        let deadline = slot.conn.deadline();
        if slot.timer.is_none_or(|at| deadline < at) {
            self.heap
                .push(Reverse((deadline, token.0, slot.generation)));
            slot.timer = Some(deadline);
        }
    }

    fn expire(&mut self, now: Instant, table: &mut Table, due: &mut Vec<Token>) {
        while let Some(&Reverse((at, index, generation))) = self.heap.peek() {
            if at > now {
                break;
            }
            self.heap.pop();
            let token = Token(index);
            let Some(slot) = table.get_mut(token) else {
                continue; // closed since
            };
            if slot.generation != generation || slot.timer != Some(at) {
                continue; // another connection in that place now, or a superseded entry
            }
            slot.timer = None;
            if slot.conn.deadline() <= now {
                due.push(token);
            } else {
                self.follow(token, slot);
            }
        }
        if self.heap.len() > 2 * table.len() + 1024 {
            self.rebuild(table);
        }
    }

    fn rebuild(&mut self, table: &Table) {
        self.heap.retain(|&Reverse((at, index, generation))| {
            let slot = table.slots.get(index).and_then(Option::as_ref);
            slot.is_some_and(|slot| slot.generation == generation && slot.timer == Some(at))
        });
    }
}
// ANCHOR_END: timers

// ANCHOR: accept_all
/// Accepts every client waiting in the listen queue, until `accept` says `WouldBlock`, and
/// registers each with mio for reading and writing. Each gets a turn at once.
fn accept_all(
    listener: &TcpListener,
    reserve: &mut Reserve,
    registry: &Registry,
    table: &mut Table,
    due: &mut Vec<Token>,
    timeout: Duration,
) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return, // nobody waits
            Err(err) => match reserve.accept_failed(listener, err) {
                Some(accepted) => accepted, // taken with the spare descriptor: serve it
                None => return,
            },
        };
        // An accepted socket does not inherit the listener's non-blocking mode on Linux.
        if let Err(err) = stream.set_nonblocking(true) {
            log!("{peer}: cannot make the socket non-blocking: {err}");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let token = table.insert(Connection::new(stream, peer, Instant::now(), timeout));
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(err) = registry.register(&mut SourceFd(&fd), token, interest) {
            log!("{peer}: cannot register with mio: {err}");
            table.remove(token); // closes it
            continue;
        }
        due.push(token);
    }
}
// ANCHOR_END: accept_all

// ANCHOR: args
/// Step 7 on mio: an HTTP server whose one thread sleeps in mio's Poll until sockets are ready.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on; port 0 picks a free port
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// Close a connection that has not sent a whole request head for this many seconds
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout_secs: u64,
    /// Set the soft limit on open descriptors (RLIMIT_NOFILE) to N [default: the hard limit]
    #[arg(long, value_name = "N")]
    max_fds: Option<u64>,
}
// ANCHOR_END: args

/// Prints the banner that tests and the benchmark read, then hints for a human.
fn announce(listener: &TcpListener) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("getsockname")?;
    let pid = std::process::id();
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on http://{addr} (pid {pid})")?;
    stdout.flush()?;
    log!(
        "try:   curl -v http://{addr}/   (then hold a connection open with: nc {} {})",
        addr.ip(),
        addr.port()
    );
    log!("watch: lsof -p {pid}   strace -c -p {pid}   grep VmRSS /proc/{pid}/status");
    Ok(())
}
