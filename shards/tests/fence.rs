//! A node killed with journal writes in flight, and restarted at once: the restarted node
//! waits until those writes have landed before it reads its journal (`io_fence`).
//!
//! The first node runs in a block-I/O cgroup that throttles its writes to the data
//! directory's disk to 128 KiB/s, so each 1,000-transfer group commit (about 130 KB) is in
//! flight for a second. It is killed (SIGKILL) while one is, and a second node starts
//! on the same directory the moment the first is reaped, outside the cgroup. Without the
//! fence it would recover at once, from a journal the first node's write still changes
//! under it; with it, it says that it waited, then serves, and the journal it leaves holds
//! every acknowledged request.
//!
//! Needs root and the cgroup v1 `blkio` controller (or cgroup v2 with `io` enabled at the
//! root) and a temporary directory on a block device whose writes the cgroup does slow:
//! without them the test says why and passes as skipped (fails under
//! `PERCORE_REQUIRE_PRIVILEGED_TESTS=1`, as `.ci/run` sets). The cgroup is removed when the
//! test ends.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use percore_engine::frame::Operation;
use percore_engine::record::{CreateTransferResult, RecordResult, Transfer};
use percore_net::client::{Client, ClientConfig};
use percore_shards::cluster;
use percore_shards::loadgen::{create_funded_accounts, route_transfer, transfer};

mod process;
use process::Node;

const PERCORE: &str = env!("CARGO_BIN_EXE_percore");
/// The first node's write budget to its disk (bytes per second).
const WRITE_BPS_THROTTLED: u64 = 128 << 10;
/// Transfers per request: one request, one group commit of about 130 KB.
const TRANSFERS_PER_REQUEST: usize = 1_000;
/// A request's time at least, when the throttle holds each group commit for about a second.
const THROTTLED_REQUEST_TIME_MIN: Duration = Duration::from_millis(400);
/// Longest a node may take to serve (the throttled one writes its superblock slowly).
const NODE_TIMEOUT: Duration = Duration::from_secs(60);

/// A block-I/O cgroup throttling writes to one disk; removed on drop.
struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    /// A cgroup whose members write at most `bytes_per_s` to the disk holding `path`, or
    /// why there cannot be one here.
    fn new(path: &Path, bytes_per_s: u64) -> Result<Self, String> {
        // SAFETY: `geteuid` takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let device = disk_of(path)?;
        // The hierarchy, its throttle file and the limit in that file's syntax.
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        let (root, file, limit) = if v1.join("blkio.throttle.write_bps_device").exists() {
            (
                v1,
                "blkio.throttle.write_bps_device",
                format!("{device} {bytes_per_s}"),
            )
        } else {
            let v2 = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .map(Path::new)
                .into_iter()
                .find(|root| {
                    std::fs::read_to_string(root.join("cgroup.subtree_control"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .any(|controller| controller == "io")
                })
                .ok_or("no cgroup v1 blkio controller and no cgroup v2 io controller enabled")?;
            (v2, "io.max", format!("{device} wbps={bytes_per_s}"))
        };
        let dir = root.join(format!("percore-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // From here the cgroup is removed on drop, whatever fails next.
        let throttle = Self { dir };
        let path = throttle.dir.join(file);
        std::fs::write(&path, &limit).map_err(|e| format!("{} <- {limit}: {e}", path.display()))?;
        Ok(throttle)
    }

    /// The file a process writes its pid to, to join.
    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // Empty once its one member is reaped; a moment's retry for the kernel to agree.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cgroup {} left behind", self.dir.display());
    }
}

/// Set to 1 by `.ci/run`: a test that cannot set up what it needs (root, namespaces, a
/// cgroup write throttle) fails instead of passing as skipped, so CI cannot lose it unseen.
const REQUIRE_VARIABLE: &str = "PERCORE_REQUIRE_PRIVILEGED_TESTS";

/// Says why the test cannot run: a pass as skipped, or a failure under [`REQUIRE_VARIABLE`].
fn skip(why: &str) {
    assert!(
        std::env::var(REQUIRE_VARIABLE).as_deref() != Ok("1"),
        "{REQUIRE_VARIABLE}=1 and this test cannot run: {why}"
    );
    eprintln!("skipped: {why}");
}

/// `major:minor` of the whole disk holding `path` (a partition's disk), or why not.
fn disk_of(path: &Path) -> Result<String, String> {
    let dev = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .dev();
    let id = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let sys = Path::new("/sys/dev/block").join(&id);
    if !sys.exists() {
        return Err(format!(
            "{} is not on a block device ({id}: tmpfs or overlay?)",
            path.display()
        ));
    }
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("..").join("dev"))
            .map_err(|e| format!("disk of partition {id}: {e}"))?;
        return Ok(parent.trim().to_string());
    }
    Ok(id)
}

/// `percore node args`, first joining the cgroup of `procs` (its `cgroup.procs`) if given,
/// so that every write it makes is throttled; returns once it serves.
fn start(args: &[String], procs: Option<&Path>) -> Node {
    let mut command = match procs {
        Some(procs) => {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!(
                    "echo $$ > {} && exec \"$0\" \"$@\"",
                    procs.display()
                ))
                .arg(PERCORE);
            command
        }
        None => Command::new(PERCORE),
    };
    command.arg("node").args(args);
    let mut node = Node::spawn(command, NODE_TIMEOUT);
    node.wait_for("serving clients at");
    node
}

#[test]
fn a_node_restarted_after_a_kill_waits_for_the_writes_still_in_flight() {
    let root = std::env::temp_dir().join(format!("percore-fence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let throttle = match Throttle::new(&root, WRITE_BPS_THROTTLED) {
        Ok(throttle) => throttle,
        Err(why) => {
            let _ = std::fs::remove_dir_all(&root);
            skip(&why);
            return;
        }
    };
    let data = root.join("data");
    let port = cluster::free_port_base(1, 1).expect("a free port");
    let args: Vec<String> = [
        "--cores",
        "0",
        "--client-port-base",
        &port.to_string(),
        "--accounts-max",
        "1024",
        "--transfers-max",
        "65536",
        "--segment-mib",
        "4",
        "--fsync",
        "always",
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();

    let first = start(&args, Some(&throttle.procs()));
    let mut client = Client::new(ClientConfig::new(
        vec![format!("127.0.0.1:{port}").parse().unwrap()],
        0xfe,
    ));
    let accounts = create_funded_accounts(&mut client, 8, 1 << 40).expect("accounts");
    let all: Vec<u128> = accounts[0][1..].to_vec();
    // Requests back to back, each one group commit, until the node is gone.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut next_id = 1u128 << 64;
            while !stop.load(Ordering::Relaxed) {
                let transfers: Vec<Transfer> = (0..TRANSFERS_PER_REQUEST)
                    .map(|k| {
                        next_id += 1;
                        let debit = all[k % all.len()];
                        let credit = all[(k + 1) % all.len()];
                        transfer(next_id, debit, credit, 1)
                    })
                    .collect();
                let Ok(results) = client.submit::<Transfer, RecordResult>(
                    Operation::CreateTransfers.into(),
                    &transfers,
                    |t: &Transfer| route_transfer(t, 1),
                ) else {
                    return;
                };
                assert!(
                    results
                        .iter()
                        .all(|r| r.code == CreateTransferResult::Ok as u32)
                );
                acknowledged.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Two acknowledged, then the next request's write is a second in flight (the second
    // node takes about 0.3 s to start here).
    let deadline = Instant::now() + NODE_TIMEOUT;
    let mut first_acknowledged = None;
    while acknowledged.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "no request acknowledged");
        if first_acknowledged.is_none() && acknowledged.load(Ordering::Relaxed) == 1 {
            first_acknowledged = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Zero: both acknowledged within one look.
    let request_time = first_acknowledged.map_or(Duration::ZERO, |at| at.elapsed());
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    drop(first); // SIGKILL, then reaped
    // A cgroup that does not slow this disk's writes (a device the throttle does not
    // apply to) leaves nothing in flight to wait for: that says nothing of the fence.
    if request_time < THROTTLED_REQUEST_TIME_MIN {
        load.join().expect("the load thread ends with the node");
        drop(throttle);
        let _ = std::fs::remove_dir_all(&root);
        skip(&format!(
            "a request took {request_time:?}, the write throttle does not apply"
        ));
        return;
    }
    let killed = Instant::now();
    let acknowledged = acknowledged.load(Ordering::Relaxed);
    load.join().expect("the load thread ends with the node");

    // `percore inspect` in the meantime says the writes are still landing.
    let output = Command::new(PERCORE)
        .args(["inspect", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("writes a killed node left in flight are still landing"),
        "{report}"
    );

    let second = start(&args, None);
    let waited = second
        .seen
        .iter()
        .find(|line| line.contains("left in flight to land"))
        .cloned()
        .unwrap_or_else(|| panic!("no wait for in-flight writes: {:#?}", second.seen));
    assert!(
        waited.contains("files=") && waited.contains("waited_ms="),
        "{waited}"
    );
    eprintln!("restarted {:?} after the kill: {waited}", killed.elapsed());
    second.stop();

    // The journal is whole, and holds at least the acknowledged requests (one op each)
    // after the set-up's.
    let output = Command::new(PERCORE)
        .args(["inspect", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    let head: u64 = report
        .lines()
        .find_map(|line| line.trim_start().strip_prefix("head: op "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|op| op.parse().ok())
        .unwrap_or_else(|| panic!("no head in {report}"));
    assert!(
        head > acknowledged,
        "head op {head}, {acknowledged} acknowledged"
    );
    drop(throttle);
    let _ = std::fs::remove_dir_all(&root);
}
