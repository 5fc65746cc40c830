//! The load generator: a closed loop over N connections, on a few threads, each thread one
//! event loop (mio, so epoll underneath: the client side of step 7's lesson).
//!
//! Closed loop: each connection has one request outstanding (or `pipeline` of them) and sends
//! the next as soon as an answer arrives, so the rate is what the server sustains at that
//! concurrency. Every answer is checked ([`crate::http::parse`]); every failure is counted by
//! kind and the connection replaced.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::http::{self, ErrorKind, Errors, Parsed};
use crate::stop;

/// How a connection is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Keep-alive: request after request on one connection, `pipeline` of them outstanding.
    KeepAlive { pipeline: usize },
    /// A new connection for every request (`Connection: close`).
    PerRequest,
}

/// One load: who, how many connections, how, and for how long.
#[derive(Clone, Debug)]
pub struct Spec {
    pub addr: SocketAddr,
    pub connections: usize,
    pub threads: usize,
    pub reuse: Reuse,
    /// Every this many requests, one is `/sleep/100` instead of `/`.
    pub slow_every: Option<u64>,
    /// Answers that arrive before this much time has passed are not counted (connections are
    /// being opened and the server is warming up); errors are.
    pub warmup: Duration,
    /// How long answers are counted, after the warm-up.
    pub duration: Duration,
    /// A request unanswered for this long is a timeout; its connection is replaced.
    pub timeout: Duration,
}

/// What a load measured.
pub struct Outcome {
    /// Latency of the answers to `/`, in microseconds.
    pub fast: Histogram<u64>,
    /// Latency of the answers to `/sleep/100`, in microseconds.
    pub slow: Histogram<u64>,
    pub errors: Errors,
    /// How long answers were counted.
    pub window: Duration,
}

impl Outcome {
    fn empty(window: Duration) -> Result<Outcome> {
        Ok(Outcome {
            fast: latency_histogram()?,
            slow: latency_histogram()?,
            errors: Errors::default(),
            window,
        })
    }

    fn merge(&mut self, other: &Outcome) -> Result<()> {
        self.fast.add(&other.fast).context("merging histograms")?;
        self.slow.add(&other.slow).context("merging histograms")?;
        self.errors.merge(&other.errors);
        Ok(())
    }

    /// Good answers counted, fast and slow.
    pub fn answers(&self) -> u64 {
        self.fast.len() + self.slow.len()
    }

    /// Good answers per second.
    pub fn rate(&self) -> f64 {
        self.answers() as f64 / self.window.as_secs_f64()
    }
}

/// Latencies from 1 µs to a minute, to three significant digits.
fn latency_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a latency histogram")
}

/// Runs the load to its end (or until Ctrl-C) and returns what it measured.
pub fn run(spec: &Spec) -> Result<Outcome> {
    let threads = spec.threads.clamp(1, spec.connections.max(1));
    let start = Start {
        begun: Instant::now(),
        total: spec.connections,
        answered: AtomicUsize::new(0),
        ready: OnceLock::new(),
    };
    let requests = Requests::new(spec);
    let outcomes: Vec<Result<Outcome>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                // Connections t, t + threads, t + 2 * threads, ...: shares differ by one at most.
                let share =
                    spec.connections / threads + usize::from(t < spec.connections % threads);
                let (requests, start) = (&requests, &start);
                scope.spawn(move || Worker::new(spec, share, requests, start)?.run())
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a load thread panicked")))
            })
            .collect()
    });
    stop::check()?;
    let mut total = Outcome::empty(spec.duration)?;
    for outcome in outcomes {
        total.merge(&outcome?)?;
    }
    Ok(total)
}

/// When answers count, and when the load ends.
#[derive(Clone, Copy)]
struct Clock {
    counted_from: Instant,
    until: Instant,
}

/// The start of a load, shared by its threads. The warm-up begins once every connection has
/// had an answer: a thousand connections take a while to be accepted, and a second more when
/// the server's accept queue (128 long) overflowed and the kernel dropped a handshake, to be
/// retried a second later. If they have not all been answered within the timeout, the load goes
/// on with those that have.
struct Start {
    begun: Instant,
    total: usize,
    /// Connections (slots) that have had an answer.
    answered: AtomicUsize,
    ready: OnceLock<Instant>,
}

impl Start {
    /// The clock, once every connection is up (or the timeout has passed).
    fn clock(&self, spec: &Spec, now: Instant) -> Option<Clock> {
        let ready = match self.ready.get() {
            Some(&ready) => ready,
            None if self.answered.load(Ordering::Relaxed) >= self.total
                || now - self.begun >= spec.timeout =>
            {
                *self.ready.get_or_init(|| now)
            }
            None => return None,
        };
        let counted_from = ready + spec.warmup;
        Some(Clock {
            counted_from,
            until: counted_from + spec.duration,
        })
    }
}

/// The bytes of the requests, built once.
struct Requests {
    fast: Vec<u8>,
    slow: Vec<u8>,
}

impl Requests {
    fn new(spec: &Spec) -> Requests {
        let close = match spec.reuse {
            Reuse::KeepAlive { .. } => "",
            Reuse::PerRequest => "Connection: close\r\n",
        };
        let request =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{close}\r\n", spec.addr);
        Requests {
            fast: request("/").into_bytes(),
            slow: request("/sleep/100").into_bytes(),
        }
    }
}

/// A request sent and not yet answered.
#[derive(Clone, Copy)]
struct Sent {
    at: Instant,
    slow: bool,
}

/// One client connection and where it stands.
#[derive(Default)]
struct Conn {
    stream: Option<TcpStream>,
    /// Whether the TCP handshake is done (a non-blocking `connect` finishes later).
    connected: bool,
    /// When the connection was opened, for the connect timeout.
    opened: Option<Instant>,
    /// Bytes received and not yet parsed.
    input: Vec<u8>,
    /// Bytes to send, and how many of them are sent.
    output: Vec<u8>,
    written: usize,
    inflight: VecDeque<Sent>,
    /// The server said `Connection: close`: send nothing more, reconnect once answered.
    closing: bool,
    /// After a failure, when to open the connection again.
    retry_at: Option<Instant>,
    /// Whether this connection has had an answer yet; and whether any connection in this
    /// slot ever had one.
    answered: bool,
    ever_answered: bool,
}

/// Closed connections are replaced after this pause, so that a refusing server is not
/// hammered in a tight loop.
const RETRY_AFTER: Duration = Duration::from_millis(10);
/// The longest the loop sleeps in `poll`: how often timeouts, retries and Ctrl-C are checked.
const TICK: Duration = Duration::from_millis(20);
/// At most this many new connections per thread waiting for their first answer: opening a
/// thousand connections at once would overflow the server's accept queue (128 long). A
/// connection that has been answered has been accepted.
const MAX_CONNECTING: usize = 50;

/// One thread's event loop over its share of the connections.
struct Worker<'a> {
    spec: &'a Spec,
    requests: &'a Requests,
    start: &'a Start,
    /// Known once every connection is up.
    clock: Option<Clock>,
    poll: Poll,
    conns: Vec<Conn>,
    /// New connections waiting for their first answer, and those waiting for their turn to
    /// open.
    connecting: usize,
    waiting: VecDeque<usize>,
    /// Requests issued by this thread, to pick every `slow_every`-th one.
    issued: u64,
    outcome: Outcome,
}

impl<'a> Worker<'a> {
    fn new(spec: &'a Spec, share: usize, requests: &'a Requests, start: &'a Start) -> Result<Self> {
        Ok(Worker {
            spec,
            requests,
            start,
            clock: None,
            poll: Poll::new().context("creating a poll instance")?,
            conns: (0..share).map(|_| Conn::default()).collect(),
            connecting: 0,
            waiting: VecDeque::new(),
            issued: 0,
            outcome: Outcome::empty(spec.duration)?,
        })
    }

    fn run(mut self) -> Result<Outcome> {
        let mut events = Events::with_capacity(1024);
        for i in 0..self.conns.len() {
            self.open(i, Instant::now());
        }
        let mut last_check = Instant::now();
        loop {
            let now = Instant::now();
            if self.clock.is_none() {
                self.clock = self.start.clock(self.spec, now);
            }
            let until = self.clock.map(|clock| clock.until);
            if until.is_some_and(|until| now >= until) || stop::requested() {
                break;
            }
            let wait = until.map_or(TICK, |until| TICK.min(until - now));
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("poll"),
            }
            for event in &events {
                self.on_event(event.token().0);
            }
            while self.connecting < MAX_CONNECTING {
                let Some(i) = self.waiting.pop_front() else {
                    break;
                };
                self.connect(i, Instant::now());
            }
            let now = Instant::now();
            if now - last_check >= TICK {
                self.check_timers(now);
                last_check = now;
            }
        }
        // Requests that had waited past the timeout when the load ended failed too (as of the
        // end, so that they are counted).
        if let Some(clock) = self.clock {
            self.check_timers(clock.until);
        }
        Ok(self.outcome)
    }

    /// Opens connection `i` (again), now or once fewer handshakes are under way.
    fn open(&mut self, i: usize, now: Instant) {
        self.close(i);
        if self.connecting >= MAX_CONNECTING {
            self.waiting.push_back(i);
        } else {
            self.connect(i, now);
        }
    }

    /// Closes connection `i` and forgets its state.
    fn close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.stream.is_some() && !conn.answered {
            self.connecting -= 1;
        }
        conn.reset();
    }

    /// Starts connecting `i`, and queues its first request(s): they go out once it connects.
    fn connect(&mut self, i: usize, now: Instant) {
        let mut stream = match TcpStream::connect(self.spec.addr) {
            Ok(stream) => stream,
            Err(err) => return self.fail(i, ErrorKind::of(&err)),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(err) = self
            .poll
            .registry()
            .register(&mut stream, Token(i), interest)
        {
            return self.fail(i, ErrorKind::of(&err));
        }
        self.connecting += 1;
        let conn = &mut self.conns[i];
        conn.stream = Some(stream);
        conn.opened = Some(now);
        let depth = match self.spec.reuse {
            Reuse::KeepAlive { pipeline } => pipeline.max(1),
            Reuse::PerRequest => 1,
        };
        for _ in 0..depth {
            self.queue(i, now);
        }
    }

    /// Adds one request to connection `i`'s output.
    fn queue(&mut self, i: usize, now: Instant) {
        self.issued += 1;
        let slow = self
            .spec
            .slow_every
            .is_some_and(|every| self.issued % every == 0);
        let bytes = if slow {
            &self.requests.slow
        } else {
            &self.requests.fast
        };
        let conn = &mut self.conns[i];
        conn.output.extend_from_slice(bytes);
        conn.inflight.push_back(Sent { at: now, slow });
    }

    fn on_event(&mut self, i: usize) {
        if self.conns[i].stream.is_none() {
            return; // an event for a connection closed earlier in this batch
        }
        if !self.conns[i].connected {
            match self.conns[i].handshake() {
                Ok(true) => self.conns[i].connected = true,
                Ok(false) => return,
                Err(kind) => return self.fail(i, kind),
            }
        }
        // mio is edge-triggered: try both directions, each until `WouldBlock`.
        if let Err(kind) = self.conns[i].flush() {
            return self.fail(i, kind);
        }
        self.receive(i);
    }

    /// Reads what connection `i` has, and handles every whole answer in it.
    fn receive(&mut self, i: usize) {
        let mut chunk = [0; 16 * 1024];
        let mut ended = false;
        let conn = &mut self.conns[i];
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        loop {
            match stream.read(&mut chunk) {
                // Zero bytes: the server closed its side; no more answers will come.
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return self.fail(i, ErrorKind::of(&err)),
            }
        }
        let now = Instant::now();
        loop {
            let conn = &mut self.conns[i];
            match http::parse(&conn.input) {
                Parsed::Partial => break,
                Parsed::Unframed(kind) => return self.fail(i, kind),
                Parsed::Complete {
                    len,
                    verdict,
                    close,
                } => {
                    conn.input.drain(..len);
                    conn.closing |= close;
                    if !conn.answered {
                        conn.answered = true;
                        self.connecting -= 1;
                        if !conn.ever_answered {
                            conn.ever_answered = true;
                            self.start.answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let Some(sent) = conn.inflight.pop_front() else {
                        // An answer to nothing we asked.
                        return self.fail(i, ErrorKind::Malformed);
                    };
                    self.answered(sent, verdict, now);
                    if self.next(i, now) {
                        return;
                    }
                }
            }
        }
        if ended {
            let conn = &self.conns[i];
            // After `Connection: close`, the end is expected, even with requests pipelined.
            if conn.closing && conn.input.is_empty() {
                self.open(i, now);
            } else {
                let kind = http::cut_short(&conn.input);
                self.fail(i, kind);
            }
        }
    }

    /// After an answer on connection `i`: send the next request, or replace the connection.
    /// Returns whether the connection was replaced or closed (then stop reading it).
    fn next(&mut self, i: usize, now: Instant) -> bool {
        if self.spec.reuse == Reuse::PerRequest {
            self.open(i, now);
            return true;
        }
        if self.conns[i].closing {
            // Requests pipelined after the server said `close` are not answered; that is the
            // protocol, not an error: reconnect once nothing more is awaited.
            if self.conns[i].inflight.is_empty() {
                self.open(i, now);
                return true;
            }
            return false;
        }
        self.queue(i, now);
        if let Err(kind) = self.conns[i].flush() {
            self.fail(i, kind);
            return true;
        }
        false
    }

    /// Records one answer: its latency if it was good and came while answers count.
    fn answered(&mut self, sent: Sent, verdict: Result<(), ErrorKind>, now: Instant) {
        if let Err(kind) = verdict {
            return self.count_error(kind, now);
        }
        let Some(clock) = self.clock else {
            return;
        };
        if now < clock.counted_from || now > clock.until {
            return;
        }
        let micros = u64::try_from((now - sent.at).as_micros()).unwrap_or(u64::MAX);
        let histogram = if sent.slow {
            &mut self.outcome.slow
        } else {
            &mut self.outcome.fast
        };
        histogram.saturating_record(micros.max(1));
    }

    /// Counts an error, unless it came after the end (a connection closed by the end itself).
    fn count_error(&mut self, kind: ErrorKind, now: Instant) {
        if self.clock.is_none_or(|clock| now <= clock.until) {
            self.outcome.errors.add(kind);
        }
    }

    /// Counts a failure of connection `i`, closes it, and opens it again a little later.
    fn fail(&mut self, i: usize, kind: ErrorKind) {
        let now = Instant::now();
        self.count_error(kind, now);
        // Closing the socket also takes it out of the poll set.
        self.close(i);
        self.conns[i].retry_at = Some(now + RETRY_AFTER);
    }

    /// Fails the requests that waited too long, and reopens the connections due for it.
    fn check_timers(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            let conn = &self.conns[i];
            if conn.retry_at.is_some_and(|at| at <= now) {
                if self.clock.is_none_or(|clock| now < clock.until) {
                    self.open(i, now);
                }
                continue;
            }
            let waiting_since = match (conn.connected, conn.inflight.front(), conn.opened) {
                (true, Some(sent), _) => Some(sent.at),
                (false, _, Some(opened)) if conn.stream.is_some() => Some(opened),
                _ => None,
            };
            if waiting_since.is_some_and(|since| now - since >= self.spec.timeout) {
                self.fail(i, ErrorKind::Timeout);
            }
        }
    }
}

impl Conn {
    /// Closes the connection and forgets its state, keeping the buffers' memory.
    fn reset(&mut self) {
        self.stream = None;
        self.connected = false;
        self.opened = None;
        self.input.clear();
        self.output.clear();
        self.written = 0;
        self.inflight.clear();
        self.closing = false;
        self.retry_at = None;
        self.answered = false;
    }

    /// Whether the non-blocking `connect` has finished: `Ok(false)` while it is under way.
    fn handshake(&mut self) -> Result<bool, ErrorKind> {
        let Some(stream) = self.stream.as_ref() else {
            return Ok(false);
        };
        // mio's recipe: a pending socket error means the connect failed; a peer address
        // means it succeeded; `NotConnected` means it is still in progress.
        match stream.take_error() {
            Ok(Some(err)) | Err(err) => return Err(ErrorKind::of(&err)),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(err) => Err(ErrorKind::of(&err)),
        }
    }

    /// Writes as much of the output as the socket takes.
    fn flush(&mut self) -> Result<(), ErrorKind> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        if !self.connected {
            return Ok(()); // sent once the handshake is done
        }
        while self.written < self.output.len() {
            match stream.write(&self.output[self.written..]) {
                Ok(n) => self.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(ErrorKind::of(&err)),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The generator against tiny fake servers, each answering every request the same way.

    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A server on a free port that answers every request on a connection with `answer`, then
    /// closes it (with a reset when `reset`), until dropped.
    struct Fake {
        addr: SocketAddr,
        done: Arc<AtomicBool>,
    }

    impl Fake {
        fn start(answer: &'static [u8], close_after: bool, reset: bool) -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("non-blocking");
            let addr = listener.local_addr().expect("local address");
            let done = Arc::new(AtomicBool::new(false));
            let stop = Arc::clone(&done);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    thread::spawn(move || serve(stream, answer, close_after, reset));
                }
            });
            Fake { addr, done }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.done.store(true, Ordering::Relaxed);
        }
    }

    fn serve(mut stream: std::net::TcpStream, answer: &[u8], close_after: bool, reset: bool) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0; 4096];
        let mut seen = Vec::new();
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                if reset {
                    // SO_LINGER with a zero timeout: close sends RST instead of FIN.
                    let fd = std::os::fd::AsFd::as_fd(&stream);
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    let _ = nix::sys::socket::setsockopt(
                        &fd,
                        nix::sys::socket::sockopt::Linger,
                        &linger,
                    );
                    return;
                }
                if stream.write_all(answer).is_err() || close_after {
                    return;
                }
            }
        }
    }

    fn spec(addr: SocketAddr, reuse: Reuse) -> Spec {
        Spec {
            addr,
            connections: 4,
            threads: 2,
            reuse,
            slow_every: None,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(300),
            // Short: a load whose connections are never answered starts after the timeout.
            timeout: Duration::from_millis(500),
        }
    }

    const GOOD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nHello, world!\n";

    #[test]
    fn good_answers_are_counted_and_timed() {
        let fake = Fake::start(GOOD, false, false);
        let outcome = run(&spec(fake.addr, Reuse::KeepAlive { pipeline: 2 })).expect("run");
        assert_eq!(outcome.errors.total(), 0, "{}", outcome.errors);
        assert!(outcome.fast.len() > 10, "{} answers", outcome.fast.len());
        assert!(outcome.rate() > 0.0);
    }

    #[test]
    fn a_new_connection_per_request_works() {
        let fake = Fake::start(GOOD, true, false);
        let outcome = run(&spec(fake.addr, Reuse::PerRequest)).expect("run");
        assert_eq!(outcome.errors.total(), 0, "{}", outcome.errors);
        assert!(outcome.fast.len() > 10, "{} answers", outcome.fast.len());
    }

    /// Runs a load against a fake that always answers `answer`: no good answer may be
    /// counted, and every error must be of `kind`.
    fn only_errors_of(kind: ErrorKind, answer: &'static [u8], close_after: bool, reset: bool) {
        let fake = Fake::start(answer, close_after, reset);
        let outcome = run(&spec(fake.addr, Reuse::KeepAlive { pipeline: 1 })).expect("run");
        let errors = outcome.errors;
        assert_eq!(outcome.answers(), 0, "no good answer may be counted");
        assert!(errors.count(kind) > 0, "{kind:?} expected, got {errors}");
        assert_eq!(errors.total(), errors.count(kind), "{errors}");
    }

    #[test]
    fn a_short_body_is_counted() {
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nHello";
        only_errors_of(ErrorKind::Short, short, true, false);
    }

    #[test]
    fn a_wrong_length_is_counted() {
        let wrong = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, world!";
        only_errors_of(ErrorKind::Length, wrong, false, false);
    }

    #[test]
    fn a_reset_is_counted() {
        only_errors_of(ErrorKind::Reset, GOOD, false, true);
    }

    #[test]
    fn a_bad_status_is_counted() {
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
        only_errors_of(ErrorKind::Status, busy, false, false);
    }

    #[test]
    fn silence_is_a_timeout() {
        let fake = Fake::start(b"", false, false);
        let mut spec = spec(fake.addr, Reuse::KeepAlive { pipeline: 1 });
        spec.timeout = Duration::from_millis(100);
        let outcome = run(&spec).expect("run");
        assert!(
            outcome.errors.count(ErrorKind::Timeout) >= 4,
            "{}",
            outcome.errors
        );
    }

    #[test]
    fn nobody_listening_is_refused() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let outcome = run(&spec(addr, Reuse::PerRequest)).expect("run");
        assert!(
            outcome.errors.count(ErrorKind::Refused) > 0,
            "{}",
            outcome.errors
        );
    }
}
