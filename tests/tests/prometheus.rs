//! End to end with a real Prometheus: three `percore node` replicas (two shards each) on
//! loopback, scraped every second by the `prometheus` server, which is then asked over its
//! HTTP API for what the nodes reported: every target up, one leader per group, the
//! records the client had acknowledged applied by the leaders, and a finite request
//! latency quantile. This checks that the exposition is valid for the real parser, not
//! only for our own.
//!
//! Needs `prometheus` on the PATH or at /usr/bin/prometheus (`.ci/run` installs the Debian
//! package). Without it the test fails, so CI cannot skip it by accident; a developer
//! without Prometheus sets `PERCORE_SKIP_PROMETHEUS=1` to skip it.

use percore_tests::node::SMALL_NODE_ARGS;
use percore_tests::support;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use percore_engine::frame::Operation;
use percore_engine::record::{CreateTransferResult, RecordResult, Transfer};
use percore_net::client::{Client, ClientConfig};
use percore_shards::cluster::{self, LocalCluster, LocalClusterConfig};
use percore_shards::loadgen::{create_funded_accounts, route_transfer, transfer};
use serde_json::Value;

/// The `percore` binary, built from this package (see Cargo.toml).
const PERCORE: &str = env!("CARGO_BIN_EXE_percore-node");
/// Set to 1 to skip this test where Prometheus is not installed.
const SKIP_VARIABLE: &str = "PERCORE_SKIP_PROMETHEUS";
/// Where Debian's package puts the server, tried after the PATH.
const PROMETHEUS_DEFAULT: &str = "/usr/bin/prometheus";
const SHARDS: usize = 2;
const REPLICAS: usize = 3;
const ACCOUNTS_PER_SHARD: usize = 4;
const FUNDING: u128 = 1 << 40;
const REQUESTS: usize = 20;
const TRANSFERS_PER_REQUEST: usize = 50;
/// Prometheus scrape interval (s).
const SCRAPE_INTERVAL_S: u64 = 1;
/// How long Prometheus may take to start, and a query to show the expected answer.
const CONDITION_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket timeout of one API request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The Prometheus binary: the first `prometheus` on the PATH, else Debian's.
fn find_prometheus() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .chain([PathBuf::from(PROMETHEUS_DEFAULT)])
        .find(|candidate| candidate.is_file())
}

/// A port free on 127.0.0.1 when asked (not reserved), below the ephemeral range so that
/// no connection of a test running beside this one takes it before Prometheus binds it.
fn free_port() -> u16 {
    cluster::free_port_base(1, 1).expect("free ports")
}

/// A running Prometheus server; dropping it kills it, and after a failure prints its log.
struct Prometheus {
    child: Child,
    log: PathBuf,
    address: SocketAddr,
}

impl Prometheus {
    /// Writes a configuration scraping `targets` every second and starts the server with
    /// its storage under `dir`.
    fn start(binary: &Path, dir: &Path, targets: &[SocketAddr]) -> Self {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n\
             scrape_configs:\n  - job_name: percore\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("prometheus.yml written");
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let log = dir.join("prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        Self {
            child,
            log,
            address,
        }
    }

    /// Waits until `/-/ready` answers 200.
    fn wait_ready(&mut self) {
        wait_until("Prometheus is ready", || {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "prometheus exited with {status}:\n{}",
                    cluster::file_tail(&self.log, 20)
                );
            }
            http_get(self.address, "/-/ready").ok().map(|_| ())
        });
    }

    /// The result vector of an instant query: each series' labels and value.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let body =
            http_get(self.address, &path).unwrap_or_else(|error| panic!("query {promql}: {error}"));
        let answer: Value = serde_json::from_str(&body).expect("the API answers JSON");
        assert_eq!(answer["status"], "success", "query {promql}: {answer}");
        assert_eq!(answer["data"]["resultType"], "vector", "query {promql}");
        let series = answer["data"]["result"].as_array().expect("a result array");
        series
            .iter()
            .map(|one| {
                // "value": [<unix time>, "<sample as a string>"]; Go spells NaN and the
                // infinities as "NaN", "+Inf", "-Inf", which f64 parsing reads.
                let text = one["value"][1].as_str().expect("a sample value");
                (one["metric"].clone(), text.parse().expect("a number"))
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log:\n{}", cluster::file_tail(&self.log, 40));
        }
    }
}

/// `text` with every byte outside RFC 3986's unreserved set percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// One `GET` (HTTP/1.0: the server answers unchunked and closes); the body of a 200.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("truncated HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("{status}: {body}")));
    }
    Ok(body.to_string())
}

/// Polls `probe` until it returns a value, at most [`CONDITION_TIMEOUT`].
fn wait_until<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    support::wait_until(what, CONDITION_TIMEOUT, probe)
}

/// The temporary directory; removed on success, kept (and named) after a failure.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Drives `REQUESTS` requests of transfers within each shard through the leaders. Returns
/// the client records acknowledged (accounts, funding and transfers).
fn drive_load(cluster: &LocalCluster) -> u64 {
    let mut client = Client::new(ClientConfig::new(cluster.leader_addresses(), 1));
    client
        .ping_all(Instant::now() + CONDITION_TIMEOUT)
        .expect("leaders answer pings");
    let accounts = create_funded_accounts(&mut client, ACCOUNTS_PER_SHARD, FUNDING)
        .expect("accounts created and funded");
    let mut next_id = 1u128 << 100;
    for request in 0..REQUESTS {
        let transfers: Vec<Transfer> = (0..TRANSFERS_PER_REQUEST)
            .map(|i| {
                let ids = &accounts[(request + i) % SHARDS];
                next_id += 1;
                let debit = 1 + i % ACCOUNTS_PER_SHARD;
                let credit = 1 + (i + 1) % ACCOUNTS_PER_SHARD;
                transfer(next_id, ids[debit], ids[credit], 1)
            })
            .collect();
        let results: Vec<RecordResult> = client
            .submit(
                Operation::CreateTransfers.into(),
                &transfers,
                |t: &Transfer| route_transfer(t, SHARDS),
            )
            .expect("leaders answer");
        for (t, r) in transfers.iter().zip(&results) {
            assert_eq!(r.code, CreateTransferResult::Ok as u32, "transfer {t:?}");
        }
    }
    // A mint and ACCOUNTS_PER_SHARD accounts per shard, each account funded by one transfer.
    let setup = SHARDS * (2 * ACCOUNTS_PER_SHARD + 1);
    (setup + REQUESTS * TRANSFERS_PER_REQUEST) as u64
}

#[test]
fn prometheus_scrapes_every_replica() {
    if std::env::var(SKIP_VARIABLE).as_deref() == Ok("1") {
        eprintln!("skipped: {SKIP_VARIABLE}=1");
        return;
    }
    let Some(binary) = find_prometheus() else {
        panic!(
            "prometheus not found on the PATH nor at {PROMETHEUS_DEFAULT}: .ci/run installs it \
             (apt-get install prometheus); set {SKIP_VARIABLE}=1 to skip this test"
        );
    };
    let started = Instant::now();
    let dir =
        TempDir(std::env::temp_dir().join(format!("percore-prometheus-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temporary directory");
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cluster = LocalCluster::start(LocalClusterConfig {
        binary: PathBuf::from(PERCORE),
        replicas: REPLICAS,
        cores: (0..SHARDS).map(|k| k % online).collect(),
        replica_core_stride: 0,
        data_root: dir.0.join("cluster"),
        port_base: cluster::free_port_base(REPLICAS, SHARDS).expect("free ports"),
        fsync: "never",
        // Fixed view: the test checks each group's leader where it starts.
        extra_args: SMALL_NODE_ARGS
            .iter()
            .chain(&["--fixed-view"])
            .map(ToString::to_string)
            .collect(),
        metrics: true,
    })
    .expect("cluster starts");
    let targets: Vec<SocketAddr> = (0..REPLICAS).map(|r| cluster.metrics_address(r)).collect();
    let mut prometheus = Prometheus::start(&binary, &dir.0, &targets);
    prometheus.wait_ready();
    let acknowledged = drive_load(&cluster);

    // Every replica scraped, its exposition accepted.
    wait_until("every target is up", || {
        let up = prometheus.query("up{job=\"percore\"}");
        (up.len() == REPLICAS && up.iter().all(|(_, value)| *value == 1.0)).then_some(())
    });
    // One leader per group, and it is replica k for group k.
    let leaders = prometheus.query("percore_replica_is_leader");
    assert_eq!(leaders.len(), REPLICAS * SHARDS, "{leaders:?}");
    for (labels, value) in &leaders {
        let instance = labels["instance"].as_str().expect("instance label");
        let shard: usize = labels["shard"]
            .as_str()
            .expect("shard label")
            .parse()
            .unwrap();
        let leader = cluster
            .metrics_address(cluster.leader_of(shard))
            .to_string();
        let expected = if instance == leader { 1.0 } else { 0.0 };
        assert_eq!(*value, expected, "{labels}");
    }
    // What the leaders applied is what the client had acknowledged, once the last scrape
    // after the load has landed.
    let applied_by_leaders = "sum(percore_tx_applied_total and on(instance, shard) \
                              (percore_replica_is_leader == 1))";
    let applied = wait_until("Prometheus holds every applied record", || {
        let applied = prometheus.query(applied_by_leaders);
        let value = applied.first()?.1;
        (value as u64 == acknowledged).then_some(value)
    });
    let p99 = prometheus
        .query("histogram_quantile(0.99, sum by (le) (percore_request_latency_seconds_bucket))");
    assert_eq!(p99.len(), 1, "{p99:?}");
    let p99_s = p99[0].1;
    assert!(
        p99_s.is_finite() && p99_s > 0.0,
        "p99 request latency {p99_s} s"
    );
    // A strict parser (client_golang's, as `promtool`, the Pushgateway and Telegraf use)
    // accepts a whole node's exposition: each family once, its samples together. It
    // refused the per-shard repetition of HELP and TYPE lines ("second TYPE line").
    let promtool = binary.with_file_name("promtool");
    let text = cluster.scrape(0).expect("metrics scrape");
    assert_strict_exposition(&promtool, &text);
    assert_alert_rules_name_exported_metrics(&promtool, &text);
    eprintln!(
        "prometheus: {applied} records applied by the leaders ({acknowledged} acknowledged), \
         p99 request latency {:.3} ms; took {:?}",
        p99_s * 1e3,
        started.elapsed()
    );
    drop(prometheus);
    drop(cluster);
}

/// The example alert rules (deploy/percore-alerts.yml) pass `promtool check rules`, and
/// every `percore_*` metric they name is in a node's exposition `text` (a renamed metric
/// would leave an alert that never fires).
fn assert_alert_rules_name_exported_metrics(promtool: &std::path::Path, text: &str) {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/percore-alerts.yml");
    let output = std::process::Command::new(promtool)
        .args(["check", "rules", rules])
        .output()
        .unwrap_or_else(|error| panic!("{}: {error}", promtool.display()));
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = std::fs::read_to_string(rules).expect("the alert rules");
    let named: std::collections::BTreeSet<&str> = yaml
        .match_indices("percore_")
        .map(|(at, _)| {
            let rest = &yaml[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    assert!(named.len() >= 8, "{named:?}");
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    for metric in named {
        assert!(
            exported.contains(metric),
            "{metric} is named in {rules} but not exported"
        );
    }
}

/// `promtool check metrics` parses `text` without an error. Its exit status is 3 for lint
/// remarks alone (such as the house style's unit suffixes, `_us`), which are not errors.
fn assert_strict_exposition(promtool: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{}: {error}", promtool.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("exposition written");
    let output = child.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        matches!(output.status.code(), Some(0 | 3)) && !said.contains("error"),
        "promtool refused the exposition ({:?}): {said}",
        output.status
    );
}
