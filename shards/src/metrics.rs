//! Per-shard metrics and the Prometheus text endpoint.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; it updates counters with
//! relaxed atomics once per batch or per frame, never per transaction on the hot path where
//! a batch total will do. The metrics thread only reads. Nothing here takes a lock, so a
//! scrape can never stall a shard.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs) of the latency histogram buckets; the last bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000,
    500_000, 1_000_000,
];

/// A fixed-bucket latency histogram (µs) written by one shard, read by the scraper.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Records `count` observations of `latency_us` each (a batch shares one latency).
    pub fn record(&self, latency_us: u64, count: u64) {
        let index = LATENCY_BUCKETS_US.partition_point(|&bound| bound < latency_us);
        self.buckets[index].fetch_add(count, Ordering::Relaxed);
        self.sum_us
            .fetch_add(latency_us.saturating_mul(count), Ordering::Relaxed);
        self.count.fetch_add(count, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative); the last bucket is +Inf.
    pub fn buckets(&self) -> [u64; LATENCY_BUCKETS_US.len() + 1] {
        std::array::from_fn(|index| self.buckets[index].load(Ordering::Relaxed))
    }

    /// Observations recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, shard: u32) {
        let mut cumulative = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = LATENCY_BUCKETS_US
                .get(index)
                .map(|us| (*us as f64 / 1e6).to_string());
            let le = bound.as_deref().unwrap_or("+Inf");
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum_s = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum_s}");
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {}", self.count());
    }
}

macro_rules! shard_metrics {
    ($( $kind:ident $field:ident : $help:literal ),* $(,)?) => {
        /// Counters and gauges of one shard. Field names are the Prometheus names without the
        /// `percore_` prefix.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            /// The shard these metrics describe.
            pub shard: u32,
            $( #[doc = $help] pub $field: AtomicU64, )*
            /// Time from a request's arrival to its reply being ready (µs).
            pub request_latency: LatencyHistogram,
            /// Records per sealed batch.
            pub batch_size: LatencyHistogram,
            /// Time to stage, write and (per policy) fdatasync one group of batches (µs).
            pub journal_commit_latency: LatencyHistogram,
        }

        impl ShardMetrics {
            fn render_fields(&self, out: &mut String) {
                $(
                    let name = concat!("percore_", stringify!($field));
                    let _ = writeln!(out, "# HELP {name} {}", $help);
                    let _ = writeln!(out, "# TYPE {name} {}", stringify!($kind));
                    let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", self.shard, self.$field.load(Ordering::Relaxed));
                )*
            }
        }
    };
}

shard_metrics! {
    counter tx_accepted_total: "Records accepted from clients into this shard's ring.",
    counter tx_applied_total: "Client records applied by this shard's state machine.",
    counter internal_applied_total: "Records from other shards' state machines (e.g. credit legs) applied here.",
    counter tx_forwarded_out_total: "Records forwarded to their owning shard over the ring mesh.",
    counter tx_forwarded_in_total: "Records received from other shards over the ring mesh.",
    counter credit_legs_out_total: "Cross-shard credit legs sent to other shards.",
    counter credit_legs_in_total: "Cross-shard credit legs applied here.",
    counter frames_rejected_total: "Client frames rejected with a typed error.",
    counter requests_total: "Client requests answered.",
    counter batches_sealed_total: "Batches sealed by the batcher.",
    counter journal_commits_total: "Group commits (one write and one fdatasync each, per policy).",
    counter mesh_messages_sent_total: "Messages pushed into mesh rings to other shards.",
    counter mesh_messages_received_total: "Messages taken from mesh rings and handled.",
    counter pool_exhausted_total: "Borrows refused because a pool was exhausted (back-pressure).",
    counter ring_full_total: "Pushes refused because a ring was full (back-pressure).",
    gauge commit_op: "Highest op number applied by this shard.",
    gauge ring_depth: "Entries waiting in the transaction ring at the last batcher turn.",
    gauge batch_entries_target: "Adaptive batch entry target.",
    gauge batch_linger_us: "Adaptive batch linger in microseconds.",
    gauge pool_transactions_in_use: "Transaction slots in use.",
    gauge pool_transactions_high_water: "Most transaction slots ever in use.",
    gauge pool_batches_in_use: "Batch slots in use.",
    gauge pool_batches_high_water: "Most batch slots ever in use.",
    gauge pool_messages_in_use: "Message buffers in use.",
    gauge pool_messages_high_water: "Most message buffers ever in use.",
    gauge connections: "Open client connections.",
}

impl ShardMetrics {
    /// Metrics for `shard`, all zero.
    pub fn new(shard: u32) -> Self {
        Self {
            shard,
            ..Self::default()
        }
    }

    /// Adds to a counter (single writer: the owning shard).
    #[inline]
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Reads a counter or gauge.
    #[inline]
    pub fn get(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }

    /// Appends this shard's metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        self.render_fields(out);
        self.request_latency
            .render(out, "percore_request_latency_seconds", self.shard);
        self.batch_size
            .render(out, "percore_batch_entries", self.shard);
        self.journal_commit_latency
            .render(out, "percore_journal_commit_seconds", self.shard);
    }
}

/// Renders every shard's metrics as one Prometheus text exposition.
pub fn render_all(shards: &[Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for metrics in shards {
        metrics.render(&mut out);
    }
    out
}

/// Serves `GET /metrics` on `addr` from a plain thread (off the shard cores) until `stop`.
pub fn serve(
    addr: SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let handle = std::thread::Builder::new().name("percore-metrics".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut request = [0u8; 1024];
                    let read = stream.read(&mut request).unwrap_or(0);
                    let head = std::str::from_utf8(&request[..read]).unwrap_or("");
                    let response = if head.starts_with("GET /metrics") {
                        let body = render_all(&shards);
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                    };
                    let _ = stream.write_all(response.as_bytes());
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => tracing::warn!(%err, "metrics accept failed"),
            }
        }
    })?;
    Ok((local, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = LatencyHistogram::default();
        histogram.record(5, 1);
        histogram.record(150, 2);
        histogram.record(5_000_000, 1);
        let mut out = String::new();
        histogram.render(&mut out, "x", 3);
        assert!(
            out.contains("x_bucket{shard=\"3\",le=\"0.00001\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{shard=\"3\",le=\"0.0002\"} 3"),
            "{out}"
        );
        assert!(out.contains("x_bucket{shard=\"3\",le=\"+Inf\"} 4"), "{out}");
        assert!(out.contains("x_count{shard=\"3\"} 4"), "{out}");
    }

    #[test]
    fn endpoint_serves_prometheus_text() {
        let metrics = Arc::new(ShardMetrics::new(1));
        ShardMetrics::add(&metrics.tx_applied_total, 42);
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, handle) =
            serve("127.0.0.1:0".parse().unwrap(), vec![metrics], stop.clone()).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("percore_tx_applied_total{shard=\"1\"} 42"),
            "{response}"
        );
        assert!(
            response.contains("# TYPE percore_commit_op gauge"),
            "{response}"
        );
    }
}
