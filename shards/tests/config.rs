//! `percore node --config` and `percore status` as an operator runs them: the real binary,
//! real files and ports, exit codes and the messages that name the bad key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use percore_shards::cluster;

mod process;
use process::Node;

#[path = "../../tests/support/refusing_port.rs"]
mod refusing_port;
use refusing_port::RefusingPort;

const PERCORE: &str = env!("CARGO_BIN_EXE_percore");
/// Longest a node may take to come up or to stop.
const NODE_TIMEOUT: Duration = Duration::from_secs(15);
/// Small ledgers keep start-up allocation (and the test) short.
const SMALL: &str = "accounts_max = 1024\ntransfers_max = 4096\ncredit_legs_max = 1024\n";

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("percore-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Three ports free a moment ago, below the ephemeral range so that no connection of a test
/// running beside this one takes one before the node binds it (one cluster layout's client,
/// peer and metrics ports, [`cluster::free_port_base`]).
fn free_ports() -> (u16, u16, u16) {
    let base = cluster::free_port_base(1, 1).expect("free ports");
    (
        base,
        base + cluster::PEER_PORT_OFFSET,
        base + cluster::METRICS_PORT_OFFSET,
    )
}

/// `percore node args` ([`Node::spawn`]).
fn start(args: &[&str]) -> Node {
    let mut command = Command::new(PERCORE);
    command.arg("node").args(args);
    Node::spawn(command, NODE_TIMEOUT)
}

/// `percore node --config FILE ARGS...` that must fail: its stderr.
fn refused(config: &Path, args: &[&str]) -> String {
    let output: Output = Command::new(PERCORE)
        .args(["node", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    stderr
}

fn status(addresses: &str) -> (Option<i32>, String) {
    let output = Command::new(PERCORE)
        .args(["status", "--interval-ms", "200", "--addresses", addresses])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.code(), format!("{stdout}{stderr}"))
}

#[test]
fn a_config_file_starts_a_node_flags_override_it_and_status_reads_it() {
    let scratch = Scratch::new("valid");
    let (file_port, flag_port, metrics_port) = free_ports();
    let config = scratch.file(
        "node.toml",
        &format!(
            "cores = [0]\nclient_port_base = {file_port}\nmetrics = \"127.0.0.1:{metrics_port}\"\n\
             data_dir = \"{}\"\nfsync = \"never\"\nsegment_mib = 16\ncluster_id = \"2a\"\n{SMALL}",
            scratch.0.join("data").display()
        ),
    );
    let config = config.to_str().unwrap();
    let mut node = start(&[
        "--config",
        config,
        "--client-port-base",
        &flag_port.to_string(),
    ]);
    node.wait_for(&format!("serving clients at 127.0.0.1:{flag_port}"));
    node.wait_for("metrics on");
    assert!(
        node.seen
            .iter()
            .any(|l| l.contains("shard 0 pinned to core 0")),
        "{:#?}",
        node.seen
    );
    assert!(
        node.seen.iter().any(|l| l.contains("peers digest")),
        "{:#?}",
        node.seen
    );
    assert!(
        !node
            .seen
            .iter()
            .any(|l| l.contains(&format!(":{file_port}"))),
        "the flag must override the file: {:#?}",
        node.seen
    );

    let (code, output) = status(&format!("127.0.0.1:{metrics_port}"));
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("up, single node, 1 shard(s)"), "{output}");
    assert!(output.contains("single"), "{output}");
    // Shard 0's row: core, NUMA node, role "single", then view 0.
    let row: Vec<&str> = output
        .lines()
        .find(|line| line.starts_with("  ") && line.split_whitespace().nth(3) == Some("single"))
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        row.get(..5),
        Some(&["0", "0", "0", "single", "0"][..]),
        "{output}"
    );
    assert!(output.contains("peers digests: agree"), "{output}");
    node.stop();

    // The journal now belongs to cluster 0x2a: another cluster id is refused, by key.
    let data = scratch.0.join("data");
    let stderr = refused(Path::new(config), &["--cluster-id", "2b"]);
    assert!(stderr.contains("`cluster_id`"), "{stderr}");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    assert!(stderr.contains("belongs to cluster 2a"), "{stderr}");
}

#[test]
fn status_reports_a_dead_node_as_down() {
    // Held and refusing, so that no listener of a test beside this one answers there.
    let dead = RefusingPort::bind().unwrap();
    let (code, output) = status(&dead.address().to_string());
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("DOWN"), "{output}");
}

#[test]
fn an_unknown_key_is_named() {
    let scratch = Scratch::new("unknown");
    let config = scratch.file("node.toml", "cores = [0]\nclient_port_bsae = 7000\n");
    let stderr = refused(&config, &[]);
    assert!(
        stderr.contains("unknown field `client_port_bsae`"),
        "{stderr}"
    );
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

#[test]
fn a_core_that_does_not_exist_is_named() {
    let scratch = Scratch::new("core");
    let config = scratch.file("node.toml", &format!("cores = [4095]\n{SMALL}"));
    let stderr = refused(&config, &[]);
    assert!(stderr.contains("`cores`"), "{stderr}");
    assert!(stderr.contains("core 4095 does not exist"), "{stderr}");
}

#[test]
fn duplicate_peers_are_named() {
    let scratch = Scratch::new("peers");
    let config = scratch.file(
        "node.toml",
        &format!(
            "cores = [0]\nreplica = 0\npeers = [\"127.0.0.1:17100\", \"127.0.0.1:17200\", \
             \"127.0.0.1:17100\"]\ndata_dir = \"{}\"\n{SMALL}",
            scratch.0.join("data").display()
        ),
    );
    let stderr = refused(&config, &[]);
    assert!(stderr.contains("`peers`"), "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:17100 is listed twice (replicas 0 and 2)"),
        "{stderr}"
    );
}

#[test]
fn a_port_in_use_is_named() {
    let scratch = Scratch::new("port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = scratch.file(
        "node.toml",
        &format!("cores = [0]\nclient_port_base = {port}\n{SMALL}"),
    );
    let stderr = refused(&config, &[]);
    assert!(
        stderr.contains(&format!("client port of shard 0 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("`client_port_base`"), "{stderr}");
    drop(taken);
}

/// Sizes a file gives skip the flags' parsers; they are checked as the flags' would be,
/// named, before any shard allocates (a zero-sized ledger asserted on the shard's thread,
/// which aborts a release build), and an empty core list is refused, not read as "all".
#[test]
fn sizes_and_an_empty_core_list_from_a_file_are_named() {
    let scratch = Scratch::new("sizes");
    for (line, named) in [
        (
            "accounts_max = 0",
            "--accounts-max (config key accounts_max) = 0",
        ),
        (
            "transfers_max = 2000000000",
            "--transfers-max (config key transfers_max)",
        ),
        ("session_clients_max = 0", "--session-clients-max"),
        ("connections_max = 0", "--connections-max"),
        ("connections_max = 65537", "--connections-max"),
        ("segment_mib = 0", "--segment-mib"),
        (
            "snapshot_write_mib_per_s = 17592186044416",
            "--snapshot-write-mib-per-s",
        ),
    ] {
        // The line replaces SMALL's value of its key, if it has one.
        let key = line.split(' ').next().unwrap();
        let small: String = SMALL
            .lines()
            .filter(|small| !small.starts_with(key))
            .map(|small| format!("{small}\n"))
            .collect();
        let config = scratch.file("node.toml", &format!("cores = [0]\n{small}{line}\n"));
        let stderr = refused(&config, &[]);
        assert!(stderr.contains(named), "{line}: {stderr}");
    }
    let config = scratch.file("node.toml", &format!("cores = []\n{SMALL}"));
    let stderr = refused(&config, &[]);
    assert!(stderr.contains("cores = []"), "{stderr}");
}

/// Every replica's shards listen on its port plus the shard index: a peer whose range
/// runs past 65535 is refused, not dialed at a wrapped port.
#[test]
fn a_peer_port_range_past_65535_is_named() {
    let scratch = Scratch::new("peer-ports");
    let config = scratch.file(
        "node.toml",
        &format!(
            "cores = [0, 0]\nallow_shared_cores = true\nreplica = 0\npeers = [\"127.0.0.1:17100\", \
             \"127.0.0.1:65535\", \"127.0.0.1:17300\"]\ndata_dir = \"{}\"\n{SMALL}",
            scratch.0.join("data").display()
        ),
    );
    let stderr = refused(&config, &[]);
    assert!(stderr.contains("65535"), "{stderr}");
    assert!(stderr.contains("peers"), "{stderr}");
}
