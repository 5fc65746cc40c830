//! Starting a step's binary, finding its port, and making sure it dies with the test.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

use crate::client::{Client, Response};
use crate::procfs::{limit_leaving_room, lowest_free_fd, wait_until};

/// How long a server may take to print its banner.
const BANNER_WITHIN: Duration = Duration::from_secs(10);
/// How long a connection may take to be established.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// A running server, killed (with everything it forked) and reaped when dropped.
pub struct Server {
    /// The server's process id (also its process group id).
    pub pid: i32,
    /// Where it listens, as its banner says.
    pub addr: SocketAddr,
    child: Child,
    banner: String,
    stdout: Captured,
    stderr: Captured,
}

impl Server {
    /// Starts `bin --addr 127.0.0.1:0 ARGS...` and waits (at most 10 s) for its banner, the
    /// first line on stdout: `listening on http://IP:PORT (pid PID)`.
    ///
    /// The server runs in a process group of its own, so that dropping the [`Server`] can kill
    /// whatever it forked too. Its stdout and stderr are read by background threads as they
    /// come, so the server never blocks on a full pipe. Panics, showing stderr, if no valid
    /// banner appears.
    #[track_caller]
    pub fn start(bin: &str, args: &[&str]) -> Server {
        Server::start_wrapped(&[], bin, args)
    }

    /// Like [`Server::start`], but runs the server under a `wrapper` command that ends by
    /// executing it, such as `prlimit --nproc=1` or `setpriv --reuid=...`: since each wrapper
    /// `exec`s the next program, the server keeps the wrapper's pid and process group.
    #[track_caller]
    pub fn start_wrapped(wrapper: &[&str], bin: &str, args: &[&str]) -> Server {
        Server::start_full(wrapper, bin, args, Stderr::Captured)
    }

    /// Like [`Server::start`], but the server's stderr is a pipe whose reader has already left:
    /// every log line it writes fails with `EPIPE`, as it would under `server 2>&1 | head -1`.
    #[track_caller]
    pub fn start_with_stderr_gone(bin: &str, args: &[&str]) -> Server {
        Server::start_full(&[], bin, args, Stderr::Gone)
    }

    #[track_caller]
    fn start_full(wrapper: &[&str], bin: &str, args: &[&str], stderr: Stderr) -> Server {
        let mut all = wrapper.to_vec();
        all.extend_from_slice(&[bin, "--addr", "127.0.0.1:0"]);
        all.extend_from_slice(args);
        let (child, stdout, stderr) = spawn(all[0], &all[1..], stderr);
        let mut server = Server {
            pid: pid_of(&child),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            child,
            banner: String::new(),
            stdout,
            stderr,
        };
        // Until the server is known to be good, `server` owns the child: a panic here drops it,
        // which kills the process group.
        let printed = wait_until(BANNER_WITHIN, || {
            server.stdout.text().contains('\n') || !running(server.pid)
        });
        let text = server.stdout.text();
        let banner = text.lines().next().unwrap_or("").to_string();
        match (printed, parse_banner(&banner)) {
            (true, Some((addr, _pid))) => {
                server.addr = addr;
                server.banner = banner;
                server
            }
            _ => panic!(
                "{bin} {all:?} printed no banner `listening on http://IP:PORT (pid PID)` \
                 within {BANNER_WITHIN:?}; first stdout line: {banner:?}; stderr:\n{}",
                server.stderr_tail(40)
            ),
        }
    }

    /// Starts the server with `--max-fds` set so that exactly `room` descriptors are free
    /// once it is up: a first run finds the lowest free descriptor number of an idle server
    /// (its stdio, listener and spare below it), and the second run gets a limit `room` free
    /// numbers above that (past any descriptor it inherited in between, such as 10).
    #[track_caller]
    pub fn start_with_fd_room(bin: &str, args: &[&str], room: u64) -> Server {
        let first = Server::start(bin, args);
        let base = lowest_free_fd(first.pid);
        let limit = limit_leaving_room(first.pid, room).to_string();
        drop(first);
        let server = Server::start(bin, &[args, &["--max-fds", &limit]].concat());
        assert_eq!(
            lowest_free_fd(server.pid),
            base,
            "the two runs of {bin} opened different descriptors"
        );
        server
    }

    /// Starts the server where it can create no process and no thread: under an `RLIMIT_NPROC`
    /// that its own single task already fills, so every `fork` and every thread spawn fails
    /// with `EAGAIN`. The limit counts the tasks of the real user id, and root (uid 0) is
    /// exempt, so as root the server runs under a user id of its own (`setpriv`), one that no
    /// other process has: a process of another test, or of a person, under the same id would
    /// count against the limit too. Both tools come with util-linux. That user may not be
    /// allowed into the build folder (a checkout under `/root`, say), so it runs a copy of the
    /// binary from a folder of its own in the temporary directory.
    #[track_caller]
    pub fn start_unable_to_spawn(bin: &str, args: &[&str]) -> Server {
        let unable = Unspawnable::new(bin);
        let wrapper: Vec<&str> = unable.wrapper.iter().map(String::as_str).collect();
        Server::start_wrapped(&wrapper, &unable.program, args)
    }

    /// Opens a connection with a tiny receive window and small segments (`SO_RCVBUF` 4 KiB,
    /// `TCP_MAXSEG` 536, set before connecting). On loopback the server's send buffer then
    /// stays small too, so that a client reading a few bytes at a time lets each of the
    /// server's blocked writes make a little progress: the way to test a write deadline.
    #[track_caller]
    pub fn connect_small_window(&self) -> Client {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
        };
        let SocketAddr::V4(addr) = self.addr else {
            panic!("connect_small_window: {} is not IPv4", self.addr)
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket()");
        setsockopt(&fd, sockopt::RcvBuf, &4096).expect("setsockopt(SO_RCVBUF)");
        setsockopt(&fd, sockopt::TcpMaxSeg, &536).expect("setsockopt(TCP_MAXSEG)");
        connect(fd.as_raw_fd(), &SockaddrIn::from(addr))
            .unwrap_or_else(|err| panic!("connecting to {}: {err}", self.addr));
        Client::new(TcpStream::from(fd))
    }

    /// The first line the server printed on stdout.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// Everything the server wrote to stdout so far (the first MiB).
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Everything the server wrote to stderr so far: its hints and its log (the first MiB).
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Whether the server logs `text` on stderr within 5 s. Its output reaches us through a pipe
    /// and a reader thread, so a line written just before an answer may arrive just after it.
    pub fn has_logged(&self, text: &str) -> bool {
        wait_until(Duration::from_secs(5), || self.stderr().contains(text))
    }

    /// The last `lines` lines of [`Server::stderr`], for failure messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = self.stderr();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the server is still running (not exited or killed). It looks without reaping,
    /// so a dead server stays a zombie until dropped and its pid cannot be reused meanwhile.
    pub fn is_alive(&self) -> bool {
        running(self.pid)
    }

    /// Opens a new connection to the server; panics if that takes more than 5 s.
    #[track_caller]
    pub fn connect(&self) -> Client {
        match TcpStream::connect_timeout(&self.addr, CONNECT_WITHIN) {
            Ok(stream) => Client::new(stream),
            Err(err) => panic!("connecting to {}: {err}", self.addr),
        }
    }

    /// Opens a new connection, sends one `GET path`, and returns the answer (within 10 s).
    #[track_caller]
    pub fn get(&self, path: &str) -> Response {
        self.connect().get(path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A negative pid would mean the whole group; `killpg` says it plainly. The group is the
        // server and everything it forked, grandchildren included (unless they left the group).
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = self.child.wait(); // reap it: no zombie left behind
    }
}

/// How to run a program where it can create no process and no thread: under an `RLIMIT_NPROC`
/// that its own single task already fills, so every `fork` and every thread spawn fails with
/// `EAGAIN`. The limit counts the tasks of the real user id, and root (uid 0) is exempt, so as
/// root the program runs under a user id of its own (`setpriv`), one that no other process
/// has: a process of another test, or of a person, under the same id would count against the
/// limit too. Both tools come with util-linux. That user may not be allowed into the build
/// folder (a checkout under `/root`, say), so it runs a copy of the binary from a folder of its
/// own in the temporary directory, removed on drop (a running program keeps its file alive).
struct Unspawnable {
    wrapper: Vec<String>,
    program: String,
    folder: Option<PathBuf>,
}

impl Unspawnable {
    fn new(bin: &str) -> Unspawnable {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if !nix::unistd::geteuid().is_root() {
            return Unspawnable {
                wrapper: vec!["prlimit".into(), "--nproc=0".into()],
                program: bin.into(),
                folder: None,
            };
        }
        // A fresh uid per call: this process's pid, then a count, above the ids people use.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 1000, "unable to spawn: out of fresh user ids");
        let uid = 1_000_000_000 + (std::process::id() % 1_000_000) * 1000 + n;
        let folder = std::env::temp_dir().join(format!("testkit-uid-{uid}"));
        let copy = folder.join("server");
        let world_runnable = std::fs::Permissions::from_mode(0o755);
        std::fs::create_dir_all(&folder)
            .and_then(|()| std::fs::set_permissions(&folder, world_runnable.clone()))
            .and_then(|()| std::fs::copy(bin, &copy))
            .and_then(|_| std::fs::set_permissions(&copy, world_runnable))
            .unwrap_or_else(|err| panic!("copying {bin} to {}: {err}", copy.display()));
        let wrapper = [
            "prlimit",
            "--nproc=1",
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ];
        Unspawnable {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            program: copy.to_string_lossy().into_owned(),
            folder: Some(folder),
        }
    }
}

impl Drop for Unspawnable {
    fn drop(&mut self) {
        if let Some(folder) = &self.folder {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
}

/// Runs `bin ARGS...` to the end (at most `within`) where it can create no process and no
/// thread, as [`Server::start_unable_to_spawn`] does: for servers that must then refuse to start.
pub fn run_unable_to_spawn(bin: &str, args: &[&str], within: Duration) -> Finished {
    let unable = Unspawnable::new(bin);
    let mut all: Vec<&str> = unable.wrapper.iter().map(String::as_str).collect();
    all.push(&unable.program);
    all.extend_from_slice(args);
    run(all[0], &all[1..], within)
}

/// What a finished command did: its exit status and everything it printed.
pub struct Finished {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Runs `bin ARGS...` to the end, at most `within`; panics (after killing it) if it takes longer.
/// Meant for commands that exit by themselves, such as `--help`.
pub fn run(bin: &str, args: &[&str], within: Duration) -> Finished {
    let (mut child, stdout, stderr) = spawn(bin, args, Stderr::Captured);
    let pid = pid_of(&child);
    let exited = wait_until(within, || !running(pid));
    // Whatever is left of its process group goes too; then the pipes reach end-of-file.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let status = child.wait().expect("waitpid");
    assert!(
        exited,
        "{bin} {args:?} did not exit within {within:?}; stderr:\n{}",
        stderr.text()
    );
    wait_until(within, || stdout.is_closed() && stderr.is_closed());
    Finished {
        status,
        stdout: stdout.text(),
        stderr: stderr.text(),
    }
}

/// Whether our child `pid` is still running. `waitid(WNOWAIT)` looks without reaping: a dead
/// child stays a zombie until `Child::wait`, so its pid (and process group id) cannot be reused
/// by another process meanwhile, and `killpg` on it can never hit a stranger.
fn running(pid: i32) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let status = waitid(Id::Pid(Pid::from_raw(pid)), flags);
    matches!(status.expect("waitid on our child"), WaitStatus::StillAlive)
}

/// What becomes of a started program's stderr.
enum Stderr {
    /// Read by a background thread, kept for [`Server::stderr`].
    Captured,
    /// A pipe whose reading end is closed at once: every write to it fails with `EPIPE`.
    Gone,
}

/// Starts `bin` in a process group of its own, with stdin empty and its outputs in pipes.
fn spawn(bin: &str, args: &[&str], stderr: Stderr) -> (Child, Captured, Captured) {
    let mut child = Command::new(bin)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {bin}: {err}"));
    let stdout = Captured::drain(child.stdout.take().expect("stdout is piped"));
    let pipe = child.stderr.take().expect("stderr is piped");
    let stderr = match stderr {
        Stderr::Captured => Captured::drain(pipe),
        Stderr::Gone => Captured::default(), // dropping `pipe` closes our reading end
    };
    (child, stdout, stderr)
}

fn pid_of(child: &Child) -> i32 {
    i32::try_from(child.id()).expect("a pid fits in an i32")
}

/// Parses `listening on http://IP:PORT (pid PID)` into the address and the pid.
pub fn parse_banner(line: &str) -> Option<(SocketAddr, i32)> {
    let rest = line.strip_prefix("listening on http://")?;
    let (addr, rest) = rest.split_once(" (pid ")?;
    let pid = rest.strip_suffix(')')?;
    Some((addr.parse().ok()?, pid.parse().ok()?))
}

/// Keep at most this much of a stream: a server that logs an error per spin of a busy loop
/// writes megabytes a second, and a test should neither hoard it nor print it all.
const KEEP: usize = 1 << 20;

/// The output of a pipe, collected by a background thread until the writer closes it.
#[derive(Default)]
struct Captured {
    shared: Arc<Mutex<Pipe>>,
}

/// What a drain thread has collected so far.
#[derive(Default)]
struct Pipe {
    /// The first [`KEEP`] bytes.
    kept: Vec<u8>,
    /// How many bytes came after those, and were dropped.
    dropped: usize,
    /// Whether the writing end is closed (end-of-file was read).
    closed: bool,
}

impl Captured {
    /// Starts a thread that copies everything from `pipe` into the buffer, then marks it closed.
    fn drain(mut pipe: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let shared = Arc::clone(&captured.shared);
        thread::spawn(move || {
            let mut chunk = [0; 4096];
            loop {
                match pipe.read(&mut chunk) {
                    // End-of-file: every process holding the pipe's write end has exited.
                    Ok(0) => break,
                    Ok(n) => {
                        let mut pipe = lock(&shared);
                        let room = KEEP.saturating_sub(pipe.kept.len()).min(n);
                        pipe.kept.extend_from_slice(&chunk[..room]);
                        pipe.dropped += n - room;
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            lock(&shared).closed = true;
        });
        captured
    }

    fn text(&self) -> String {
        let pipe = lock(&self.shared);
        let mut text = String::from_utf8_lossy(&pipe.kept).into_owned();
        if pipe.dropped > 0 {
            text.push_str(&format!("\n[... {} more bytes not kept]\n", pipe.dropped));
        }
        text
    }

    fn is_closed(&self) -> bool {
        lock(&self.shared).closed
    }
}

/// Locks the buffer; a poisoned lock (a panicking reader thread) still holds valid bytes.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::{children, state};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn drop_kills_the_server_and_what_it_forked() {
        // A stand-in server: a script that forks a child, prints a banner and its args, waits.
        let path = std::env::temp_dir().join(format!("testkit-{}.sh", std::process::id()));
        let script = "#!/bin/sh\nsleep 60 &\n\
                      echo \"listening on http://127.0.0.1:9 (pid $$)\"\n\
                      echo \"args: $*\" >&2\nwait\n";
        std::fs::write(&path, script).expect("write the fake server");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let server = Server::start(path.to_str().expect("a UTF-8 path"), &["--flag"]);
        std::fs::remove_file(&path).expect("remove the fake server");

        assert_eq!(server.addr, SocketAddr::from(([127, 0, 0, 1], 9)));
        assert!(server.is_alive());
        let args = "args: --addr 127.0.0.1:0 --flag";
        assert!(wait_until(BANNER_WITHIN, || server.stderr().contains(args)));
        let mut forked = Vec::new();
        assert!(wait_until(BANNER_WITHIN, || {
            forked = children(server.pid);
            !forked.is_empty()
        }));
        drop(server);
        // Killed, the orphan is gone, or a zombie until init (or a subreaper) reaps it.
        let dead = |pid: i32| matches!(state(pid), None | Some('Z'));
        assert!(wait_until(BANNER_WITHIN, || forked
            .iter()
            .all(|&(pid, _)| dead(pid))));
    }

    #[test]
    fn run_reports_exit_status_and_output() {
        let script = "echo out; echo err >&2; exit 3";
        let finished = run("/bin/sh", &["-c", script], BANNER_WITHIN);
        assert_eq!(finished.status.code(), Some(3));
        let output = (finished.stdout.as_str(), finished.stderr.as_str());
        assert_eq!(output, ("out\n", "err\n"));
    }

    #[test]
    fn parses_the_banner() {
        let (addr, pid) =
            parse_banner("listening on http://127.0.0.1:4321 (pid 99)").expect("a valid banner");
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 4321)));
        assert_eq!(pid, 99);
        assert_eq!(parse_banner("listening on 127.0.0.1:4321"), None);
        let bad_pid = "listening on http://127.0.0.1:4321 (pid x)";
        assert_eq!(parse_banner(bad_pid), None);
    }
}
