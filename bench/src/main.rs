//! `percore-bench`: run the ring or pool benchmarks and print a table or JSON lines.
//!
//! Each row runs OURS and a PEER alternately in the same process and reports medians and
//! the ratio ours/peer. This binary owns only argument parsing and printing; the kernels
//! and the harness live in the `percore_bench` library.

use std::io::Write;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use percore_bench::harness::{self, Bench, RowResult};
use percore_bench::machine::{Machine, Pins, Role};
use percore_bench::{disk, pools, rings, threads};

/// `--quick` divides item counts by this.
const QUICK_ITEMS_DIVISOR: u64 = 8;
/// `--quick` runs this many rounds (unless `--rounds` is given).
const QUICK_ROUNDS: usize = 3;

#[derive(Debug, Parser)]
#[command(
    name = "percore-bench",
    about = "percore rings and pools against peer crates"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, Subcommand)]
enum Suite {
    /// SPSC and MPMC rings: throughput and ping-pong latency.
    Rings(Options),
    /// Pools: borrow+release cycles.
    Pools(Options),
    /// 1 to 1,024 application threads enqueueing into one consumer: ours beside crossbeam
    /// and std, throughput and enqueue latency.
    Threads(ThreadsOptions),
    /// Write + fdatasync latency while several writers append and sync at once, as a
    /// node's journals do (the disk's share of commit latency).
    Disk(DiskOptions),
}

#[derive(Debug, Args)]
struct DiskOptions {
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Concurrent writers, one file each.
    #[arg(long, default_value_t = 12)]
    writers: usize,
    /// KiB per write (a multiple of 4).
    #[arg(long, default_value_t = 128)]
    write_kib: usize,
    /// Writes (each followed by fdatasync) per second per writer; 0: back to back.
    #[arg(long, default_value_t = 160)]
    rate_per_writer: u32,
    /// Measured seconds.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Pre-allocate the files (unwritten extents) instead of writing them first.
    #[arg(long)]
    unwritten: bool,
    /// Open the files O_DSYNC: each write is durable when it completes, with no fdatasync
    /// after it.
    #[arg(long)]
    dsync: bool,
    /// Directory for the files (on the disk to measure; not tmpfs, which has no O_DIRECT).
    #[arg(long)]
    dir: std::path::PathBuf,
}

#[derive(Debug, Args)]
struct ThreadsOptions {
    /// Print one JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Timed rounds per side; the median is reported.
    #[arg(long)]
    rounds: Option<usize>,
    /// Items per timed round, all producers together.
    #[arg(long)]
    items: Option<u64>,
    /// Fewer items and rounds: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Largest producer count (counts double from 1 up to it).
    #[arg(long, default_value_t = threads::THREADS_MAX_DEFAULT)]
    max_threads: usize,
    /// Pin the consumer to the last allowed core and keep the producers on the others (as
    /// an application keeps its threads off a node's shard cores); default: all float.
    #[arg(long)]
    consumer_core: bool,
    /// Most sleeping producers one notification wakes (ours and crossbeam).
    #[arg(long, default_value_t = percore_shards::ingest::WAKE_PER_NOTIFY_MAX)]
    wake_max: usize,
    /// Lanes of the lanes and ingest sides (their capacity is the others', split over them); default:
    /// one per two cores, at most 8.
    #[arg(long)]
    lanes: Option<usize>,
    /// Only these producer counts (comma-separated), instead of 1, 2, 4, ... up to
    /// `--max-threads`.
    #[arg(long, value_delimiter = ',')]
    producers: Vec<usize>,
    /// After a take that emptied the queue, the consumer pauses this long (ns) before it
    /// looks again, as a shard does other work between drains; every side alike. 0: it
    /// looks again at once and chases the producers.
    #[arg(long, default_value_t = 0)]
    drain_pause_ns: u64,
    /// Records per `submit_batch_wait` call of the ingest side's producers; 1: one `submit_wait`
    /// per record, as the other sides enqueue one item at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    ingest_batch: u64,
}

/// The `threads` header's note of the non-default consumer and ingest modes.
fn modes_text(layout: &threads::Layout) -> String {
    let mut text = String::new();
    if layout.drain_pause_ns > 0 {
        text += &format!(
            "; the consumer pauses {} ns after a take that emptied the queue",
            layout.drain_pause_ns
        );
    }
    if layout.ingest_batch > 1 {
        text += &format!(
            "; ingest producers submit batches of {} (`submit_batch_wait`; its p50/p99 are per \
             record: each call's time over its records)",
            layout.ingest_batch
        );
    }
    text
}

#[derive(Debug, Args)]
struct Options {
    /// Print one JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Timed rounds per side; the median is reported.
    #[arg(long)]
    rounds: Option<usize>,
    /// Items (rings) or cycles (pools) per timed round.
    #[arg(long)]
    items: Option<u64>,
    /// Fewer items and rounds: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Run only rows whose name or peer contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Do not pin threads to cores.
    #[arg(long)]
    no_pin: bool,
}

impl Options {
    fn rounds(&self) -> usize {
        self.rounds
            .unwrap_or(if self.quick { QUICK_ROUNDS } else { 5 })
            .max(1)
    }

    fn items(&self, default: u64) -> u64 {
        let scaled = if self.quick {
            default / QUICK_ITEMS_DIVISOR
        } else {
            default
        };
        self.items.unwrap_or(scaled).max(1)
    }

    fn selected(&self, bench: &Bench) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|text| bench.name.contains(text) || bench.peer.contains(text))
    }
}

fn main() {
    let cli = Cli::parse();
    // Queues are built on the driver thread; heapless ones are large and start on the stack.
    harness::on_big_stack(move || run(&cli));
}

fn run(cli: &Cli) {
    let machine = Machine::detect();
    let (suite_name, options, benches) = match &cli.suite {
        Suite::Threads(options) => return run_threads(options, &machine),
        Suite::Disk(options) => return run_disk(options, &machine),
        Suite::Rings(options) => (
            "rings",
            options,
            rings::benches(options.items(rings::ITEMS_DEFAULT)),
        ),
        Suite::Pools(options) => (
            "pools",
            options,
            pools::benches(options.items(pools::CYCLES_DEFAULT)),
        ),
    };
    let pins = if options.no_pin {
        Pins::none()
    } else {
        Pins::detect()
    };
    if suite_name == "pools" {
        // Pool kernels are single-threaded and run on this (driver) thread.
        pins.pin_current(Role::Producer, 0);
    }
    let rounds = options.rounds();
    if !options.json {
        println!(
            "percore-bench {suite_name}: {} ({} cores)",
            machine.cpu, machine.cores
        );
        if suite_name == "pools" {
            let core = pins.core_for(Role::Producer, 0);
            println!("pinning: single-threaded kernels on the driver thread, core {core:?}");
        } else {
            println!("pinning: {}", pins.describe());
        }
        println!(
            "rounds: {rounds} per side, interleaved ours/peer; median reported; \
             ratio_vs_peer = ours/peer throughput (>1 is ours faster)"
        );
        println!("{}", harness::TABLE_HEADER);
    }
    harness::spin_warmup();
    let started = Instant::now();
    let mut stdout = std::io::stdout().lock();
    for bench in benches.iter().filter(|bench| options.selected(bench)) {
        let row = harness::run_bench(bench, rounds, &pins, &machine);
        print_row(&mut stdout, &row, options.json);
    }
    if !options.json {
        let _ = writeln!(
            stdout,
            "done in {:.1} s; pin failures: {}",
            started.elapsed().as_secs_f64(),
            pins.failures()
        );
    }
}

fn print_row(out: &mut impl Write, row: &RowResult, json: bool) {
    let line = if json {
        serde_json::to_string(row).expect("a row always serialises")
    } else {
        harness::table_line(row)
    };
    // Rows stream as they finish; a closed pipe just ends the output.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run_disk(options: &DiskOptions, machine: &Machine) {
    if options.writers == 0 || options.write_kib == 0 || !options.write_kib.is_multiple_of(4) {
        eprintln!(
            "percore-bench disk: --writers must be at least 1 and --write-kib a positive multiple of 4"
        );
        std::process::exit(2);
    }
    let config = disk::DiskConfig {
        writers: options.writers,
        write_bytes: options.write_kib * 1024,
        rate_per_writer: options.rate_per_writer,
        duration_s: options.duration_s.max(1),
        unwritten: options.unwritten,
        dsync: options.dsync,
    };
    let report = match disk::run(&config, &options.dir, machine) {
        Ok(report) => report,
        Err(error) => {
            eprintln!(
                "percore-bench disk: {}: {error} (O_DIRECT needs a real file system, not tmpfs)",
                options.dir.display()
            );
            std::process::exit(1);
        }
    };
    if options.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report always serialises")
        );
    } else {
        for line in disk::report_lines(&report) {
            println!("{line}");
        }
    }
}

fn run_threads(options: &ThreadsOptions, machine: &Machine) {
    let rounds = options
        .rounds
        .unwrap_or(if options.quick { QUICK_ROUNDS } else { 5 })
        .max(1);
    let items = options
        .items
        .unwrap_or(if options.quick {
            threads::ITEMS_DEFAULT / QUICK_ITEMS_DIVISOR
        } else {
            threads::ITEMS_DEFAULT
        })
        .max(1);
    let mut layout = if options.consumer_core {
        let allowed = percore_shards::affinity::allowed();
        let Some(layout) = threads::Layout::reserved_consumer_core(&allowed) else {
            eprintln!(
                "percore-bench threads: --consumer-core needs at least two allowed cores \
                 (allowed: {allowed:?})"
            );
            std::process::exit(2);
        };
        // The consumer is this thread; producers confine themselves when spawned.
        if let Some(core) = layout.consumer_core
            && let Err(error) = percore_shards::affinity::confine_current(&[core])
        {
            eprintln!("percore-bench threads: pin the consumer to core {core}: {error}");
            std::process::exit(1);
        }
        layout
    } else {
        threads::Layout::shared()
    };
    layout.wake_max = options.wake_max.max(1);
    layout.drain_pause_ns = options.drain_pause_ns;
    layout.ingest_batch = options.ingest_batch as usize;
    layout.lanes = options
        .lanes
        .unwrap_or_else(|| percore_engine::ring::lanes::lane_count_for(machine.cores))
        .clamp(1, percore_engine::ring::lanes::LANES_MAX);
    let layout_text = match layout.consumer_core {
        Some(core) => format!(
            "consumer pinned to core {core}, producers unpinned on cores {:?}",
            layout.producer_cores
        ),
        None => "consumer and producers unpinned on every core".to_owned(),
    };
    let mut stdout = std::io::stdout().lock();
    if !options.json {
        let _ = writeln!(
            stdout,
            "percore-bench threads: {} ({} cores); {layout_text}; wake up to {} per notify; {} lanes; \
             queue capacity {}; rounds: {rounds} per side, interleaved ours/lanes/ingest/crossbeam/std; \
             median reported; enqueue p50/p99 over every {}th enqueue{}",
            machine.cpu,
            machine.cores,
            layout.wake_max,
            layout.lanes,
            threads::QUEUE_CAPACITY,
            threads::LATENCY_SAMPLE_EVERY,
            modes_text(&layout)
        );
        let _ = writeln!(stdout, "{}", threads::TABLE_HEADER);
    }
    harness::spin_warmup();
    let started = Instant::now();
    let mut rows = Vec::new();
    let counts = if options.producers.is_empty() {
        threads::producer_counts(options.max_threads)
    } else {
        options
            .producers
            .iter()
            .map(|&count| count.max(1))
            .collect()
    };
    for producers in counts {
        let row = threads::run_row(producers, items, rounds, &layout, machine);
        let line = if options.json {
            serde_json::to_string(&row).expect("a row always serialises")
        } else {
            threads::table_line(&row)
        };
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
        rows.push(row);
    }
    if !options.json {
        for goal in threads::goals(&rows) {
            let _ = writeln!(stdout, "goal: {goal}");
        }
        let _ = writeln!(stdout, "done in {:.1} s", started.elapsed().as_secs_f64());
    }
}
