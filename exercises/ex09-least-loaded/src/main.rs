//! # Exercise: `--balance least`
//!
//! This crate is a copy of `step09-multi-reactor` (Step 9). The task (the book, chapter "Step 9",
//! section "Exercises"):
//!
//! `--balance handoff` deals connections to the loops in turn, whatever each loop holds: if the
//! connections of loop 0 all close while those of loop 1 stay, loop 0 still gets only every
//! second new one. `--balance least` is accepted already, and does the same as `handoff`. Make
//! it hand each new connection to the loop that holds the fewest connections at that moment
//! (counting those handed over and not yet taken). The acceptor cannot look into the loops'
//! tables, which belong to their threads: the loops must tell it, through something they share.
//!
//! The place to start is marked `EXERCISE`. Check your work from the workspace root with
//! `./exercises/check ex09-least-loaded`: it runs the contract every server keeps and this
//! exercise's own claims, and says which still fail. The reference solution is `solution.patch`
//! beside this crate: try first.
//!
//! What follows is step09-multi-reactor's own description.
//!
//! Step 9: one event loop per core, all on one port. Step 7's loop, N times over.
//!
//! One loop runs on one thread, and one thread runs on one core at a time: once that core is
//! busy, step 7 can serve no more, however many cores sit idle beside it. So this step starts
//! N loops (`--threads N`, default: the cores this process may use), each a whole step-7 loop
//! with its own `epoll` instance, its own table and its own timers, on a thread of its own
//! (muduo's "one loop per thread"). The loops share nothing but the port, so the new question
//! is only how a new connection finds its loop. Two answers, chosen with `--balance`:
//!
//! - `reuseport` (the default): every loop has a listening socket of its own, all bound to the
//!   same address with `SO_REUSEPORT`, and the kernel spreads the incoming connections over
//!   them by a hash of each connection's addresses and ports. Nobody hands anything over.
//! - `handoff`: one listening socket, and an acceptor thread that accepts and passes each new
//!   connection to the next loop in turn, through a queue and an `eventfd` that wakes that
//!   loop's `epoll_wait` (muduo's main reactor and sub reactors).
//!
//! With `--pin`, each loop is kept to one core (`sched_setaffinity`), so that its connections'
//! data stays in that core's caches. `conn.rs` and `http.rs` are step 7's, unchanged, and so
//! are the functions that serve a connection, the table and the timers.
//!
//! Cost: N threads, and with `handoff` one more, plus a lock and a wake-up per handed-over
//! connection. A slow request (`/sleep/MS`) still stalls every connection of its own loop,
//! though no longer those of the other loops. And the spread is blind: the kernel's hash, or
//! turns, never how busy a loop is.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step09-multi-reactor                   # add -- --balance handoff --pin
//! ps -L -o tid,psr,pcpu,comm -p PID                   # one thread per loop; psr: its core
//! grep Cpus_allowed_list /proc/PID/task/*/status      # with --pin: one core each
//! wrk -t 2 -c 200 -d 5s http://127.0.0.1:8080/        # then top -H -p PID: both loops busy
//! ```

mod conn;
mod http;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nix::errno::Errno;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use nix::unistd::Pid;

use conn::{Connection, Phase, Progress};
use plumbing::{Reserve, refuse, set_fd_limit};

/// `eprintln!` that never panics. Logging must never be fatal, and `eprintln!` panics when the
/// write fails: with stderr piped into `head -1`, say, once `head` has left (`EPIPE`). A log
/// line that cannot be written is dropped.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

// After the macro, which it uses.
mod plumbing;

fn main() -> anyhow::Result<()> {
    // ANCHOR: setup
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_secs);
    set_fd_limit(args.max_fds)?;
    die_with_any_thread();
    let threads = match args.threads {
        Some(n) => usize::from(n),
        // The cores this process may run on: its affinity mask, and its cgroup's CPU quota.
        None => thread::available_parallelism()
            .context("cannot tell how many cores there are: give --threads")?
            .get(),
    };
    let cores = Cores::new(args.pin)?;
    let mode = Mode::from_edge(args.edge);
    // One descriptor kept spare for the whole process: the descriptor table is the process's,
    // shared by all its threads (see plumbing.rs).
    let reserve = Arc::new(Reserve::open()?);
    // ANCHOR_END: setup

    // ANCHOR: spread
    // Everything is opened here, before the banner: listeners, epoll instances, eventfds. Then
    // the loops are started, each on a thread of its own, and the banner tells that all is up.
    match args.balance {
        Balance::Reuseport => {
            // N listening sockets on one port: the kernel picks one for each new connection.
            let listeners = listen_reuseport(&args.addr, threads)?;
            let addr = listeners[0].local_addr().context("getsockname")?;
            let mut loops = Vec::new();
            for listener in listeners {
                let source = Source::Listener(listener, Arc::clone(&reserve));
                loops.push(EventLoop::new(source, mode, timeout)?);
            }
            let first = loops.remove(0); // runs on this, the main, thread: N threads in all
            start(loops, 1, &cores)?;
            cores.pin(Some(0))?;
            announce(addr)?;
            first.run()
        }
        Balance::Handoff | Balance::Least => {
            // One listening socket; this thread accepts, and deals the connections out.
            let listener = TcpListener::bind(&args.addr)
                .with_context(|| format!("cannot listen on {}", args.addr))?;
            let mut loops = Vec::new();
            let mut inboxes = Vec::new();
            for _ in 0..threads {
                let inbox = Arc::new(Inbox::new()?);
                inboxes.push(Arc::clone(&inbox));
                loops.push(EventLoop::new(Source::Inbox(inbox), mode, timeout)?);
            }
            start(loops, 0, &cores)?;
            cores.pin(None)?; // the acceptor may run anywhere
            announce(listener.local_addr().context("getsockname")?)?;
            hand_off(&listener, &reserve, &inboxes)
        }
    }
    // ANCHOR_END: spread
}

// ANCHOR: start
/// Starts each loop on a thread of its own, named `loop-I` (as `top -H` and `ps -L` show
/// it), numbering them from `first`. A thread starts with the CPU affinity of the thread that
/// creates it, so with `--pin` this thread pins itself to a loop's core just before starting
/// that loop: the new thread is on its core from its first instruction.
fn start(loops: Vec<EventLoop>, first: usize, cores: &Cores) -> anyhow::Result<()> {
    for (i, event_loop) in (first..).zip(loops) {
        cores.pin(Some(i))?;
        thread::Builder::new()
            .name(format!("loop-{i}"))
            .spawn(move || {
                // A loop ends only if `epoll_wait` itself fails: then the server is broken.
                if let Err(err) = event_loop.run() {
                    log!("loop {i}: {err:#}; exiting");
                    std::process::exit(1);
                }
            })
            .with_context(|| format!("cannot start the thread of loop {i}"))?;
    }
    Ok(())
}

/// Makes a panic in any thread end the whole process. A loop that died alone would leave a
/// half-dead server: its clients hanging, and (with `SO_REUSEPORT`) its listening socket still
/// open, so that the kernel would go on giving it new clients that nobody accepts. Better
/// that the process dies at once, loudly, and that whoever runs it starts it again.
fn die_with_any_thread() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info); // the usual message, with the thread's name
        std::process::abort();
    }));
}
// ANCHOR_END: start

// ANCHOR: reuseport
/// Binds `count` listening sockets to the same address, each with `SO_REUSEPORT`. Without
/// the option, the second `bind` would fail with `EADDRINUSE`; with it, on every socket
/// before its `bind` (and all of the same user), the kernel keeps them as a group and hands
/// each new connection to one of them, picked by a hash of the connection's two addresses and
/// ports. With port 0 the first picks a free port, and the others join it there.
fn listen_reuseport(addr: &str, count: usize) -> anyhow::Result<Vec<TcpListener>> {
    let mut addr = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} names no address"))?;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let listener = listen_shared(addr).with_context(|| format!("cannot listen on {addr}"))?;
        addr = listener.local_addr().context("getsockname")?; // the port picked, if 0
        listeners.push(listener);
    }
    Ok(listeners)
}

/// One listening socket that others may share its port with: what `TcpListener::bind` does,
/// with `SO_REUSEPORT` set before the `bind`, and non-blocking from the start.
fn listen_shared(addr: SocketAddr) -> nix::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let socket = socket(family, SockType::Stream, flags, None)?;
    // As std does: a restarted server may bind while old connections linger in TIME_WAIT.
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    setsockopt(&socket, sockopt::ReusePort, &true)?;
    bind(socket.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&socket, Backlog::new(128)?)?; // the queue length std's `bind` asks for

    Ok(TcpListener::from(socket))
}
// ANCHOR_END: reuseport

// ANCHOR: handoff
/// The acceptor thread of `--balance handoff`: accepts and deals each connection to the next
/// loop in turn. It does nothing else, so it can simply block in `accept`, and need not
/// watch anything with epoll.
fn hand_off(listener: &TcpListener, reserve: &Reserve, inboxes: &[Arc<Inbox>]) -> ! {
    let mut turn = 0;
    loop {
        // Blocks until a client comes; `None` if that one could not be served.
        if let Some(accepted) = reserve.accept(listener) {
            // EXERCISE: with `--balance least`, the loop that holds the fewest connections.
            inboxes[turn].push(accepted);
            turn = (turn + 1) % inboxes.len();
        }
    }
}

/// Where the acceptor leaves a loop's new connections: a queue, and an `eventfd` that the loop
/// watches in its epoll set. An eventfd is a counter in the kernel that reads as "ready" while
/// it is above zero: writing to it wakes the loop's `epoll_wait`, reading sets it back to zero.
struct Inbox {
    queue: Mutex<Vec<(TcpStream, SocketAddr)>>,
    bell: EventFd,
}

impl Inbox {
    fn new() -> anyhow::Result<Inbox> {
        let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
        Ok(Inbox {
            queue: Mutex::new(Vec::new()),
            bell: EventFd::from_flags(flags).context("eventfd")?,
        })
    }

    /// Queues a connection for the loop, and rings if the queue was empty: otherwise a ring is
    /// already on its way, and the loop will take the whole queue at once.
    fn push(&self, accepted: (TcpStream, SocketAddr)) {
        let was_empty = {
            let mut queue = lock(&self.queue);
            queue.push(accepted);
            queue.len() == 1
        };
        if was_empty && let Err(err) = self.bell.write(1) {
            log!("eventfd write: {err}"); // only if the counter were about to overflow
        }
    }

    /// Takes everything queued, in one go under the lock (the queue swap: one lock per batch,
    /// not per connection). The bell is silenced first, so that a connection pushed after the
    /// swap rings again.
    fn take(&self) -> Vec<(TcpStream, SocketAddr)> {
        let _ = self.bell.read(); // EAGAIN if nobody rang: a spurious wake-up, harmless
        std::mem::take(&mut *lock(&self.queue))
    }
}

/// Locks a mutex. A poisoned one would mean a thread panicked holding it, and a panic ends the
/// process (`die_with_any_thread`), so there is nothing to recover here.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
// ANCHOR_END: handoff

// ANCHOR: pin
/// The cores that `--pin` keeps the loops to: loop I on the I-th core this process may use
/// (in turn, if there are more loops than cores). Without `--pin`, nothing.
struct Cores(Option<Vec<usize>>);

impl Cores {
    fn new(pin: bool) -> anyhow::Result<Cores> {
        if !pin {
            return Ok(Cores(None));
        }
        // The cores this process may use: all of them, unless started under `taskset`.
        let allowed = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let cores = (0..CpuSet::count())
            .filter(|&core| allowed.is_set(core).unwrap_or(false))
            .collect();
        Ok(Cores(Some(cores)))
    }

    /// Keeps the calling thread to the core of loop `i`, or with `None` lets it run on any of
    /// the cores again. Does nothing without `--pin`.
    fn pin(&self, i: Option<usize>) -> anyhow::Result<()> {
        let Some(cores) = &self.0 else { return Ok(()) };
        let mut set = CpuSet::new();
        match i {
            Some(i) => set.set(cores[i % cores.len()])?,
            None => {
                for &core in cores {
                    set.set(core)?;
                }
            }
        }
        // Pid 0: the calling thread. Affinity belongs to a thread, not to the process.
        sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")
    }
}
// ANCHOR_END: pin

// ANCHOR: event_loop
/// One event loop: step 7's, with where its new connections come from.
struct EventLoop {
    epoll: Epoll,
    source: Source,
    mode: Mode,
    timeout: Duration,
}

/// Where a loop's new connections come from.
enum Source {
    /// A listening socket of its own (`--balance reuseport`), accepted from with the process's
    /// spare descriptor to fall back on.
    Listener(TcpListener, Arc<Reserve>),
    /// The acceptor thread's deliveries (`--balance handoff`).
    Inbox(Arc<Inbox>),
}

/// What the loop watches for new connections: the listener, or the inbox's eventfd.
impl AsFd for Source {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Source::Listener(listener, _) => listener.as_fd(),
            Source::Inbox(inbox) => inbox.bell.as_fd(),
        }
    }
}

impl AsRawFd for Source {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl EventLoop {
    /// A new epoll instance, watching the loop's source of new connections.
    fn new(source: Source, mode: Mode, timeout: Duration) -> anyhow::Result<EventLoop> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create1")?;
        epoll
            .add(&source, EpollEvent::new(mode.listener(), token(&source)))
            .context("epoll_ctl(ADD) for the loop's source of connections")?;
        Ok(EventLoop {
            epoll,
            source,
            mode,
            timeout,
        })
    }

    /// Step 7's loop: sleep in `epoll_wait` until the kernel has ready sockets for us or a
    /// deadline comes; then give a turn to those sockets, to the connections whose deadline
    /// has come, and to those that stopped last time with work left. Only the source of new
    /// connections differs.
    fn run(self) -> anyhow::Result<()> {
        let EventLoop {
            epoll,
            source,
            mode,
            timeout,
        } = self;
        let mut table = Table::default();
        let mut timers = Timers::default();
        let mut again: Vec<RawFd> = Vec::new(); // yielded last turn: more to do at once
        let mut events = vec![EpollEvent::empty(); 1024];
        loop {
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
            let mut due = std::mem::take(&mut again);
            let mut new = Vec::new();
            for event in &events[..ready] {
                let fd = RawFd::try_from(event.data()).unwrap_or(-1);
                if fd == source.as_raw_fd() {
                    match &source {
                        Source::Listener(listener, reserve) => {
                            accept_all(listener, reserve, &mut new)
                        }
                        Source::Inbox(inbox) => new.append(&mut inbox.take()),
                    }
                } else {
                    due.push(fd);
                }
            }
            for (stream, peer) in new {
                adopt(stream, peer, &epoll, mode, &mut table, &mut due, timeout);
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
    }
}
// ANCHOR_END: event_loop

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
/// Accepts every client waiting in this loop's listen queue, until `accept` says `WouldBlock`
/// (or one could not be served): an edge-triggered loop hears of the queue only once.
fn accept_all(listener: &TcpListener, reserve: &Reserve, new: &mut Vec<(TcpStream, SocketAddr)>) {
    while let Some(accepted) = reserve.accept(listener) {
        new.push(accepted);
    }
}

/// Makes a new connection this loop's: puts it on the interest list and in the table. It gets
/// a turn at once: its request has often arrived with it.
fn adopt(
    stream: TcpStream,
    peer: SocketAddr,
    epoll: &Epoll,
    mode: Mode,
    table: &mut Table,
    due: &mut Vec<RawFd>,
    timeout: Duration,
) {
    // An accepted socket does not inherit the listener's non-blocking mode on Linux.
    if let Err(err) = stream.set_nonblocking(true) {
        log!("{peer}: cannot make the socket non-blocking: {err}");
        return;
    }
    // Answers are small and written whole: send them at once, without Nagle's wait for
    // the acknowledgement of the previous segment.
    let _ = stream.set_nodelay(true);
    let interest = mode.connection();
    if let Err(err) = epoll.add(&stream, EpollEvent::new(interest, token(&stream))) {
        log!("{peer}: epoll_ctl(ADD): {err}; answering 503");
        refuse(stream, "cannot watch this connection");
        return;
    }
    let fd = stream.as_raw_fd();
    table.insert(
        fd,
        Connection::new(stream, peer, Instant::now(), timeout),
        interest,
    );
    due.push(fd);
}
// ANCHOR_END: accept_all

// ANCHOR: args
/// Step 9: an HTTP server with one epoll loop per core, all on one port.
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
    /// Edge-triggered epoll: report a socket when it becomes ready, not while it is
    #[arg(long)]
    edge: bool,
    // ANCHOR: flags
    /// How many event loops, each on a thread of its own [default: the cores available]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// How new connections are spread over the loops
    #[arg(long, value_enum, default_value_t = Balance::Reuseport)]
    balance: Balance,
    /// Keep each loop's thread to one core (sched_setaffinity), loop I on the I-th core
    #[arg(long)]
    pin: bool,
    // ANCHOR_END: flags
}

/// How a new connection finds its loop.
#[derive(Clone, Copy, ValueEnum)]
enum Balance {
    /// Each loop has its own listening socket on the port (SO_REUSEPORT): the kernel picks
    Reuseport,
    /// One acceptor thread accepts, and hands each connection to the next loop in turn
    Handoff,
    /// As handoff, but each connection goes to the loop that holds the fewest
    Least,
}
// ANCHOR_END: args

/// Prints the banner that tests and the benchmark read, then hints for a human.
fn announce(addr: SocketAddr) -> anyhow::Result<()> {
    let pid = std::process::id();
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on http://{addr} (pid {pid})")?;
    stdout.flush()?;
    log!(
        "try:   curl -v http://{addr}/   (then hold a connection open with: nc {} {})",
        addr.ip(),
        addr.port()
    );
    log!("watch: lsof -p {pid}   ps -L -o tid,psr,pcpu,comm -p {pid}   ls /proc/{pid}/task");
    Ok(())
}
