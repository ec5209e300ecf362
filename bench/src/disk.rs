//! `percore-bench disk`: how long a write and its `fdatasync` take on one disk while several
//! writers append and sync at once, as a node's journals do.
//!
//! A 3-replica × 4-shard cluster on one machine keeps 12 journals on the same disk, each
//! appending one batch and syncing it per commit, about 155 commits a second each at half of
//! peak. If the disk's flush latency has a tail when 12 threads flush at once, every shard's
//! commit latency has it too, whatever the engine does. This probe measures exactly that
//! and nothing else: `writers` threads, each with its own file (pre-written, so that
//! appends do not convert unwritten extents, as the journal's reused segments; or, with
//! `--unwritten`, pre-allocated only, as fresh ones), each writing `write_kib` with
//! `O_DIRECT` at the next offset and then calling `fdatasync`, `rate_per_writer` times a
//! second (0: back to back), for `duration_s` seconds. It reports the latency of write plus
//! sync over all writers (p50/p99/p999/max), the worst writer, and how many seconds had an
//! operation over 5 and over 20 ms.
//!
//! Files are created in `dir` and removed at the end.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::harness::percentile;
use crate::machine::Machine;

/// Bytes of each writer's file; writes wrap around in it.
pub const FILE_BYTES: u64 = 256 << 20;
/// Alignment of `O_DIRECT` buffers, offsets and lengths.
pub const DIRECT_ALIGN_BYTES: usize = 4096;
/// Bytes written per call when pre-writing a file.
const PREWRITE_CHUNK_BYTES: usize = 4 << 20;
/// Thresholds (µs) for counting slow seconds.
pub const SLOW_OP_US: [u64; 2] = [5_000, 20_000];

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct DiskConfig {
    /// Concurrent writers, one file each.
    pub writers: usize,
    /// Bytes per write (a multiple of 4 KiB).
    pub write_bytes: usize,
    /// Writes (each followed by `fdatasync`) per second per writer; 0: back to back.
    pub rate_per_writer: u32,
    /// Measured seconds.
    pub duration_s: u64,
    /// Pre-allocate the files instead of writing them first.
    pub unwritten: bool,
    /// Open the files `O_DSYNC` and make each write durable by itself instead of calling
    /// `fdatasync` after it.
    pub dsync: bool,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Operations measured.
    pub count: usize,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
}

impl Percentiles {
    fn of(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        Self {
            count: samples.len(),
            p50_us: percentile(samples, 50.0),
            p99_us: percentile(samples, 99.0),
            p999_us: percentile(samples, 99.9),
            max_us: samples.last().copied().unwrap_or(0),
        }
    }
}

/// The result of one run.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    /// What ran.
    pub config: DiskConfig,
    /// Write + fdatasync latency over every writer's operations.
    pub all: Percentiles,
    /// The writer with the highest p99.
    pub worst_writer: Percentiles,
    /// Operations per second, all writers.
    pub ops_per_s: f64,
    /// Seconds in which some operation took over each of [`SLOW_OP_US`].
    pub seconds_with_op_over_us: Vec<(u64, usize)>,
    /// Where it ran.
    pub machine: Machine,
}

/// One writer's samples: (seconds since start, latency µs).
type Samples = Vec<(u32, u64)>;

/// Runs the probe in `dir` (created if missing; the files are removed afterwards).
pub fn run(config: &DiskConfig, dir: &Path, machine: &Machine) -> io::Result<DiskReport> {
    assert!(config.writers >= 1, "at least one writer");
    assert!(
        config.write_bytes >= DIRECT_ALIGN_BYTES
            && config.write_bytes.is_multiple_of(DIRECT_ALIGN_BYTES),
        "the write size must be a multiple of {DIRECT_ALIGN_BYTES} bytes"
    );
    fs::create_dir_all(dir)?;
    let paths: Vec<PathBuf> = (0..config.writers)
        .map(|writer| dir.join(format!("percore-disk-probe-{writer}.dat")))
        .collect();
    let files = paths
        .iter()
        .map(|path| prepare(path, config.unwritten, config.dsync))
        .collect::<io::Result<Vec<File>>>();
    let outcome = files.and_then(|files| measure(config, files));
    for path in &paths {
        let _ = fs::remove_file(path);
    }
    let (samples, elapsed) = outcome?;
    let mut all: Vec<u64> = samples.iter().flatten().map(|&(_, us)| us).collect();
    let worst_writer = samples
        .iter()
        .map(|writer| Percentiles::of(&mut writer.iter().map(|&(_, us)| us).collect::<Vec<_>>()))
        .max_by_key(|writer| writer.p99_us)
        .unwrap_or_default();
    let seconds_with_op_over_us = SLOW_OP_US
        .iter()
        .map(|&bound| {
            let mut seconds: Vec<u32> = samples
                .iter()
                .flatten()
                .filter(|&&(_, us)| us > bound)
                .map(|&(second, _)| second)
                .collect();
            seconds.sort_unstable();
            seconds.dedup();
            (bound, seconds.len())
        })
        .collect();
    let ops_per_s = all.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    Ok(DiskReport {
        config: config.clone(),
        all: Percentiles::of(&mut all),
        worst_writer,
        ops_per_s,
        seconds_with_op_over_us,
        machine: machine.clone(),
    })
}

/// Creates `path` for `O_DIRECT` writes, [`FILE_BYTES`] long: written through, or only
/// allocated with `unwritten`. With `dsync` the file is then reopened `O_DSYNC` as well.
fn prepare(path: &Path, unwritten: bool, dsync: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    if unwritten {
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, FILE_BYTES)?;
    } else {
        let mut buffer = AlignedBuffer::new(PREWRITE_CHUNK_BYTES);
        buffer.bytes_mut().fill(0x5a);
        let mut offset = 0;
        while offset < FILE_BYTES {
            file.write_all_at(buffer.bytes(), offset)?;
            offset += PREWRITE_CHUNK_BYTES as u64;
        }
    }
    file.sync_all()?;
    if !dsync {
        return Ok(file);
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
}

/// Runs every writer for the configured time; returns their samples and the elapsed time.
fn measure(config: &DiskConfig, files: Vec<File>) -> io::Result<(Vec<Samples>, Duration)> {
    let barrier = Barrier::new(config.writers);
    let duration = Duration::from_secs(config.duration_s);
    let interval =
        (config.rate_per_writer > 0).then(|| Duration::from_secs(1) / config.rate_per_writer);
    let capacity = match config.rate_per_writer {
        0 => 1 << 16,
        rate => (u64::from(rate) * config.duration_s + 16) as usize,
    };
    let started = Instant::now();
    let results: Vec<io::Result<Samples>> = thread::scope(|scope| {
        let handles: Vec<_> = files
            .into_iter()
            .map(|file| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut buffer = AlignedBuffer::new(config.write_bytes);
                    buffer.bytes_mut().fill(0xa5);
                    let mut samples = Samples::with_capacity(capacity);
                    let mut offset = 0u64;
                    barrier.wait();
                    let start = Instant::now();
                    let mut next = start;
                    while start.elapsed() < duration {
                        if let Some(interval) = interval {
                            let now = Instant::now();
                            if next > now {
                                thread::sleep(next - now);
                            }
                            next += interval;
                        }
                        let began = Instant::now();
                        file.write_all_at(buffer.bytes(), offset)?;
                        if !config.dsync {
                            file.sync_data()?;
                        }
                        let us = began.elapsed().as_micros() as u64;
                        samples.push((began.duration_since(start).as_secs() as u32, us));
                        offset += config.write_bytes as u64;
                        if offset + config.write_bytes as u64 > FILE_BYTES {
                            offset = 0;
                        }
                    }
                    Ok(samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a disk writer panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    Ok((results.into_iter().collect::<io::Result<_>>()?, elapsed))
}

/// A zeroed byte buffer whose start is aligned for `O_DIRECT`, in safe code: a larger
/// vector, used from its first aligned byte.
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN_BYTES];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        Self {
            storage,
            start,
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// One human-readable report line set.
pub fn report_lines(report: &DiskReport) -> Vec<String> {
    let config = &report.config;
    // (how the files are opened, what one timed operation is)
    let (open, sync) = if config.dsync {
        ("O_DIRECT | O_DSYNC", "O_DSYNC write")
    } else {
        ("O_DIRECT + fdatasync", "write+fdatasync")
    };
    let line = |name: &str, p: &Percentiles| {
        format!(
            "{name}: {} ops, {sync} p50 {} µs, p99 {} µs, p999 {} µs, max {} µs",
            p.count, p.p50_us, p.p99_us, p.p999_us, p.max_us
        )
    };
    let mut lines = vec![
        format!(
            "percore-bench disk: {} ({} cores); {} writers x {} KiB {open}, {} per writer, {} s, files {}",
            report.machine.cpu,
            report.machine.cores,
            config.writers,
            config.write_bytes / 1024,
            match config.rate_per_writer {
                0 => "back to back".to_owned(),
                rate => format!("{rate}/s"),
            },
            config.duration_s,
            if config.unwritten {
                "pre-allocated (unwritten)"
            } else {
                "pre-written"
            },
        ),
        line("all writers", &report.all),
        line("worst writer", &report.worst_writer),
        format!("{:.0} ops/s in all", report.ops_per_s),
    ];
    for &(bound, seconds) in &report.seconds_with_op_over_us {
        lines.push(format!(
            "seconds with an operation over {} ms: {seconds}",
            bound / 1_000
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut samples: Vec<u64> = (1..=1_000).collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!(
            (p.count, p.p50_us, p.p99_us, p.max_us),
            (1_000, 501, 990, 1_000)
        );
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [4096, 8192, 131_072] {
            let buffer = AlignedBuffer::new(len);
            assert_eq!(buffer.bytes().len(), len);
            assert_eq!(buffer.bytes().as_ptr() as usize % DIRECT_ALIGN_BYTES, 0);
        }
    }
}
