//! Starting the servers, and making sure they die.
//!
//! Each server runs in a process group of its own; dropping a [`Server`] kills the whole group
//! (the fork step's children, nginx's worker) and reaps every process of it. The bench is a
//! child subreaper (see `main`), so the children of a killed server are re-parented to the
//! bench rather than to init, and reaped here too. Should the bench itself be killed outright,
//! each server gets `SIGKILL` from the kernel (`PR_SET_PDEATHSIG`).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::stop;

/// How long a server may take to start listening.
const START_WITHIN: Duration = Duration::from_secs(10);
/// How long the processes of a killed group may take to die.
const DIE_WITHIN: Duration = Duration::from_secs(20);

/// A folder of our own in the temporary directory, for the servers' output and nginx's
/// configuration; removed on drop.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A program the bench started: killed, with everything it forked, and reaped when dropped.
pub struct Process {
    /// Its process id, which is also its process group id.
    pub pid: i32,
    child: Child,
    stderr: PathBuf,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    /// Its process id, which is also its process group id.
    pub pid: i32,
    /// Kept for its `Drop`: the server dies with this value.
    _process: Process,
}

impl Server {
    /// Starts a step: `bin --addr 127.0.0.1:0 ARGS...`, and reads the port from its first line,
    /// `listening on http://IP:PORT (pid PID)`.
    pub fn start_step(bin: &Path, args: &[String], scratch: &Scratch) -> Result<Server> {
        let name = file_name(bin);
        let stdout = scratch.path().join(format!("{name}.out"));
        let mut command = Command::new(bin);
        command.arg("--addr").arg("127.0.0.1:0").args(args);
        let mut process = Process::spawn(&mut command, &stdout)?;
        let deadline = Instant::now() + START_WITHIN;
        loop {
            let text = fs::read_to_string(&stdout).unwrap_or_default();
            if let Some((line, _)) = text.split_once('\n') {
                let addr = parse_banner(line).with_context(|| {
                    format!("{name} printed {line:?}, not `listening on http://IP:PORT (pid PID)`")
                })?;
                return Ok(Server::new(addr, process));
            }
            process.wait_a_little(&name, deadline)?;
        }
    }

    /// Starts nginx with one worker, answering every request with `200 Hello, world!`, on a
    /// configuration written to the scratch folder.
    pub fn start_nginx(nginx: &Path, scratch: &Scratch) -> Result<Server> {
        let dir = scratch.path().join("nginx");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // nginx takes no port 0: find a free port, and give it that (nobody else takes it in
        // the moment between, on a machine where only the bench opens ports).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("finding a free port for nginx")?
            .port();
        let config = dir.join("nginx.conf");
        fs::write(&config, nginx_config(&dir, port))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut command = Command::new(nginx);
        command.arg("-p").arg(&dir).arg("-c").arg(&config);
        command.arg("-e").arg(dir.join("error.log"));
        let stdout = dir.join("stdout");
        let mut process = Process::spawn(&mut command, &stdout)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_WITHIN;
        while !answers(addr) {
            process.wait_a_little("nginx", deadline)?;
        }
        Ok(Server::new(addr, process))
    }

    fn new(addr: SocketAddr, process: Process) -> Server {
        Server {
            addr,
            pid: process.pid,
            _process: process,
        }
    }
}

impl Process {
    /// Starts `command` in a process group of its own, output to `stdout` and a file beside
    /// it (a pipe nobody reads would block a chatty server).
    pub fn spawn(command: &mut Command, stdout: &Path) -> Result<Process> {
        let stderr = stdout.with_extension("err");
        let create = |path: &Path| {
            File::create(path).with_context(|| format!("creating {}", path.display()))
        };
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(create(stdout)?)
            .stderr(create(&stderr)?);
        // The kernel sends it when the *thread* that forked ends: servers are started from
        // the main thread only.
        let die_with_us =
            || nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes one `prctl` system call and allocates
        // nothing.
        unsafe { command.pre_exec(die_with_us) };
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Process {
            pid: i32::try_from(child.id()).context("a pid that fits an i32")?,
            child,
            stderr,
        })
    }

    /// Sleeps a moment while a server starts; fails if it died, or took too long.
    fn wait_a_little(&mut self, name: &str, deadline: Instant) -> Result<()> {
        if let Some(status) = self.wait_until(Instant::now() + Duration::from_millis(5))? {
            bail!(
                "{name} exited ({status}) before listening:\n{}",
                self.stderr_tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not listen within {START_WITHIN:?}:\n{}",
                self.stderr_tail()
            );
        }
        Ok(())
    }

    /// Waits for the program to exit, until `deadline` at most (or Ctrl-C): its exit status
    /// if it exited. It is reaped only when dropped.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            stop::check()?;
            if let Some(status) = self.child.try_wait().context("waitpid")? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last lines the program wrote on stderr.
    pub fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = self.child.wait();
        reap_group(self.pid);
    }
}

/// Reaps what is left of group `pgid`: the processes a killed server had forked, which the
/// kernel re-parents to us. Gives up after [`DIE_WITHIN`] (a process stuck in the kernel).
fn reap_group(pgid: i32) {
    let deadline = Instant::now() + DIE_WITHIN;
    // A negative pid asks for any child of that process group.
    let group = Pid::from_raw(-pgid);
    while Instant::now() < deadline {
        match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
            // Killed, but not dead yet: `SIGKILL` takes effect when each process next runs.
            Ok(WaitStatus::StillAlive) => thread::sleep(Duration::from_millis(1)),
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD: no child of ours is left in the group.
            Err(_) => break,
        }
    }
}

/// Whether a server answers at `addr`. The probe asks it to close the connection and waits
/// until it has, so that it leaves no descriptor behind in the server to be counted later.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    let mut answer = Vec::new();
    stream.set_read_timeout(Some(START_WITHIN)).is_ok()
        && stream.write_all(request).is_ok()
        && stream.read_to_end(&mut answer).is_ok()
        && answer.starts_with(b"HTTP/1.1 200")
}

/// The name of a binary, from its path.
pub fn file_name(bin: &Path) -> String {
    bin.file_name().map_or_else(
        || bin.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// Parses `listening on http://IP:PORT (pid PID)` into the address.
fn parse_banner(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("listening on http://")?;
    let (addr, _) = rest.split_once(" (pid ")?;
    addr.parse().ok()
}

/// nginx with one worker and the same answer as our servers. No access log (our servers log
/// nothing per request either), keep-alive without limit (nginx closes after 1000 requests by
/// default; our servers never do), idle timeouts long enough for the idle-connection load, and
/// every path under `dir`, so that nginx writes nothing elsewhere, even when not run as root.
fn nginx_config(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 \"Hello, world!\\n\"; }}
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_banner() {
        let addr = parse_banner("listening on http://127.0.0.1:4321 (pid 99)");
        assert_eq!(addr, Some(SocketAddr::from(([127, 0, 0, 1], 4321))));
        assert_eq!(parse_banner("listening on 127.0.0.1:4321"), None);
    }

    #[test]
    fn a_killed_server_is_reaped_with_what_it_forked() {
        let scratch = Scratch::new().expect("scratch folder");
        let script = scratch.path().join("fake-server");
        // A stand-in server that forks a child, then prints its banner and waits.
        let text =
            "#!/bin/sh\nsleep 60 &\necho \"listening on http://127.0.0.1:9 (pid $$)\"\nwait\n";
        fs::write(&script, text).expect("write the fake server");
        let run = |mode| std::os::unix::fs::PermissionsExt::from_mode(mode);
        fs::set_permissions(&script, run(0o755)).expect("chmod");
        nix::sys::prctl::set_child_subreaper(true).expect("subreaper");
        let server = Server::start_step(&script, &[], &scratch).expect("start");
        assert_eq!(server.addr.port(), 9);
        let pgid = server.pid;
        let deadline = Instant::now() + START_WITHIN;
        while crate::procfs::group(pgid).len() < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            crate::procfs::group(pgid).len(),
            2,
            "the server and its child"
        );
        drop(server);
        assert_eq!(
            crate::procfs::group(pgid),
            Vec::<i32>::new(),
            "none left, not even a zombie"
        );
    }
}
