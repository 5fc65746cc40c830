//! # Exercise: a lock-free ring per worker
//!
//! This crate is a copy of `step08-reactor-pool` (Step 8). The task (the book, chapter "Step 8",
//! sections "A lock-free ring" and "Exercises"):
//!
//! The workers hand their answers back through one `Vec` behind a `Mutex`, which the loop
//! swaps out whole (`src/pool.rs`). Replace it with one single-producer single-consumer ring
//! per worker, without a lock:
//!
//! 1. In `src/ring.rs`, write `Producer::push` and `Consumer::pop` (marked `EXERCISE`). The
//!    ring has a fixed number of slots, and two positions as `AtomicUsize`: `head`, the next
//!    slot to pop, moved only by the consumer, and `tail`, the next slot to push into, moved
//!    only by the producer. `head == tail` is empty; one slot always stays empty, so that full
//!    (`tail + 1 == head`, around the ring) differs from empty: N slots hold N - 1 items. Each
//!    side loads its own position `Relaxed`, the other's with `Acquire`, and stores its own
//!    with `Release` after it has written (or read) the slot.
//! 2. In `src/pool.rs` (marked `EXERCISE`), give each worker the `Producer` of a ring of its
//!    own and keep the `Consumer`s in the `Pool`: a worker pushes its answer, then rings the
//!    eventfd; on a wake-up the loop reads the eventfd, then empties every ring. A full ring
//!    makes its worker wait (sleep a little and try again): an answer is never dropped.
//! 3. In `src/main.rs`, add `mod ring;` and a flag `--ring-capacity N` (slots per ring, at
//!    least 2, default 64), passed to `Pool::start`.
//!
//! Check your work from the workspace root with `./exercises/check ex08-ring`: it runs the
//! ring's own tests (`tests/claims.rs` includes `src/ring.rs` as it is), the contract every
//! server keeps and this exercise's claims, and says which still fail. The reference solution
//! is `solution.patch` beside this crate: try first.
//!
//! What follows is step08-reactor-pool's own description.
//!
//! Step 8: step 7's loop hands slow work to a pool of worker threads: a reactor and a pool.
//!
//! Step 7's one thread did everything itself, so one `/sleep/1000` stalled every client for a
//! second. Real servers have slow work too (a database, a disk, a computation), and keep it off
//! the loop: the loop does the I/O and the quick answers, and hands slow requests to a fixed
//! pool of worker threads ("a network thread and logic threads, talking through queues").
//! A slow request (`/sleep/MS`, our stand-in) goes out through a bounded queue (`--workers`,
//! `--max-queue`; when it is full the client gets `503` at once). The worker puts its answer on
//! a completion queue and wakes the loop through an `eventfd`, one more descriptor in the epoll
//! set. The loop takes the whole completion queue in one swap under its lock, and gives each
//! answer to its connection, unless that connection has gone: the slot's generation tells a new
//! connection that got the same descriptor number from the one that left. While a connection
//! waits for a worker, nothing more is read from it, so pipelined answers stay in order.
//! `conn.rs` and `http.rs` are step 7's, unchanged: the `Waiting` phase was there, unused.
//!
//! Cost: 1 + `--workers` threads; a lock, an eventfd write and a wake-up per slow answer; and
//! slow work beyond the workers and the queue is refused, not absorbed.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step08-reactor-pool               # add -- --workers 1 --max-queue 1 to see 503s
//! curl http://127.0.0.1:8080/sleep/3000 & curl -v http://127.0.0.1:8080/   # answered at once
//! ps -L -p PID                                   # the loop and its 4 workers
//! ls -l /proc/PID/fd                             # anon_inode:[eventfd] beside [eventpoll]
//! strace -f -e trace=epoll_wait,read,write -p PID   # a worker's write(eventfd), the loop's read
//! ```

mod conn;
mod http;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use conn::{Connection, Phase, Progress};
use plumbing::{Reserve, refuse, set_fd_limit};
use pool::{Finished, Job, Pool};

/// `eprintln!` that never panics. Logging must never be fatal, and `eprintln!` panics when the
/// write fails: with stderr piped into `head -1`, say, once `head` has left (`EPIPE`). A log
/// line that cannot be written is dropped.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

// After the macro, which they use.
mod plumbing;
mod pool;
// EXERCISE: the ring (`src/ring.rs`) is not part of the server yet.

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
    let mut pool = Pool::start(args.workers, args.max_queue)?;
    announce(&listener)?;
    // ANCHOR_END: setup

    // ANCHOR: event_loop
    // The model: sleep in `epoll_wait` until the kernel has ready sockets for us, the workers
    // have answers, or a deadline comes; then give a turn to those sockets, to the connections
    // whose answers are back or whose deadline has come, and to those that stopped last time
    // with work left.
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create1")?;
    let mode = Mode::from_edge(args.edge);
    epoll
        .add(
            &listener,
            EpollEvent::new(mode.listener(), token(&listener)),
        )
        .context("epoll_ctl(ADD) for the listener")?;
    // The workers' bell: readable when answers are back, like a socket with data.
    epoll
        .add(
            pool.bell(),
            EpollEvent::new(mode.listener(), token(pool.bell())),
        )
        .context("epoll_ctl(ADD) for the eventfd")?;
    let mut table = Table::default();
    let mut timers = Timers::default();
    let mut again: Vec<RawFd> = Vec::new(); // yielded last turn: more to do at once
    let mut events = vec![EpollEvent::empty(); 1024];
    loop {
        // ANCHOR: wait
        let sleep = if again.is_empty() {
            timers.sleep(Instant::now())
        } else {
            EpollTimeout::ZERO
        };
        // `epoll_wait` is never restarted after a signal, SA_RESTART or not: EINTR, go round.
        let ready = match epoll.wait(&mut events, sleep) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err).context("epoll_wait"),
        };
        // ANCHOR_END: wait
        let mut due = std::mem::take(&mut again);
        for event in &events[..ready] {
            let fd = RawFd::try_from(event.data()).unwrap_or(-1);
            if fd == listener.as_raw_fd() {
                accept_all(
                    &listener,
                    &mut reserve,
                    &epoll,
                    mode,
                    &mut table,
                    &mut due,
                    timeout,
                );
            } else if fd == pool.bell().as_raw_fd() {
                answers_back(&mut pool, &mut table, &mut due);
            } else if !gone_while_waiting(event, fd, &mut table) {
                due.push(fd);
            }
        }
        let now = Instant::now();
        timers.expire(now, &mut table, &mut due);
        // A connection may be due twice (an event, a timer, a turn left over): once is enough.
        due.sort_unstable();
        due.dedup();
        for fd in due {
            serve(
                fd,
                now,
                &epoll,
                mode,
                &mut table,
                &mut timers,
                &mut again,
                &mut pool,
            );
        }
    }
    // ANCHOR_END: event_loop
}

// ANCHOR: serve
/// Gives connection `fd` its turn, hands a slow request it stopped at to the pool, then brings
/// what the kernel and the timers know of it up to date: its interest (level-triggered only)
/// and its deadline.
#[allow(clippy::too_many_arguments)] // the loop's whole state, passed in the open
fn serve(
    fd: RawFd,
    now: Instant,
    epoll: &Epoll,
    mode: Mode,
    table: &mut Table,
    timers: &mut Timers,
    again: &mut Vec<RawFd>,
    pool: &mut Pool,
) {
    let Some(slot) = table.get_mut(fd) else {
        return; // closed earlier in this same turn
    };
    let mut progress = slot.conn.drive(now);
    // ANCHOR: hand_out
    // The turn stopped at a slow request: it goes to the pool, with the connection's number and
    // generation for the way back, and the connection waits. If the queue is full, the client
    // is told so at once, and the turn goes on to write that.
    if let Some(request) = slot.conn.take_job() {
        let job = Job {
            fd,
            generation: slot.generation,
            request,
        };
        if !pool.submit(job) {
            slot.conn
                .refuse("all workers are busy and the queue is full", now);
            progress = slot.conn.drive(now);
        }
    }
    // ANCHOR_END: hand_out
    let blocked = match progress {
        Progress::Blocked => true,
        Progress::Yielded => {
            again.push(fd);
            false
        }
        Progress::Closed(why) => {
            if let Some(err) = why {
                log!("{}: {err}", slot.conn.peer);
            }
            // Closing the socket also takes it off the interest list: no epoll_ctl(DEL).
            table.remove(fd);
            return;
        }
    };
    // Level-triggered, the interest follows what the connection waits for, but only once it
    // does wait: one that merely used up its turns is driven again next round anyway.
    if matches!(mode, Mode::Level) && blocked {
        // Ask for what the connection waits for now: EPOLLOUT only while an answer is
        // pending. An answer that went out whole in the optimistic write above changed
        // nothing, and costs no epoll_ctl at all.
        let want = Mode::wants(slot.conn.wants());
        if want != slot.interest {
            let mut event = EpollEvent::new(want, token(&slot.conn.stream));
            if let Err(err) = epoll.modify(&slot.conn.stream, &mut event) {
                log!("{}: epoll_ctl(MOD): {err}", slot.conn.peer);
                table.remove(fd);
                return;
            }
            slot.interest = want;
        }
    }
    timers.follow(fd, slot);
}
// ANCHOR_END: serve

// ANCHOR: answers_back
/// The workers rang: gives each answer to its connection, if that connection is still there,
/// and gets it a turn to write the answer.
fn answers_back(pool: &mut Pool, table: &mut Table, due: &mut Vec<RawFd>) {
    let now = Instant::now();
    for Finished {
        fd,
        generation,
        response,
    } in pool.finished()
    {
        match table.get_mut(fd) {
            Some(slot) if slot.generation == generation => {
                slot.conn.finish(response, now);
                due.push(fd);
            }
            // Its client left while the worker worked. The number may already be another
            // connection's (the kernel hands out the lowest free one): the generation tells
            // them apart, and the answer is dropped, never sent to a stranger.
            _ => {}
        }
    }
}

/// A connection waiting for a worker reads nothing, so it cannot notice its client leave; the
/// kernel can. A reset, or a connection shut both ways, is reported as `EPOLLHUP` or
/// `EPOLLERR` whatever we asked for: then it is closed at once, which frees its descriptor
/// number, and the job's answer is dropped when it comes. (A client that only half-closes,
/// with `shutdown(SHUT_WR)` or a plain `close`, looks the same to us as one that still waits
/// for its answer: it keeps its connection, and gets the answer, or a reset when it is sent.)
fn gone_while_waiting(event: &EpollEvent, fd: RawFd, table: &mut Table) -> bool {
    let hung_up = event
        .events()
        .intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
    let Some(slot) = table.get_mut(fd) else {
        return false;
    };
    if !hung_up || slot.conn.wants() != Phase::Waiting {
        return false; // its turn will find out what happened, as in step 7
    }
    log!(
        "{}: gone while a worker has its request; the answer will be dropped",
        slot.conn.peer
    );
    table.remove(fd);
    true
}
// ANCHOR_END: answers_back

// ANCHOR: mode
/// Level- or edge-triggered, and what each asks the kernel for.
#[derive(Clone, Copy)]
enum Mode {
    /// Reported for as long as it is ready: we ask for reading or for writing, as needed.
    Level,
    /// Reported when it becomes ready: we ask for both once, and read and write until
    /// `WouldBlock` every time (a short read or write tells that the buffer ran out).
    Edge,
}

impl Mode {
    fn from_edge(edge: bool) -> Mode {
        if edge { Mode::Edge } else { Mode::Level }
    }

    fn listener(self) -> EpollFlags {
        match self {
            Mode::Level => EpollFlags::EPOLLIN,
            Mode::Edge => EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
        }
    }

    /// What a new connection is registered with.
    fn connection(self) -> EpollFlags {
        match self {
            Mode::Level => EpollFlags::EPOLLIN,
            Mode::Edge => EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET,
        }
    }

    /// Level-triggered interest for a phase.
    fn wants(phase: Phase) -> EpollFlags {
        match phase {
            Phase::Writing => EpollFlags::EPOLLOUT,
            Phase::Reading | Phase::Lingering => EpollFlags::EPOLLIN,
            Phase::Waiting => EpollFlags::empty(), // step 8's: a worker has its request
        }
    }
}

/// What epoll hands back with an event: we register each socket with its own number.
fn token(socket: &impl AsRawFd) -> u64 {
    u64::try_from(socket.as_raw_fd()).unwrap_or(u64::MAX)
}
// ANCHOR_END: mode

// ANCHOR: table
/// A connection in the table, with what the kernel and the timers hold of it.
struct Slot {
    conn: Connection,
    /// Which connection this is: a descriptor number is reused as soon as it is closed.
    generation: u64,
    /// What the interest list holds for it (level-triggered).
    interest: EpollFlags,
    /// The time of its live entry in the timer heap, if it has one.
    timer: Option<Instant>,
}

/// The connections, indexed by descriptor number (libev's `anfd[fd]`): finding the connection
/// of a ready descriptor is one index, and since the kernel always hands out the lowest free
/// number, the table stays as dense as the connections are many.
#[derive(Default)]
struct Table {
    slots: Vec<Option<Slot>>,
    /// How many slots hold a connection: counted, never found by a scan.
    live: usize,
    generations: u64,
}

impl Table {
    fn insert(&mut self, fd: RawFd, conn: Connection, interest: EpollFlags) {
        let Ok(at) = usize::try_from(fd) else { return };
        if self.slots.len() <= at {
            self.slots.resize_with(at + 1, || None);
        }
        self.generations += 1;
        self.live += 1;
        self.slots[at] = Some(Slot {
            conn,
            generation: self.generations,
            interest,
            timer: None,
        });
    }

    fn get_mut(&mut self, fd: RawFd) -> Option<&mut Slot> {
        self.slots.get_mut(usize::try_from(fd).ok()?)?.as_mut()
    }

    /// Drops the connection, which closes its socket.
    fn remove(&mut self, fd: RawFd) {
        let slot = usize::try_from(fd)
            .ok()
            .and_then(|at| self.slots.get_mut(at));
        if slot.and_then(Option::take).is_some() {
            self.live -= 1;
        }
    }
}
// ANCHOR_END: table

// ANCHOR: timers
/// The deadlines, earliest first, so that a wake-up looks only at the connections that are due.
///
/// A deadline moves with every request (the next head's deadline, a new write window). Moving
/// it later costs nothing here: the old entry stays, and when it comes due we find the
/// connection's real deadline later and put it back for then. Only an earlier deadline (a
/// lingering close's second) needs a new entry. Entries of closed connections are dropped when
/// they come due, or all at once when they outnumber the live ones.
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, RawFd, u64)>>,
}

impl Timers {
    /// How long `epoll_wait` may sleep: until the earliest entry, or without end.
    fn sleep(&self, now: Instant) -> EpollTimeout {
        let Some(Reverse((at, _, _))) = self.heap.peek() else {
            return EpollTimeout::NONE;
        };
        // In whole milliseconds, rounded up: waking a moment early would be a turn for nothing.
        let millis = at.saturating_duration_since(now).as_micros().div_ceil(1000);
        EpollTimeout::try_from(millis).unwrap_or(EpollTimeout::MAX)
    }

    /// Makes sure the heap holds an entry for `fd` no later than its deadline. A connection
    /// waiting for a worker has none: its entries are dropped when they come due, and its
    /// answer, when it is back, starts a new deadline.
    fn follow(&mut self, fd: RawFd, slot: &mut Slot) {
        if slot.conn.wants() == Phase::Waiting {
            slot.timer = None;
            return;
        }
        let deadline = slot.conn.deadline();
        if slot.timer.is_none_or(|at| deadline < at) {
            self.heap.push(Reverse((deadline, fd, slot.generation)));
            slot.timer = Some(deadline);
        }
    }

    /// Takes the entries that have come due: connections past their deadline go to `due`;
    /// those whose deadline moved later get an entry for then.
    fn expire(&mut self, now: Instant, table: &mut Table, due: &mut Vec<RawFd>) {
        while let Some(&Reverse((at, fd, generation))) = self.heap.peek() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some(slot) = table.get_mut(fd) else {
                continue; // closed since
            };
            if slot.generation != generation || slot.timer != Some(at) {
                continue; // another connection on that number now, or a superseded entry
            }
            slot.timer = None;
            if slot.conn.deadline() <= now {
                due.push(fd); // its turn will close it, or start its next write window
            } else {
                self.follow(fd, slot);
            }
        }
        if self.heap.len() > 2 * table.live + 1024 {
            self.rebuild(table);
        }
    }

    /// Keeps only the live entries.
    fn rebuild(&mut self, table: &Table) {
        self.heap.retain(|&Reverse((at, fd, generation))| {
            let slot = usize::try_from(fd).ok().and_then(|at| table.slots.get(at));
            slot.and_then(Option::as_ref)
                .is_some_and(|slot| slot.generation == generation && slot.timer == Some(at))
        });
    }
}
// ANCHOR_END: timers

// ANCHOR: accept_all
/// Accepts every client waiting in the listen queue, until `accept` says `WouldBlock`, and
/// puts each on the interest list and in the table. Each gets a turn at once: its request has
/// often arrived with it.
fn accept_all(
    listener: &TcpListener,
    reserve: &mut Reserve,
    epoll: &Epoll,
    mode: Mode,
    table: &mut Table,
    due: &mut Vec<RawFd>,
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
        // Answers are small and written whole: send them at once, without Nagle's wait for
        // the acknowledgement of the previous segment.
        let _ = stream.set_nodelay(true);
        let interest = mode.connection();
        if let Err(err) = epoll.add(&stream, EpollEvent::new(interest, token(&stream))) {
            log!("{peer}: epoll_ctl(ADD): {err}; answering 503");
            refuse(stream, "cannot watch this connection");
            continue;
        }
        let fd = stream.as_raw_fd();
        let mut conn = Connection::new(stream, peer, Instant::now(), timeout);
        conn.offload_slow_work(); // slow requests go to the pool, not on this thread
        table.insert(fd, conn, interest);
        due.push(fd);
    }
}
// ANCHOR_END: accept_all

// ANCHOR: args
/// Step 8: an HTTP server whose event loop hands slow requests to a pool of worker threads.
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
    // ANCHOR: flags
    /// Edge-triggered epoll: report a socket when it becomes ready, not while it is
    #[arg(long)]
    edge: bool,
    /// Worker threads for slow requests (/sleep/MS); quick ones are answered on the loop
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    workers: usize,
    /// Slow requests that may wait for a worker; one more is answered 503 at once
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    max_queue: usize,
    // EXERCISE: --ring-capacity N, slots in each worker's ring of answers.
    // ANCHOR_END: flags
}
// ANCHOR_END: args

/// Prints the banner that tests and the benchmark read, then hints for a human.
fn announce(listener: &TcpListener) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("getsockname")?;
    let pid = std::process::id();
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on http://{addr} (pid {pid})")?;
    stdout.flush()?;
    log!("try:   curl http://{addr}/sleep/3000 & curl -v http://{addr}/   (answered at once)");
    log!("watch: ps -L -p {pid}   lsof -p {pid}   strace -f -p {pid}");
    Ok(())
}
