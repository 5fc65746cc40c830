//! What the kernel says about a server in `/proc`, summed over its processes.
//!
//! Every server runs in a process group of its own (its pid is the group id), and whatever it
//! forks stays in that group: so "the server" is every process of the group, one for most steps,
//! one per connection plus the parent for the fork step, a master and a worker for nginx.
//! Unlike testkit's readers, these never panic: a process may exit between two reads.

use std::fs;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::unistd::{SysconfVar, sysconf};

/// What a group of processes uses at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// CPU time used so far, user plus system, including children already reaped.
    pub cpu: Duration,
    /// Resident memory, summed over the processes (shared pages count in each).
    pub rss_kib: u64,
    pub threads: u64,
    pub processes: u64,
    /// Open file descriptors, summed over the processes.
    pub fds: u64,
}

impl Usage {
    /// The larger of each count (the CPU time is this one's).
    fn max(self, other: Usage) -> Usage {
        Usage {
            cpu: self.cpu,
            rss_kib: self.rss_kib.max(other.rss_kib),
            threads: self.threads.max(other.threads),
            processes: self.processes.max(other.processes),
            fds: self.fds.max(other.fds),
        }
    }
}

/// The fields of `/proc/PID/stat` from the third on (state, ppid, pgrp, ...). The command name
/// before them, in parentheses, may hold spaces and parentheses: the fields start after the
/// last `)`.
fn stat_fields(pid: i32) -> Option<Vec<u64>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // The state is a letter; the rest are numbers (a few may be negative: read them as 0).
    Some(
        rest.split_whitespace()
            .map(|field| field.parse().unwrap_or(0))
            .collect(),
    )
}

/// Field N of `/proc/PID/stat` (numbered from 1, as in proc(5)) in [`stat_fields`]'s vector.
const fn field(n: usize) -> usize {
    n - 3
}

/// The processes of group `pgid`, found by scanning every `/proc/*/stat`.
pub fn group(pgid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pgid = u64::try_from(pgid).unwrap_or(u64::MAX);
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat_fields(pid).is_some_and(|fields| fields.get(field(5)) == Some(&pgid)))
        .collect()
}

/// The number of entries of `/proc/PID/fd`: its open descriptors.
pub fn fd_count(pid: i32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count() as u64)
}

/// What group `pgid` uses now.
pub fn usage(pgid: i32) -> Usage {
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1);
    let page_kib = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096)
        / 1024;
    let mut usage = Usage::default();
    let mut cpu_ticks = 0;
    for pid in group(pgid) {
        let Some(fields) = stat_fields(pid) else {
            continue; // gone since the scan
        };
        let get = |n: usize| fields.get(field(n)).copied().unwrap_or(0);
        // utime, stime, and the same of its children it has reaped (cutime, cstime): the fork
        // step's children add their time to the parent's when they are reaped.
        cpu_ticks += get(14) + get(15) + get(16) + get(17);
        usage.threads += get(20);
        usage.rss_kib += get(24) * u64::try_from(page_kib).unwrap_or(4);
        usage.processes += 1;
        usage.fds += fd_count(pid);
    }
    let ticks = u64::try_from(ticks).unwrap_or(100);
    usage.cpu = Duration::from_secs_f64(cpu_ticks as f64 / ticks as f64);
    usage
}

/// The proportional set size of group `pgid`, in KiB: each process's resident memory with
/// every shared page divided among the processes that share it. Summed over a group it counts
/// each page once, where summed RSS would count the fork step's shared pages once per child.
pub fn pss_kib(pgid: i32) -> u64 {
    group(pgid)
        .into_iter()
        .filter_map(|pid| {
            let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            let line = rollup.lines().find_map(|line| line.strip_prefix("Pss:"))?;
            line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
        .sum()
}

/// A thread that samples a group's usage every `every` while a load runs, keeping the peaks.
pub struct Sampler {
    stop: mpsc::Sender<()>,
    thread: thread::JoinHandle<Usage>,
}

impl Sampler {
    pub fn start(pgid: i32, every: Duration) -> Sampler {
        let (stop, stopped) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut peak = usage(pgid);
            // Wakes every `every`, and at once when told to stop (or when the sender is gone).
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                peak = peak.max(usage(pgid));
            }
            peak
        });
        Sampler { stop, thread }
    }

    /// Stops sampling and returns the peaks, with the CPU time of the last sample.
    pub fn finish(self, pgid: i32) -> Usage {
        let _ = self.stop.send(());
        let peak = self.thread.join().unwrap_or_default();
        usage(pgid).max(peak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_group() {
        let me = nix::unistd::getpgrp().as_raw();
        let usage = usage(me);
        assert!(usage.processes >= 1);
        assert!(usage.threads >= 1);
        assert!(usage.fds >= 3);
        assert!(usage.rss_kib > 0);
        assert!(pss_kib(me) > 0);
    }

    #[test]
    fn the_sampler_keeps_peaks() {
        let me = nix::unistd::getpgrp().as_raw();
        let sampler = Sampler::start(me, Duration::from_millis(5));
        thread::sleep(Duration::from_millis(20));
        let peak = sampler.finish(me);
        assert!(peak.threads >= 1 && peak.rss_kib > 0);
    }
}
