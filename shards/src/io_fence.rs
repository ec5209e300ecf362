//! A fence against the writes of a process that is gone.
//!
//! A shard writes its journal, its snapshots and (BFT) its vote guard and prepared log
//! through io_uring. When the process dies (SIGKILL, a crash), the kernel closes its
//! descriptors at once, and with them the data directory's lock ([`crate::format::lock`]),
//! but writes already submitted stay in flight and land afterwards: a request holds a
//! reference to the open file description it writes through, not to the process. On a
//! slow or busy disk that takes as long as the device's queue does. Measured on a loop
//! device whose writes a cgroup throttled to 20 a second: after SIGKILL and reap, 198 of
//! 200 queued 4 KiB `O_DIRECT` writes landed over the next 10 s, the data directory's lock
//! free from the first millisecond (docs/operations.md, "Restarting after a kill"). A node
//! started in that window would recover from files still changing under it, and older
//! writes could land over its own.
//!
//! The fence: every description a shard writes through holds a shared `flock` ([`hold`]),
//! and a process taking a data directory first takes each file's lock exclusively for a
//! moment ([`settle`]). A `flock` belongs to the open file description, which lives until
//! its last reference goes: the descriptor, and every request in flight on it. So the
//! exclusive lock is granted once the earlier process's last write to that file has
//! landed. The same measurement with the writer holding its file this way: the lock was
//! refused while the writes still landed, and granted in the same 50 ms look that saw the
//! last of them.
//!
//! Writes made with blocking system calls (the checkpoint follower's snapshot files, the
//! format file) need no fence: a thread cannot exit in the middle of one.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`settle`] waits for an earlier process's writes before it gives up (ms): far
/// beyond a device's queue, short of hiding a device that no longer completes anything.
pub const SETTLE_WAIT_MS: u64 = 30_000;
/// Between [`settle`]'s looks at the files still written to (ms).
const SETTLE_RETRY_MS: u64 = 5;

/// Marks `file`, just opened for writing through io_uring, as written by this process: a
/// shared `flock` on its open file description, which [`settle`] in a later process waits
/// out. Never blocks: only [`settle`] takes the lock exclusively, and it runs before a
/// process opens any file to write; a file locked exclusively (a second writer of the
/// directory, or a [`settle`] beside this open) is an error.
pub fn hold(file: &impl AsRawFd) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `flock` takes no pointers; `fd` is the open descriptor `file` owns, valid
    // while `file` is borrowed, and the lock changes nothing that `file` relies on.
    let result = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            error.kind(),
            format!("cannot mark it as written by this process (locked by another): {error}"),
        ));
    }
    Ok(())
}

/// What [`settle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// Files examined.
    pub files: usize,
    /// Of those, files that still had a write of another process in flight.
    pub files_waited: usize,
    /// How long the wait took (zero when none was needed).
    pub waited: Duration,
}

/// Waits, up to `wait`, until no other open file description holds a lock on any file
/// under `dir` (recursively; symbolic links are not followed; `skip`, and what this process
/// may not read, are left out), so that every write a gone process left in flight has
/// landed. Call it holding the directory's own lock, before reading anything in it.
pub fn settle(dir: &Path, skip: &Path, wait: Duration) -> Result<Settled, FenceError> {
    let started = Instant::now();
    let mut all = Vec::new();
    files_under(dir, skip, &mut all)?;
    let files = all.len();
    let mut pending = Vec::new();
    for path in all {
        if !lockable(&path)? {
            pending.push(path);
        }
    }
    let files_waited = pending.len();
    while let Some(path) = pending.last() {
        if lockable(path)? {
            pending.pop();
            continue;
        }
        if started.elapsed() >= wait {
            return Err(FenceError::InFlight {
                path: path.clone(),
                files: pending.len(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(SETTLE_RETRY_MS));
    }
    Ok(Settled {
        files,
        files_waited,
        waited: if files_waited > 0 {
            started.elapsed()
        } else {
            Duration::ZERO
        },
    })
}

/// Whether an exclusive lock on `path` is free (taken and let go at once). A file removed
/// meanwhile is: nothing reads it any more; so is one this process may not open: percore
/// only writes files it created, so that one is not a node's.
fn lockable(path: &Path) -> Result<bool, FenceError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if not_ours(&error) => return Ok(true),
        Err(error) => return Err(io(path, error)),
    };
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(error)) => Err(io(path, error)),
    }
}

/// Every regular file under `dir` but `skip`, depth first.
fn files_under(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) -> Result<(), FenceError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Gone, or not this process's to read (`lost+found` at the top of a data disk).
        Err(error) if not_ours(&error) => return Ok(()),
        Err(error) => return Err(io(dir, error)),
    };
    for entry in entries {
        let entry = entry.map_err(|error| io(dir, error))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|error| io(&path, error))?;
        if kind.is_dir() {
            files_under(&path, skip, out)?;
        } else if kind.is_file() && path != skip {
            out.push(path);
        }
    }
    Ok(())
}

/// A file or directory that is gone or that this process may not open: none a node of
/// this user wrote.
fn not_ours(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
    )
}

fn io(path: &Path, error: std::io::Error) -> FenceError {
    FenceError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Why a data directory's files cannot be fenced.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Listing, opening or locking a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// Writes of an earlier process are still in flight after the wait.
    #[error(
        "{path} (and {more} more file(s)) still has writes in flight after {waited:?}, from a \
         process that held this data directory before (killed with I/O queued on a slow \
         or stuck disk), or another open of it: starting now would read files that are \
         still changing",
        more = files - 1
    )]
    InFlight {
        /// A file still written to.
        path: PathBuf,
        /// Files still written to, `path` included.
        files: usize,
        /// How long [`settle`] waited.
        waited: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("percore-fence-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shard-0")).unwrap();
        dir
    }

    #[test]
    fn settle_waits_for_a_description_that_holds_a_file() {
        let dir = scratch("wait");
        let segment = dir.join("shard-0").join("segment");
        std::fs::write(&segment, b"x").unwrap();
        std::fs::write(dir.join("other"), b"y").unwrap();
        let lock_file = dir.join("percore.lock");
        std::fs::write(&lock_file, b"pid 1").unwrap();
        // The lock file is skipped even while another description holds it.
        let lock_holder = std::fs::File::open(&lock_file).unwrap();
        lock_holder.lock().unwrap();

        // Nothing writes: no wait.
        let settled = settle(&dir, &lock_file, Duration::from_secs(5)).unwrap();
        assert_eq!(
            settled,
            Settled {
                files: 2,
                files_waited: 0,
                waited: Duration::ZERO
            }
        );

        // A writer's description (as `hold` leaves it): refused after a short wait, named.
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        hold(&writer).unwrap();
        let error = settle(&dir, &lock_file, Duration::from_millis(50)).unwrap_err();
        match &error {
            FenceError::InFlight {
                path,
                files,
                waited,
            } => {
                assert_eq!((path, *files), (&segment, 1));
                assert!(*waited >= Duration::from_millis(50));
            }
            other => panic!("{other}"),
        }
        assert!(
            error.to_string().contains("still has writes in flight"),
            "{error}"
        );
        // A second description of this process may hold it too (shared).
        let second = std::fs::File::open(&segment).unwrap();
        hold(&second).unwrap();
        drop(second);

        // Let go after 100 ms (as the last in-flight write lands): granted then.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(writer);
        });
        let settled = settle(&dir, &lock_file, Duration::from_secs(10)).unwrap();
        release.join().unwrap();
        assert_eq!((settled.files, settled.files_waited), (2, 1));
        assert!(settled.waited >= Duration::from_millis(90), "{settled:?}");
        drop(lock_holder);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_held_exclusively_cannot_be_held_for_writing() {
        let dir = scratch("hold");
        let path = dir.join("file");
        std::fs::write(&path, b"x").unwrap();
        let fencing = std::fs::File::open(&path).unwrap();
        fencing.lock().unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let error = hold(&writer).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock, "{error}");
        assert!(error.to_string().contains("locked by another"), "{error}");
        drop(fencing);
        hold(&writer).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_absent_directory_settles_at_once() {
        let dir = std::env::temp_dir().join(format!("percore-fence-absent-{}", std::process::id()));
        let settled = settle(&dir, &dir.join("percore.lock"), Duration::ZERO).unwrap();
        assert_eq!(settled, Settled::default());
    }
}
