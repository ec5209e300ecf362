//! What the journal test files share: a temporary directory removed on drop, and a fresh
//! glommio executor to run one test body on.

// Each test file is its own crate and uses a subset.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// Registered io memory of [`run_small`] executors (bytes): well under the 8 MiB memlock
/// limit, even with several tests running at once.
pub const IO_MEMORY_BYTES_TEST: usize = 1 << 20;

/// `percore-<suite>-<name>-<pid>` under the temporary directory, emptied when created and
/// removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(suite: &str, name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("percore-{suite}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }

    /// Shard `shard`'s journal directory at the root.
    pub fn shard_dir(&self, shard: u32) -> PathBuf {
        self.0.join(format!("shard-{shard}"))
    }

    /// Shard `shard`'s journal directory of `case` (a replica, a scenario).
    pub fn case_shard_dir(&self, case: &str, shard: u32) -> PathBuf {
        self.0.join(case).join(format!("shard-{shard}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Longest a test body may run on its executor before the test fails as hung (s). The
/// slowest body takes seconds in a debug build on 2 vCPUs; only a hang comes near this.
pub const TEST_BODY_S_MAX: u64 = 300;

/// Runs `make()` to completion on a fresh glommio executor.
pub fn run<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let executor = glommio::LocalExecutorBuilder::default()
        .spawn(make)
        .expect("executor starts");
    join_watched(executor);
}

/// [`run`] with [`IO_MEMORY_BYTES_TEST`] of registered io memory.
pub fn run_small<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(IO_MEMORY_BYTES_TEST)
        .spawn(make)
        .expect("executor starts");
    join_watched(executor);
}

/// Joins the executor, or fails the test once it has run [`TEST_BODY_S_MAX`]: a hang (an
/// I/O whose completion never comes, say) then fails the test that hung, with the state of
/// this process's io_uring instances and threads, instead of stalling the whole run.
fn join_watched(executor: glommio::ExecutorJoinHandle<()>) {
    if let Err(report) = join_within(executor, Duration::from_secs(TEST_BODY_S_MAX)) {
        panic!("the test body ran over {TEST_BODY_S_MAX} s: hung\n{report}");
    }
}

/// Joins the executor if it finishes within `limit`; otherwise returns the hang report
/// ([`io_state`]). The hung executor thread is left behind; the test binary ends it when
/// it exits.
pub fn join_within(
    executor: glommio::ExecutorJoinHandle<()>,
    limit: Duration,
) -> Result<(), String> {
    let (finished, done) = mpsc::channel();
    let joiner = std::thread::spawn(move || {
        let result = executor.join();
        let _ = finished.send(());
        result
    });
    if done.recv_timeout(limit).is_err() {
        return Err(io_state());
    }
    joiner
        .join()
        .expect("joiner thread")
        .expect("executor finishes");
    Ok(())
}

/// For a hang report: each io_uring instance's `fdinfo` (submission and completion queue
/// heads and tails, the entries still pending) and each thread's state and wait channel.
fn io_state() -> String {
    let mut report = String::new();
    let fds = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten();
    for fd in fds {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if !target.to_string_lossy().contains("io_uring") {
            continue;
        }
        let name = fd.file_name();
        let info =
            std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(&name)).unwrap_or_default();
        report.push_str(&format!("io_uring fd {}:\n", name.to_string_lossy()));
        for line in info.lines().take(60) {
            report.push_str(&format!("  {line}\n"));
        }
    }
    let tasks = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten();
    for task in tasks {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|line| line.starts_with("State:"))
            .unwrap_or("State: ?")
            .to_string();
        report.push_str(&format!(
            "thread {} {}: {state}, waiting in {}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
        ));
    }
    report
}

/// The extent lines of `filefrag -v path` (the file system's own extent map): one per
/// extent, `index: logical_start.. logical_end: physical.. : length: [expected] flags`.
fn extent_lines(path: &Path) -> Vec<String> {
    let output = Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs) runs; .ci/run installs it");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("ext:"),
        "filefrag could not map {}: {text} {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .filter(|line| {
            line.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .map(str::to_owned)
        .collect()
}

/// Extents of `path` that the file system marks unwritten (allocated, never written).
pub fn unwritten_extents(path: &Path) -> usize {
    extent_lines(path)
        .iter()
        .filter(|line| line.contains("unwritten"))
        .count()
}

/// File system blocks of `path` in unwritten extents.
pub fn unwritten_blocks(path: &Path) -> u64 {
    extent_lines(path)
        .iter()
        .filter(|line| line.contains("unwritten"))
        .map(|line| {
            // The fourth colon-separated field is the length.
            let length = line.split(':').nth(3).unwrap_or("").trim();
            length
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("no extent length in {line:?}"))
        })
        .sum()
}
