//! The plumbing: the reserve descriptor for when the process runs out, the `503` that goes with
//! it, and the limit on descriptors. The event loops are in main.rs.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{PoisonError, RwLock};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::http::{self, Status};

// ANCHOR: reserve
/// A spare descriptor kept open, so that there is one to give back when the process runs out.
///
/// When every descriptor is taken, Linux's `accept` fails with `EMFILE` at once and leaves the
/// client queued. We close the spare, accept the client with the freed slot, and try to take
/// the spare back first: if that works, descriptors have come back and the client is served
/// like any other; only if it fails is the client answered `503` and closed (libev's and
/// libuv's trick). Either way the queue is emptied, so the loop is not told of the listener
/// again at once: it sleeps instead of spinning.
///
/// With several threads there is a catch: the descriptor table and its limit belong to the
/// process, not to a thread. Between our closing the spare and our `accept`, another loop's
/// `accept` may take the freed slot; then our `accept` fails again, the spare cannot be
/// reopened, and a level-triggered loop would spin on its listener. (nginx's workers are
/// processes, each with a table of its own; libuv keeps a spare per loop and lives with the
/// race.) So the process keeps one spare, and every `accept` takes a lock: shared for an
/// ordinary `accept`, which loops may make at the same time, and exclusive for the trick,
/// during which nobody else accepts. Uncontended, taking it costs an atomic instruction.
pub struct Reserve(RwLock<Option<File>>);

impl Reserve {
    pub fn open() -> anyhow::Result<Reserve> {
        let spare = File::open("/dev/null").context("cannot open the reserve descriptor")?;
        Ok(Reserve(RwLock::new(Some(spare))))
    }

    /// Accepts a client from `listener`. Returns `None` when nobody waits (`WouldBlock`) or when
    /// the client could not be served; then the caller stops accepting for this turn.
    pub fn accept(&self, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        let failed = {
            let _shared = self.0.read().unwrap_or_else(PoisonError::into_inner);
            match listener.accept() {
                Ok(accepted) => return Some(accepted),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return None, // nobody
                Err(err) => err,
            }
        };
        self.accept_failed(listener, failed)
    }

    /// `accept` failed with `err`. Returns a connection to serve if the spare got us one.
    fn accept_failed(
        &self,
        listener: &TcpListener,
        err: io::Error,
    ) -> Option<(TcpStream, SocketAddr)> {
        match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => {
                let mut spare = self.0.write().unwrap_or_else(PoisonError::into_inner);
                return accept_with_spare(&mut spare, listener);
            }
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
}

/// Takes the clients queued while we are out of descriptors, one at a time with the spare's
/// slot: the first for whom the spare can be taken back is served; the others are refused,
/// until the queue is empty (an edge-triggered loop hears of the queue only once). The caller
/// holds the lock exclusively: no other thread accepts meanwhile.
fn accept_with_spare(
    spare: &mut Option<File>,
    listener: &TcpListener,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        *spare = None; // closes the spare: one descriptor is free now
        let accepted = listener.accept();
        *spare = File::open("/dev/null").ok(); // the spare first: is there room again?
        match accepted {
            Ok(accepted) if spare.is_some() => return Some(accepted),
            Ok((stream, _)) => {
                log!("accept: out of file descriptors; answering 503");
                refuse(stream, "out of file descriptors");
                *spare = File::open("/dev/null").ok(); // the refused client's slot
            }
            Err(_) => return None, // the queue is empty (WouldBlock), or the client gone
        }
    }
}
// ANCHOR_END: reserve

// ANCHOR: refuse
/// Answers `503` to a connection we cannot keep, and closes it, without ever waiting: the
/// answer is written if the socket has room (a new socket has), our side is shut (FIN), and
/// what the client has already sent is read and dropped, so that the close is not a reset.
pub fn refuse(mut stream: TcpStream, why: &str) {
    let answer = http::reject(Status::ServiceUnavailable, why);
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&answer.bytes); // best effort
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.read(&mut [0; 4096]);
}
// ANCHOR_END: refuse

// ANCHOR: set_fd_limit
/// Sets the soft limit on open file descriptors: to `max_fds` if given, so that running out is
/// cheap to try, or else up to the hard limit, as servers do.
pub fn set_fd_limit(max_fds: Option<u64>) -> anyhow::Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let soft = max_fds.unwrap_or(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
        .with_context(|| format!("cannot set RLIMIT_NOFILE to {soft} (hard limit {hard})"))
}
// ANCHOR_END: set_fd_limit
