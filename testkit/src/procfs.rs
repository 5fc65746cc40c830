//! What Linux tells about a process in `/proc/PID`: the same facts `lsof`, `ps` and `top` show.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// How often [`wait_until`] checks its condition.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// The number of open file descriptors: the entries of `/proc/PID/fd`.
pub fn fd_count(pid: i32) -> usize {
    fds(pid).len()
}

/// The highest open descriptor number. (The next descriptor opened gets the lowest free number,
/// [`lowest_free_fd`], which is below this one whenever there is a gap.)
pub fn max_fd(pid: i32) -> i32 {
    fds(pid).into_iter().max().unwrap_or(-1)
}

/// The lowest descriptor number not open: where the kernel puts the next descriptor this
/// process opens. A soft `RLIMIT_NOFILE` of this number leaves no room for a new one, even if
/// higher numbers are open (a process may inherit descriptors such as 10 or 251 from its parent).
pub fn lowest_free_fd(pid: i32) -> i32 {
    let open = fds(pid);
    (0..)
        .find(|fd| !open.contains(fd))
        .expect("some number is free")
}

/// The soft limit on open descriptors that leaves `pid` exactly `room` free numbers below it:
/// counting up from the lowest free number, and past any open one on the way (a descriptor
/// inherited from the parent, such as 10, takes one of the numbers below a limit).
pub fn limit_leaving_room(pid: i32, room: u64) -> u64 {
    limit_leaving(&fds(pid), room)
}

/// The limit that leaves `room` numbers free below it, with descriptors `open` already open:
/// the number of the free slot after the first `room` free ones.
fn limit_leaving(open: &[i32], room: u64) -> u64 {
    let mut free = 0;
    for number in 0_i32.. {
        if !open.contains(&number) {
            if free == room {
                return u64::try_from(number).expect("counted up from 0");
            }
            free += 1;
        }
    }
    unreachable!("a process has fewer than 2^31 descriptors open")
}

/// The soft and hard limits on open descriptors (`RLIMIT_NOFILE`), from `/proc/PID/limits`.
pub fn fd_limits(pid: i32) -> (u64, u64) {
    let path = format!("/proc/{pid}/limits");
    let limits = fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {path}: {err}"));
    let line = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .unwrap_or_else(|| panic!("no `Max open files` line in {path}"));
    let mut numbers = line
        .split_whitespace()
        .map(|n| n.parse().expect("a number"));
    let soft = numbers.next().expect("a soft limit");
    let hard = numbers.next().expect("a hard limit");
    (soft, hard)
}

/// The descriptors of `pid` that are sockets: (fd number, socket inode).
pub fn sockets(pid: i32) -> Vec<(i32, u64)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return found; // the process is gone
    };
    for entry in entries.flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse().ok());
        let fd = entry.file_name().to_string_lossy().parse().ok();
        if let (Some(fd), Some(inode)) = (fd, inode) {
            found.push((fd, inode));
        }
    }
    found.sort();
    found
}

/// The numbers of the open descriptors, read from `/proc/PID/fd` (one entry per descriptor).
fn fds(pid: i32) -> Vec<i32> {
    let dir = format!("/proc/{pid}/fd");
    fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("reading {dir}: {err}"))
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The number of threads, from the `Threads:` line of `/proc/PID/status`.
pub fn threads(pid: i32) -> usize {
    status_field(pid, "Threads:")
        .parse()
        .expect("Threads: is a number")
}

/// The resident set size in KiB, from the `VmRSS:` line of `/proc/PID/status`.
pub fn rss_kib(pid: i32) -> u64 {
    let value = status_field(pid, "VmRSS:");
    let kib = value.strip_suffix("kB").unwrap_or(&value).trim();
    kib.parse().expect("VmRSS: is a number of kB")
}

/// The pid of the process tracing `pid` (a debugger, `strace`), or 0: `TracerPid:` in
/// `/proc/PID/status`.
pub fn tracer(pid: i32) -> i32 {
    status_field(pid, "TracerPid:")
        .parse()
        .expect("TracerPid: is a number")
}

/// The value after `name` in `/proc/PID/status`, trimmed.
fn status_field(pid: i32, name: &str) -> String {
    field_of(&format!("/proc/{pid}/status"), name)
}

/// The value after `name` in the `status` file at `path`, trimmed.
fn field_of(path: &str, name: &str) -> String {
    let status = fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {path}: {err}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("{path} has no {name} line"))
        .trim()
        .to_string()
}

/// The fields of `/proc/PID/stat` from the third on (state, ppid, ...), or `None` if the process
/// is gone. The second field, the command name in parentheses, may itself contain spaces and
/// parentheses, so the fields start after the *last* `)`.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The state of process `pid` as `ps` shows it (`R` running, `S` sleeping, `Z` zombie, ...),
/// or `None` if there is no such process.
pub fn state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The children of `pid` as (pid, state): `R` running, `S` sleeping, `Z` zombie, and so on.
/// Found by scanning every `/proc/*/stat` for a parent pid of `pid`.
pub fn children(pid: i32) -> Vec<(i32, char)> {
    let entries = fs::read_dir("/proc").expect("reading /proc");
    let mut children: Vec<(i32, char)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|candidate| {
            // A process may exit between the listing and the read: then it is simply skipped.
            let fields = stat_fields(candidate)?;
            let state = fields.first()?.chars().next()?;
            let ppid: i32 = fields.get(1)?.parse().ok()?;
            (ppid == pid).then_some((candidate, state))
        })
        .collect();
    children.sort_unstable();
    children
}

/// The processes of process group `pgid` as (pid, parent pid): a server started by testkit
/// leads a group of its own, and whatever it forks stays in it, even once re-parented.
pub fn group(pgid: i32) -> Vec<(i32, i32)> {
    let entries = fs::read_dir("/proc").expect("reading /proc");
    let mut members: Vec<(i32, i32)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|candidate| {
            let fields = stat_fields(candidate)?;
            let ppid: i32 = fields.get(1)?.parse().ok()?;
            let group: i32 = fields.get(2)?.parse().ok()?;
            (group == pgid).then_some((candidate, ppid))
        })
        .collect();
    members.sort_unstable();
    members
}

/// How many children of `pid` are zombies: exited, but not yet reaped with `wait`.
pub fn zombies(pid: i32) -> usize {
    children(pid)
        .iter()
        .filter(|&&(_, state)| state == 'Z')
        .count()
}

/// The CPU time `pid` has used so far, user plus system (fields 14 and 15 of
/// `/proc/PID/stat`, counted in clock ticks).
pub fn cpu_time(pid: i32) -> Duration {
    let fields = stat_fields(pid).unwrap_or_else(|| panic!("process {pid} is gone"));
    // Field 3 (the state) is index 0 here, so fields 14 and 15 are at 11 and 12.
    let ticks: u64 = fields[11..13]
        .iter()
        .map(|field| field.parse::<u64>().expect("utime and stime are numbers"))
        .sum();
    // SAFETY: sysconf only reads a system setting; it has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).expect("sysconf(_SC_CLK_TCK) is positive");
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// The threads of `pid`, as (thread id, name): the entries of `/proc/PID/task`, in order of
/// thread id (the main thread's id is the pid), each with the name from its `comm` file (what
/// `ps -L` and `top -H` show: a Rust thread's `Builder::name`, cut to 15 bytes).
pub fn tasks(pid: i32) -> Vec<(i32, String)> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new(); // the process is gone
    };
    let mut tasks: Vec<(i32, String)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|tid: i32| {
            let name = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            Some((tid, name.trim_end().to_string()))
        })
        .collect();
    tasks.sort_unstable();
    tasks
}

/// The time thread `tid` of process `pid` has spent running on a CPU so far, to the
/// nanosecond: the first field of `/proc/PID/task/TID/schedstat`. (The `utime` and `stime` of
/// `/proc/PID/task/TID/stat` move in steps of a clock tick, 10 ms, as the kernel samples them:
/// too coarse to compare threads that each ran for a few dozen milliseconds.)
pub fn task_cpu_time(pid: i32, tid: i32) -> Duration {
    let path = format!("/proc/{pid}/task/{tid}/schedstat");
    let stat = fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {path}: {err}"));
    let nanos = stat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("{path} does not start with a number: {stat:?}"));
    Duration::from_nanos(nanos)
}

/// The cores thread `tid` of process `pid` may run on, as the kernel lists them:
/// `Cpus_allowed_list:` in `/proc/PID/task/TID/status`, such as `0-3` or `2`.
pub fn task_cpus_allowed(pid: i32, tid: i32) -> String {
    field_of(
        &format!("/proc/{pid}/task/{tid}/status"),
        "Cpus_allowed_list:",
    )
}

/// Sets the soft limit on open descriptors (`RLIMIT_NOFILE`) of another process, `pid`, keeping
/// its hard limit. Lowering it makes the process run out of descriptors cheaply: its next
/// `accept` or `open` fails with `EMFILE`. Panics if the kernel refuses.
pub fn set_fd_limit(pid: i32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a null new limit means "only read"; `old` is a valid rlimit for the kernel to fill.
    let got = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(
        got,
        0,
        "prlimit({pid}) read: {}",
        std::io::Error::last_os_error()
    );
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit; a null old limit means "do not report the previous one".
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(
        set,
        0,
        "prlimit({pid}, soft {soft}, hard {}): {}",
        old.rlim_max,
        std::io::Error::last_os_error()
    );
}

/// Raises this (test) process's soft limit on open descriptors to its hard limit, so that it can
/// hold thousands of client connections; returns the new limit.
pub fn raise_own_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit(RLIMIT_NOFILE)");
    hard
}

/// Checks `done` every 20 ms until it returns `true` (then returns `true`) or `within` has
/// passed (then returns `false`, after one last check). Every wait in a test should be bounded.
pub fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        thread::sleep(left.min(POLL_EVERY));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> i32 {
        i32::try_from(std::process::id()).expect("a pid fits in an i32")
    }

    #[test]
    fn reads_our_own_process() {
        let pid = me();
        assert!(fd_count(pid) >= 3, "stdin, stdout and stderr at least");
        assert!(max_fd(pid) >= 2);
        let free = lowest_free_fd(pid);
        assert!(free >= 3 && !fds(pid).contains(&free));
        assert!(threads(pid) >= 1);
        assert!(rss_kib(pid) > 0);
        assert!(cpu_time(pid) < Duration::from_secs(3600));
        assert!(stat_fields(pid).is_some_and(|f| f.len() > 20));
        let tasks = tasks(pid);
        assert!(tasks.iter().any(|&(tid, _)| tid == pid), "{tasks:?}");
        assert!(task_cpu_time(pid, pid) <= cpu_time(pid) + Duration::from_millis(100));
        assert!(!task_cpus_allowed(pid, pid).is_empty());
    }

    #[test]
    fn limits_leave_the_room_asked_for() {
        let open = [0, 1, 2, 3, 4, 10];
        assert_eq!(limit_leaving(&open, 0), 5);
        assert_eq!(limit_leaving(&open, 2), 7);
        let open = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 251];
        assert_eq!(limit_leaving(&open, 0), 9);
        assert_eq!(limit_leaving(&open, 1), 11);
        assert_eq!(limit_leaving(&open, 2), 12, "9 and 11 free, 10 inherited");
    }

    #[test]
    fn finds_our_parent_s_children() {
        let parent = stat_fields(me())
            .and_then(|f| f[1].parse::<i32>().ok())
            .expect("our ppid");
        assert!(children(parent).iter().any(|&(pid, _)| pid == me()));
    }

    #[test]
    fn cpu_time_counts_a_busy_loop() {
        // Spin until the CPU time moves by 50 ms; on a loaded machine that may take longer
        // than 50 ms of wall time, so the bound is generous, but it is a bound.
        let before = cpu_time(me());
        let start = Instant::now();
        let mut spins = 0_u64;
        while cpu_time(me()) - before < Duration::from_millis(50) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{spins} spins in 10 s moved the CPU time by only {:?}",
                cpu_time(me()) - before
            );
            for _ in 0..100_000 {
                spins = std::hint::black_box(spins + 1);
            }
        }
    }

    #[test]
    fn wait_until_is_bounded() {
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(50), || false));
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(wait_until(Duration::ZERO, || true));
    }
}
