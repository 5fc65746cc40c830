//! `bench tlpi`: the classic measurement of `poll`, `select` and `epoll` (Kerrisk, *The Linux
//! Programming Interface*, Table 63-9, first shown in his 2006 talk "The epoll API").
//!
//! N descriptors are watched for reading; each operation makes one of them, chosen at random,
//! ready, waits for the mechanism to report it, and reads it back. `poll` and `select` hand the
//! kernel all N descriptors on every call and both sides scan them all; `epoll` keeps the list
//! in the kernel and answers with the ready one only. The descriptors are eventfds: one
//! descriptor each (a pipe takes two, and 10,000 pipes would not fit under the usual limit of
//! 20,000 descriptors), readable once written to, drained by a read.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::select::{FdSet, select};

use crate::report::{Align, Table};
use crate::stop;

/// The numbers of descriptors watched.
pub const SIZES: [usize; 4] = [10, 100, 1000, 10_000];
/// The operations the published figures count.
pub const OPERATIONS: u64 = 100_000;
/// The published figures (the 2006 talk): seconds for 100,000 operations with poll, select and
/// epoll, for each N of [`SIZES`].
pub const PUBLISHED: [[f64; 3]; 4] = [
    [1.12, 1.28, 0.65],
    [6.8, 7.1, 0.68],
    [157.0, 151.0, 0.89],
    [1750.0, 1087.0, 0.97],
];
/// The mechanisms, in the order of the tables.
pub const MECHANISMS: [&str; 3] = ["poll", "select", "epoll"];

/// One measurement.
#[derive(Clone, Debug)]
pub enum Cell {
    /// Seconds for [`OPERATIONS`] operations, measured over `operations` of them (fewer when
    /// that many would take longer than the time allowed; then scaled).
    Measured { seconds: f64, operations: u64 },
    /// The mechanism cannot watch these descriptors at all.
    Impossible(String),
}

impl Cell {
    pub fn seconds(&self) -> Option<f64> {
        match self {
            Cell::Measured { seconds, .. } => Some(*seconds),
            Cell::Impossible(_) => None,
        }
    }
}

/// The measurements: for each N of [`SIZES`], one cell per mechanism.
pub type Results = Vec<[Cell; 3]>;

/// Measures every N and mechanism, each for at most `budget` (scaled to 100,000 operations when
/// fewer fit); `each` is told what is measured next.
pub fn run(budget: Duration, mut each: impl FnMut(&str)) -> Result<Results> {
    let mut results = Vec::new();
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    for n in SIZES {
        let fds = (0..n)
            .map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!("creating {n} eventfds (is the descriptor limit high enough?)")
            })?;
        let mut cells = Vec::new();
        for (m, name) in MECHANISMS.iter().enumerate() {
            each(&format!("tlpi: {name}, N = {n}"));
            let cell = match m {
                0 => measure(&fds, budget, &mut random, Polled::new(&fds))?,
                1 => match Selected::new(&fds) {
                    Ok(selected) => measure(&fds, budget, &mut random, selected)?,
                    Err(why) => Cell::Impossible(why),
                },
                _ => measure(&fds, budget, &mut random, Epolled::new(&fds)?)?,
            };
            cells.push(cell);
        }
        let cells: [Cell; 3] = cells
            .try_into()
            .map_err(|_| anyhow::anyhow!("three cells"))?;
        results.push(cells);
    }
    Ok(results)
}

/// A way to wait until one of the descriptors is readable.
trait Waiter {
    /// Waits, and returns the index of the readable descriptor.
    fn wait(&mut self) -> Result<usize>;
}

/// Times operations with `waiter` until [`OPERATIONS`] are done or `budget` is spent.
fn measure(
    fds: &[EventFd],
    budget: Duration,
    random: &mut Random,
    mut waiter: impl Waiter,
) -> Result<Cell> {
    let mut operate = |count: u64| -> Result<()> {
        for _ in 0..count {
            let i = random.below(fds.len());
            fds[i].write(1).context("writing an eventfd")?;
            let ready = waiter.wait()?;
            ensure!(
                ready == i,
                "descriptor {ready} reported ready, {i} was made ready"
            );
            fds[i].read().context("reading an eventfd")?;
        }
        Ok(())
    };
    operate(10)?; // warm the caches
    const BATCH: u64 = 10;
    let start = Instant::now();
    let mut operations = 0;
    while operations < OPERATIONS && start.elapsed() < budget {
        stop::check()?;
        operate(BATCH)?;
        operations += BATCH;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Cell::Measured {
        seconds: elapsed / operations as f64 * OPERATIONS as f64,
        operations,
    })
}

/// Retries a call that a signal interrupted (Ctrl-C raises a flag, then the loop stops).
fn again<T>(mut call: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match call() {
            Err(Errno::EINTR) => stop::check().map_err(|_| Errno::EINTR)?,
            other => return other,
        }
    }
}

/// `poll`: the array of N entries goes to the kernel on every call, and comes back scanned.
struct Polled<'fd> {
    entries: Vec<PollFd<'fd>>,
}

impl<'fd> Polled<'fd> {
    fn new(fds: &'fd [EventFd]) -> Polled<'fd> {
        let entries = fds
            .iter()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        Polled { entries }
    }
}

impl Waiter for Polled<'_> {
    fn wait(&mut self) -> Result<usize> {
        again(|| poll(&mut self.entries, PollTimeout::NONE)).context("poll")?;
        let readable = |entry: &PollFd| {
            entry
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
        };
        self.entries
            .iter()
            .position(readable)
            .context("poll reported nothing")
    }
}

/// `select`: a bitmap of `FD_SETSIZE` bits, rebuilt for every call (the kernel overwrites it).
struct Selected<'fd> {
    fds: &'fd [EventFd],
}

impl<'fd> Selected<'fd> {
    /// Fails, saying why, when a descriptor is numbered past what a set can hold.
    fn new(fds: &'fd [EventFd]) -> Result<Selected<'fd>, String> {
        let highest = fds.iter().map(|fd| fd.as_raw_fd()).max().unwrap_or(0);
        let limit = libc::FD_SETSIZE;
        if usize::try_from(highest).map_or(true, |highest| highest >= limit) {
            return Err(format!(
                "impossible: descriptor {highest} is past FD_SETSIZE ({limit})"
            ));
        }
        Ok(Selected { fds })
    }
}

impl Waiter for Selected<'_> {
    fn wait(&mut self) -> Result<usize> {
        let mut set = FdSet::new();
        for fd in self.fds {
            set.insert(fd.as_fd());
        }
        again(|| select(None, Some(&mut set), None, None, None)).context("select")?;
        self.fds
            .iter()
            .position(|fd| set.contains(fd.as_fd()))
            .context("select reported nothing")
    }
}

/// `epoll`: the descriptors are registered once; a wait returns only the ready one.
struct Epolled {
    epoll: Epoll,
    events: [EpollEvent; 8],
}

impl Epolled {
    fn new(fds: &[EventFd]) -> Result<Epolled> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        for (i, fd) in fds.iter().enumerate() {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, i as u64);
            epoll.add(fd.as_fd(), event).context("epoll_ctl")?;
        }
        Ok(Epolled {
            epoll,
            events: [EpollEvent::empty(); 8],
        })
    }
}

impl Waiter for Epolled {
    fn wait(&mut self) -> Result<usize> {
        let ready = again(|| self.epoll.wait(&mut self.events, EpollTimeout::NONE))
            .context("epoll_wait")?;
        ensure!(
            ready == 1,
            "epoll_wait reported {ready} descriptors ready, not one"
        );
        usize::try_from(self.events[0].data()).context("an index")
    }
}

/// A xorshift generator: random enough to pick a descriptor, and the same every run.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The table: measured beside published, and the ratio of N = 10,000 to N = 10.
pub fn table(results: &Results) -> Table {
    let title =
        "Seconds for 100,000 monitoring operations, one of N descriptors ready each time".into();
    let mut columns = vec![("N", Align::Right)];
    columns.extend(MECHANISMS.map(|m| (m, Align::Right)));
    columns.extend([("poll 2006", Align::Right), ("select 2006", Align::Right)]);
    columns.push(("epoll 2006", Align::Right));
    let mut table = Table::new(title, &columns);
    for (cells, (n, published)) in results.iter().zip(SIZES.iter().zip(PUBLISHED)) {
        let mut row = vec![crate::plan::thousands(*n)];
        row.extend(cells.iter().map(|cell| match cell {
            Cell::Measured {
                seconds,
                operations,
            } => {
                let scaled = if *operations < OPERATIONS { " *" } else { "" };
                format!("{}{scaled}", seconds_text(*seconds))
            }
            Cell::Impossible(_) => "impossible".to_string(),
        }));
        row.extend(published.map(seconds_text));
        table.rows.push(row);
    }
    let mut ratios = vec!["10,000 / 10".to_string()];
    for m in 0..MECHANISMS.len() {
        let at = |i: usize| {
            results
                .get(i)
                .and_then(|cells: &[Cell; 3]| cells[m].seconds())
        };
        ratios.push(match (at(0), at(3), at(2)) {
            (Some(small), Some(large), _) => times(large / small),
            (Some(small), None, Some(mid)) => format!("- (1,000 / 10: {})", times(mid / small)),
            _ => "-".to_string(),
        });
    }
    ratios.extend((0..3).map(|m| times(PUBLISHED[3][m] / PUBLISHED[0][m])));
    table.rows.push(ratios);
    table
}

/// What the table's marks mean, and how the cells were measured.
pub fn footnote(results: &Results) -> String {
    let mut notes = vec![
        "Measured: each operation writes one randomly chosen eventfd, waits for the mechanism \
         to report it, and reads it back. 2006: Kerrisk's published figures (poll, select, epoll)."
            .to_string(),
    ];
    for (cells, n) in results.iter().zip(SIZES) {
        for (cell, name) in cells.iter().zip(MECHANISMS) {
            match cell {
                Cell::Measured { operations, .. } if *operations < OPERATIONS => {
                    notes.push(format!(
                        "* {name} at N = {}: {} operations measured, scaled to 100,000.",
                        crate::plan::thousands(n),
                        crate::plan::thousands(*operations as usize)
                    ))
                }
                Cell::Impossible(why) => notes.push(format!(
                    "{name} at N = {}: {why}.",
                    crate::plan::thousands(n)
                )),
                Cell::Measured { .. } => {}
            }
        }
    }
    notes.join("\n")
}

/// A ratio: `1.5×`, `480×`.
fn times(ratio: f64) -> String {
    if ratio < 10.0 {
        format!("{ratio:.1}×")
    } else {
        format!("{ratio:.0}×")
    }
}

/// Seconds to three significant digits: `0.0512`, `1.25`, `157`.
fn seconds_text(seconds: f64) -> String {
    if seconds >= 100.0 {
        format!("{seconds:.0}")
    } else if seconds >= 10.0 {
        format!("{seconds:.1}")
    } else {
        let digits = (2 - seconds.log10().floor() as i32).clamp(2, 6) as usize;
        format!("{seconds:.digits$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mechanism_finds_the_ready_descriptor() {
        let fds: Vec<EventFd> = (0..50)
            .map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let mut random = Random(7);
        let budget = Duration::from_millis(20);
        let selected = Selected::new(&fds).expect("low descriptors");
        let epolled = Epolled::new(&fds).expect("epoll");
        for cell in [
            measure(&fds, budget, &mut random, Polled::new(&fds)).expect("poll"),
            measure(&fds, budget, &mut random, selected).expect("select"),
            measure(&fds, budget, &mut random, epolled).expect("epoll"),
        ] {
            assert!(cell.seconds().is_some_and(|s| s > 0.0), "{cell:?}");
        }
    }

    #[test]
    fn select_past_fd_setsize_is_impossible_not_faked() {
        let fds: Vec<EventFd> = (0..libc::FD_SETSIZE + 1)
            .map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let why = Selected::new(&fds).err().expect("impossible");
        assert!(why.contains("FD_SETSIZE"), "{why}");
    }

    #[test]
    fn seconds_read_well() {
        assert_eq!(seconds_text(0.05123), "0.0512");
        assert_eq!(seconds_text(1.254), "1.25");
        assert_eq!(seconds_text(15.44), "15.4");
        assert_eq!(seconds_text(1750.0), "1750");
        assert_eq!(seconds_text(0.65), "0.650");
    }
}
