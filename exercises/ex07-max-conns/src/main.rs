//! # Exercise: `--max-conns N`
//!
//! This crate is a copy of `step07-epoll` (Step 7). The task (the book, chapter "Step 7",
//! section "Exercises"):
//!
//! Add a flag `--max-conns N`: the server holds at most N connections. One more is answered
//! `503` and closed at once, without ever being added to the interest list or the table, and the
//! server goes on serving the N it holds. The table knows how many it holds.
//!
//! The place to start is marked `EXERCISE`. Check your work from the workspace root with
//! `./exercises/check ex07-max-conns`: it runs the contract every server keeps and this exercise's own
//! claims, and says which still fail. The reference solution is `solution.patch` beside this
//! crate: try first.
//!
//! What follows is step07-epoll's own description.
//!
//! Step 7: the loop of step 6 on `epoll(7)`: the kernel keeps the list, and answers with the
//! ready ones only.
//!
//! `select` made us hand the kernel every descriptor on every call, and both sides scanned them
//! all. `epoll` splits that in two. The *interest list* lives in the kernel: `epoll_ctl` adds a
//! socket once, when it is accepted, and changes it only when what we wait for changes. And the
//! kernel keeps a *ready list*: a socket that becomes ready puts itself on it, and `epoll_wait`
//! just hands us that list. A wake-up costs O(ready), not O(watched): ten thousand idle clients
//! cost nothing while they are idle. Connections live in a table indexed by their descriptor
//! (libev's `anfd[fd]`: the kernel hands out the lowest free number, so the table stays dense).
//! Deadlines are kept in a heap, earliest first, so that no wake-up scans the connections
//! either. `conn.rs` and `http.rs` are step 6's, unchanged.
//!
//! Level-triggered by default: `epoll_wait` reports a socket for as long as it is ready, and we
//! ask for `EPOLLOUT` only while an answer is waiting to be written. With `--edge`, it reports a
//! socket only when it *becomes* ready, so every read and write must go on until the kernel says
//! `WouldBlock`, or the connection is never reported again.
//!
//! Cost: one thread still; a slow request (`/sleep/MS`) stalls everybody, as in steps 5 and 6.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step07-epoll                      # add -- --edge for edge-triggered
//! wrk -c 1000 -d 5s http://127.0.0.1:8080/       # a thousand clients, one thread
//! strace -c -p PID                               # per request: one read, one write
//! ls -l /proc/PID/fd; cat /proc/PID/fdinfo/5    # fd 5, anon_inode:[eventpoll]: the interest list
//! ```

mod conn;
mod http;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use conn::{Connection, Phase, Progress};
use http::Status;

/// `eprintln!` that never panics. Logging must never be fatal, and `eprintln!` panics when the
/// write fails: with stderr piped into `head -1`, say, once `head` has left (`EPIPE`). A log
/// line that cannot be written is dropped.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

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
    // The model: sleep in `epoll_wait` until the kernel has ready sockets for us or a deadline
    // comes; then give a turn to those sockets, to the connections whose deadline has come, and
    // to those that stopped last time with work left.
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create1")?;
    let mode = Mode::from_edge(args.edge);
    epoll
        .add(
            &listener,
            EpollEvent::new(mode.listener(), token(&listener)),
        )
        .context("epoll_ctl(ADD) for the listener")?;
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
            } else {
                due.push(fd);
            }
        }
        let now = Instant::now();
        timers.expire(now, &mut table, &mut due);
        // A connection may be due twice (an event, a timer, a turn left over): once is enough.
        due.sort_unstable();
        due.dedup();
        for fd in due {
            serve(fd, now, &epoll, mode, &mut table, &mut timers, &mut again);
        }
    }
    // ANCHOR_END: event_loop
}

// ANCHOR: serve
/// Gives connection `fd` its turn, then brings what the kernel and the timers know of it up to
/// date: its interest (level-triggered only) and its deadline.
fn serve(
    fd: RawFd,
    now: Instant,
    epoll: &Epoll,
    mode: Mode,
    table: &mut Table,
    timers: &mut Timers,
    again: &mut Vec<RawFd>,
) {
    let Some(slot) = table.get_mut(fd) else {
        return; // closed earlier in this same turn
    };
    let blocked = match slot.conn.drive(now) {
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

    /// Makes sure the heap holds an entry for `fd` no later than its deadline.
    fn follow(&mut self, fd: RawFd, slot: &mut Slot) {
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
        // EXERCISE: refuse with 503 beyond `--max-conns` connections.
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
        table.insert(
            fd,
            Connection::new(stream, peer, Instant::now(), timeout),
            interest,
        );
        due.push(fd);
    }
}
// ANCHOR_END: accept_all

// ANCHOR: reserve
/// A spare descriptor kept open, so that there is one to give back when the process runs out.
///
/// When every descriptor is taken, Linux's `accept` fails with `EMFILE` at once and leaves the
/// client queued. We close the spare, accept the client with the freed slot, and try to take
/// the spare back first: if that works, descriptors have come back and the client is served
/// like any other; only if it fails is the client answered `503` and closed (libev's and
/// libuv's trick). Either way the queue is emptied, so `epoll_wait` does not report the
/// listener ready again at once: the loop sleeps instead of spinning.
struct Reserve(Option<File>);

impl Reserve {
    fn open() -> anyhow::Result<Reserve> {
        let spare = File::open("/dev/null").context("cannot open the reserve descriptor")?;
        Ok(Reserve(Some(spare)))
    }

    /// `accept` failed with `err`. Returns a connection to serve if the spare got us one.
    fn accept_failed(
        &mut self,
        listener: &TcpListener,
        err: io::Error,
    ) -> Option<(TcpStream, SocketAddr)> {
        match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => return self.accept_with_spare(listener),
            // The kernel is short of memory for sockets: give it a moment rather than spin.
            Some(libc::ENOBUFS | libc::ENOMEM) => {
                log!("accept: {err}; pausing 100 ms");
                thread::sleep(Duration::from_millis(100));
            }
            // Anything else concerns that one connection (say, reset while it was queued).
            _ => log!("accept: {err}"),
        }
        None
    }

    /// Takes the clients queued while we are out of descriptors, one at a time with the spare's
    /// slot: the first for whom the spare can be taken back is served; the others are refused,
    /// until the queue is empty (an edge-triggered loop hears of the queue only once).
    fn accept_with_spare(&mut self, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        loop {
            self.0 = None; // closes the spare: one descriptor is free now
            let accepted = listener.accept();
            self.0 = File::open("/dev/null").ok(); // the spare first: is there room again?
            match accepted {
                Ok(accepted) if self.0.is_some() => return Some(accepted),
                Ok((stream, _)) => {
                    log!("accept: out of file descriptors; answering 503");
                    refuse(stream, "out of file descriptors");
                    self.0 = File::open("/dev/null").ok(); // the refused client's slot
                }
                Err(_) => return None, // the queue is empty (WouldBlock), or the client gone
            }
        }
    }
}
// ANCHOR_END: reserve

// ANCHOR: refuse
/// Answers `503` to a connection we cannot keep, and closes it, without ever waiting: the
/// answer is written if the socket has room (a new socket has), our side is shut (FIN), and
/// what the client has already sent is read and dropped, so that the close is not a reset.
fn refuse(mut stream: TcpStream, why: &str) {
    let answer = http::reject(Status::ServiceUnavailable, why);
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&answer.bytes); // best effort
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.read(&mut [0; 4096]);
}
// ANCHOR_END: refuse

// ANCHOR: args
/// Step 7: an HTTP server whose one thread sleeps in epoll_wait(2) until sockets are ready.
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
    // ANCHOR_END: flags
}
// ANCHOR_END: args

// ANCHOR: set_fd_limit
/// Sets the soft limit on open file descriptors: to `max_fds` if given, so that running out is
/// cheap to try, or else up to the hard limit, as servers do.
fn set_fd_limit(max_fds: Option<u64>) -> anyhow::Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let soft = max_fds.unwrap_or(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
        .with_context(|| format!("cannot set RLIMIT_NOFILE to {soft} (hard limit {hard})"))
}
// ANCHOR_END: set_fd_limit

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
