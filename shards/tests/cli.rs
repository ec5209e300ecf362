//! The `percore` binary as an operator runs it: real processes, signals, exit codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PERCORE: &str = env!("CARGO_BIN_EXE_percore");

fn first_core_list() -> String {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online >= 2 {
        "0,1".to_string()
    } else {
        "0".to_string()
    }
}

/// A small node on the first cores, client ports from the kernel, no journal.
fn small_node_args_in_memory() -> Vec<String> {
    [
        "--cores",
        &first_core_list(),
        "--client-port-base",
        "0",
        "--accounts-max",
        "1024",
        "--transfers-max",
        "4096",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn node_drains_and_exits_cleanly_on_sigterm() {
    let seen = node_serves(&small_node_args_in_memory()).expect("node serves");
    assert!(seen.iter().any(|l| l.contains("draining")), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("stopped at op")),
        "{seen:#?}"
    );
}

/// Runs `percore args` (with `env` set), which must fail; returns its stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(PERCORE)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_core_that_does_not_exist_is_refused_with_a_clear_error() {
    let stderr = refused(&["node", "--cores", "4095"], &[]);
    assert!(stderr.contains("core 4095 does not exist"), "{stderr}");
}

#[test]
fn bad_arguments_are_refused_by_the_parser() {
    let stderr = refused(&["bench", "--cross-shard-percent", "101"], &[]);
    assert!(stderr.contains("--cross-shard-percent"), "{stderr}");
}

#[test]
fn a_leader_rebalance_time_below_the_leader_timeout_is_refused() {
    let key = "00".repeat(32);
    let stderr = refused(
        &[
            "node",
            "--cores",
            "0",
            // Not the default port: a node of another test may hold it, and the port
            // check comes first.
            "--client-port-base",
            "0",
            "--replica",
            "0",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
            "--leader-rebalance-ms",
            "100",
        ],
        &[("PERCORE_CLUSTER_KEY", key.as_str())],
    );
    assert!(
        stderr.contains("--leader-rebalance-ms 100: 0 (never) or at least the leader timeout"),
        "{stderr}"
    );
}

#[test]
fn bench_load_flags_are_checked_by_the_parser() {
    let refused_bench = |args: &[&str], expected: &str| {
        let args: Vec<&str> = std::iter::once("bench")
            .chain(args.iter().copied())
            .collect();
        let stderr = refused(&args, &[]);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    // A rate and a share of the peak say two different things.
    refused_bench(&["--rate", "1000", "--load", "0.5"], "cannot be used with");
    refused_bench(&["--load", "1.5"], "0 < FRACTION <= 1");
    refused_bench(&["--load", "0"], "0 < FRACTION <= 1");
    refused_bench(&["--rate", "0"], "positive number of transfers per second");
    refused_bench(&["--rate", "fast"], "not a rate");
    // The peak run's length means nothing without --load.
    refused_bench(&["--peak-s", "3"], "--load");
}

#[test]
fn a_series_file_that_cannot_be_written_is_refused_before_the_cluster_starts() {
    let stderr = refused(
        &[
            "bench",
            "--replicas",
            "3",
            "--cores",
            "0",
            "--series-out",
            "/percore-no-such-dir/series.jsonl",
        ],
        &[],
    );
    assert!(
        stderr.contains("--series-out /percore-no-such-dir/series.jsonl"),
        "{stderr}"
    );
    assert!(!stderr.contains("starting 3 replicas"), "{stderr}");
    // A single node has no series to write.
    let stderr = refused(
        &["bench", "--replicas", "1", "--series-out", "series.jsonl"],
        &[],
    );
    assert!(stderr.contains("need a local cluster"), "{stderr}");
}

/// Starts `percore node args`, waits until it serves clients or exits: `Ok(stderr lines)`
/// once it served and then stopped cleanly on SIGTERM (delivered as an operator or systemd
/// would), `Err(stderr)` if it exited by itself.
fn node_serves(args: &[String]) -> Result<Vec<String>, String> {
    node_serves_while(args, |_| {})
}

/// [`node_serves`], calling `serving` with the node's process id while it serves.
fn node_serves_while(args: &[String], serving: impl FnOnce(u32)) -> Result<Vec<String>, String> {
    let mut child = Command::new(PERCORE)
        .arg("node")
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("percore starts");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<String> = Vec::new();
    loop {
        if seen.iter().any(|l| l.contains("serving clients at")) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            // The reader ends at the pipe's end: every line is in.
            seen.extend(lines_rx.iter());
            assert!(!status.success(), "exited {status} before serving");
            return Err(seen.join("\n"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node neither served nor exited: {seen:#?}");
        }
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(50)) {
            seen.push(line);
        }
    }
    serving(child.id());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    seen.extend(lines_rx.iter());
    assert!(exit.success(), "exit {exit:?}: {seen:#?}");
    Ok(seen)
}

/// `percore inspect --data-dir data`'s report.
fn inspect(data: &std::path::Path) -> String {
    let output = Command::new(PERCORE)
        .args(["inspect", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// [`small_node_args_in_memory`], journaling in `data`.
fn small_node_args(data: &std::path::Path) -> Vec<String> {
    let mut args = small_node_args_in_memory();
    args.extend(
        [
            "--allow-shared-cores",
            "--segment-mib",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .map(String::from),
    );
    args
}

#[test]
fn a_second_node_on_a_data_directory_in_use_is_refused() {
    let root = std::env::temp_dir().join(format!("percore-cli-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    // Ports from the kernel: the two nodes differ in nothing else a port check would see.
    let args = small_node_args(&data);
    node_serves_while(&args, |pid| {
        let second = Command::new(PERCORE)
            .arg("node")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "a second node ran: {stderr}");
        assert!(
            stderr.contains("in use by another percore process")
                && stderr.contains(&format!("pid {pid}")),
            "{stderr}"
        );
        // Inspection reads it, saying it may be changing.
        let stdout = inspect(&data);
        assert!(
            stdout.contains(&format!("a running node holds this directory (pid {pid})")),
            "{stdout}"
        );
    })
    .expect("the first node serves and stops");
    // Released with the first node: the directory starts again.
    node_serves(&args).expect("the node starts again once the first is gone");
    let _ = std::fs::remove_dir_all(&root);
}

/// A node restarted on its data directory with another setting that decides results is
/// refused by name before it replays anything (the ops would replay to another state than
/// the one acknowledged), and starts again with its own; `inspect` prints the digest each
/// journal was written under, and `inspect --replay` under other settings says so.
#[test]
fn a_node_restarted_with_other_settings_that_decide_results_is_refused() {
    let root = std::env::temp_dir().join(format!("percore-cli-settings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    let args = small_node_args(&data);
    let started = node_serves(&args).expect("the first start serves");
    let digest_line = started.iter().find(|line| line.contains("settings digest"));
    assert!(
        digest_line.is_none(),
        "a single node prints no digest: {digest_line:?}"
    );
    let report = inspect(&data);
    let recorded: Vec<&str> = report
        .lines()
        .filter_map(|line| line.split("settings digest ").nth(1))
        .collect();
    assert!(
        !recorded.is_empty() && recorded.iter().all(|digest| *digest == recorded[0]),
        "{report}"
    );
    let digest = recorded[0].to_string();
    assert_eq!(digest.len(), 13, "{report}");
    for (flag, value) in [("--session-clients-max", "7"), ("--transfers-max", "8192")] {
        let mut changed = args.clone();
        match changed.iter().position(|arg| arg == flag) {
            Some(at) => changed[at + 1] = value.to_string(),
            None => changed.extend([flag.to_string(), value.to_string()]),
        }
        let stderr = node_serves(&changed).expect_err("started under other settings");
        assert!(
            stderr.contains(&format!("was written under settings digest {digest}"))
                && stderr.contains(flag),
            "{flag}: {stderr}"
        );
    }
    // The replay says when it runs under other settings, and exits non-zero.
    let replay = |extra: &[&str]| {
        let output = Command::new(PERCORE)
            .args(["inspect", "--replay", "--data-dir", data.to_str().unwrap()])
            .args(["--accounts-max", "1024", "--transfers-max", "4096"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success(), stdout)
    };
    let (clean, report) = replay(&[]);
    assert!(clean && !report.contains("PROBLEM"), "{report}");
    let (clean, report) = replay(&["--session-clients-max", "7"]);
    assert!(
        !clean
            && report.contains(&format!(
                "PROBLEM settings: the journal was written under settings digest {digest}"
            )),
        "{report}"
    );
    node_serves(&args).expect("the node starts again under its own settings");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_replica_starts_only_on_its_formatted_directory_and_never_recreates_a_lost_journal() {
    let root = std::env::temp_dir().join(format!("percore-cli-format-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let key = root.join("cluster.key");
    percore_shards::replication::cluster_key_write(&key).unwrap();
    let data = root.join("data");
    let base = percore_shards::cluster::free_port_base(3, 2).expect("free ports");
    let peers: Vec<String> = (0..3)
        .map(|r| format!("127.0.0.1:{}", base + 100 * r))
        .collect();
    let args = |replica: &str| -> Vec<String> {
        let mut args = small_node_args(&data);
        args.extend(
            [
                "--credit-legs-max",
                "1024",
                "--replica",
                replica,
                "--peers",
                &peers.join(","),
                "--cluster-key-file",
                key.to_str().unwrap(),
            ]
            .map(String::from),
        );
        args
    };
    let format = |args: &[String]| {
        let output = Command::new(PERCORE)
            .arg("format")
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // A rotation's accepted key that is the cluster key itself: refused, saying so.
    let mut same = args("0");
    same.extend([
        "--cluster-key-accept-file".into(),
        key.display().to_string(),
    ]);
    let error = node_serves(&same).unwrap_err();
    assert!(error.contains("cluster key itself"), "{error}");

    // Never formatted: refused, and nothing is created.
    let error = node_serves(&args("0")).unwrap_err();
    assert!(error.contains("percore format"), "{error}");
    assert!(!data.join("shard-0").exists());

    let (formatted, stderr) = format(&args("0"));
    assert!(formatted, "{stderr}");
    // Formatted once only.
    let (again, stderr) = format(&args("0"));
    assert!(!again && stderr.contains("formatted once"), "{stderr}");
    // Another replica's arguments on this directory: refused, naming the field.
    let error = node_serves(&args("1")).unwrap_err();
    assert!(error.contains("formatted with replica 0"), "{error}");

    // The first start creates the journals; a restart opens them.
    node_serves(&args("0")).expect("first start");
    for shard in 0..first_core_list().split(',').count() {
        let superblock = data
            .join(format!("shard-{shard}"))
            .join(percore_shards::journal::SUPERBLOCK_FILE_NAME);
        assert!(superblock.exists(), "{}", superblock.display());
    }
    node_serves(&args("0")).expect("restart");

    // A journal lost after the first start is never replaced by an empty one.
    std::fs::remove_dir_all(data.join("shard-0")).unwrap();
    let error = node_serves(&args("0")).unwrap_err();
    assert!(error.contains("is missing"), "{error}");
    assert!(!data.join("shard-0").exists(), "nothing recreated");

    // A wiped data directory is not formatted any more.
    std::fs::remove_dir_all(&data).unwrap();
    let error = node_serves(&args("0")).unwrap_err();
    assert!(error.contains("percore format"), "{error}");

    // `format --replace`: the replica rebuilds from its peers. Its first start creates
    // every journal marked replacing, and the mark stays until it has rebuilt (no peer
    // runs here, so it stays).
    let mut replace = args("0");
    replace.push("--replace".into());
    let (formatted, stderr) = format(&replace);
    assert!(
        formatted && stderr.contains("to replace a replica"),
        "{stderr}"
    );
    let (again, stderr) = format(&replace);
    assert!(!again && stderr.contains("formatted once"), "{stderr}");
    let lines = node_serves(&args("0")).expect("the replacement starts");
    let replacing = lines
        .iter()
        .filter(|line| line.contains("formatted to replace one that lost its disk"))
        .count();
    assert_eq!(
        replacing,
        first_core_list().split(',').count(),
        "{lines:#?}"
    );
    let text = inspect(&data);
    assert!(text.contains(", replacing (format --replace"), "{text}");
    node_serves(&args("0")).expect("a restart while replacing");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A batch ceiling below the adaptive batcher's default floor (16) is a smaller floor,
/// not a refusal naming a setting no flag sets; `format` refuses what `node` would, before
/// it writes the directory; bench flags that cannot work are refused by the parser.
#[test]
fn small_batches_are_taken_and_bad_layouts_and_loads_are_refused_up_front() {
    let mut args = small_node_args_in_memory();
    args.extend(["--batch-entries-max".into(), "8".into()]);
    node_serves(&args).expect("a node with batches of at most 8 entries serves");

    let root = std::env::temp_dir().join(format!("percore-cli-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    let stderr = refused(
        &[
            "format",
            "--cores",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
            "--replica",
            "3",
            "--peers",
            "127.0.0.1:17100,127.0.0.1:17200,127.0.0.1:17300",
        ],
        &[],
    );
    assert!(stderr.contains("replica"), "{stderr}");
    assert!(!data.exists(), "nothing written for a refused layout");
    // With a journal a batch is one entry, which must fit the journal's write buffer: the
    // batch limits are refused by name before anything starts.
    let stderr = refused(
        &[
            "node",
            "--cores",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
            "--batch-entries-max",
            "5000",
            "--batch-bytes-max",
            "2000000",
            "--client-port-base",
            "0",
        ],
        &[],
    );
    let fits = |records: usize| {
        percore_engine::journal::entry_bytes_padded(percore_engine::journal::entry_body_bytes_max(
            records,
            percore_engine::record::RECORD_BYTES,
        )) <= percore_shards::runtime::JOURNAL_WRITE_BUFFER_BYTES
    };
    let fitting = (1..5000).rev().find(|&records| fits(records)).unwrap();
    assert!(fitting > 1000, "the default cap fits: {fitting}");
    assert!(
        stderr.contains("--batch-entries-max 5000")
            && stderr.contains(&format!("at most {fitting} records")),
        "{stderr}"
    );
    assert!(!data.exists(), "nothing written for refused batch limits");
    let _ = std::fs::remove_dir_all(&root);

    for (flag, value) in [
        ("--window", "0"),
        ("--window", "5"),
        ("--accounts-per-shard", "0"),
    ] {
        let stderr = refused(&["bench", flag, value], &[]);
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
    let stderr = refused(&["keygen", "--clients", "0", "--out", "/nonexistent"], &[]);
    assert!(stderr.contains("--clients"), "{stderr}");
    let stderr = refused(&["bench", "--fault-model", "bft", "--rate", "1000"], &[]);
    assert!(stderr.contains("--rate is not supported"), "{stderr}");
}
