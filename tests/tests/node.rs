//! A real node on loopback: two pinned shards on io_uring, driven through the client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use percore_engine::frame::{self, Envelope, FRAME_HEADER_BYTES, Kind, Operation};
use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_engine::record::{CreateTransferResult, RecordResult, Transfer, shard_of};
use percore_net::client::{Client, ClientConfig, ClientError, Pipeline};
use percore_shards::loadgen::{create_funded_accounts, route_transfer, transfer};
use percore_shards::runtime::{Node, NodeConfig, ShardReport};

const SHARDS: usize = 2;

fn start_node() -> Node<Ledger> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = NodeConfig {
        cores: (0..SHARDS).map(|shard| shard % online).collect(),
        client_port_base: 0,
        transactions: 4_096,
        batches: 64,
        allow_shared_cores: true,
        ..NodeConfig::default()
    };
    let ledger = LedgerConfig {
        shard_index: 0,
        shard_count: SHARDS as u32,
        accounts_max: 1_024,
        transfers_max: 65_536,
        credit_legs_in_flight_max: 65_536,
        batch_entries_max: config.batch.entries_max,
    };
    Node::start(config, move |shard, _| {
        Ledger::new(LedgerConfig {
            shard_index: shard as u32,
            ..ledger
        })
    })
    .expect("node starts")
}

/// Shuts `node` down and asserts it took less than 5 s (nothing held the shutdown).
fn shutdown_promptly(node: Node<Ledger>) -> Vec<ShardReport<Ledger>> {
    let stopping = Instant::now();
    let reports = node.shutdown().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    reports
}

fn client(node: &Node<Ledger>, client_id: u128) -> Client {
    let mut client = Client::new(ClientConfig::new(
        node.client_addresses().to_vec(),
        client_id,
    ));
    client
        .ping_all(Instant::now() + Duration::from_secs(10))
        .expect("node answers pings");
    client
}

/// A mint (may go negative) and `count` accounts per shard, each funded from its mint.
fn setup(client: &mut Client, count: usize, funding: u128) -> Vec<Vec<u128>> {
    create_funded_accounts(client, count, funding).expect("accounts created and funded")
}

fn balance(reports: &[ShardReport<Ledger>], id: u128) -> i128 {
    let shard = shard_of(id, SHARDS as u32) as usize;
    let account = reports[shard]
        .state_machine
        .lookup_account(id)
        .expect("account exists");
    account.credits_posted as i128 - account.debits_posted as i128
}

fn assert_conserved(reports: &[ShardReport<Ledger>]) {
    let in_flight: u128 = reports.iter().map(|r| r.state_machine.in_flight()).sum();
    assert_eq!(in_flight, 0, "shutdown drains every credit leg");
    let sum: i128 = reports
        .iter()
        .map(|r| r.state_machine.conservation_sum())
        .sum();
    assert_eq!(
        sum, 0,
        "double entry: money is neither created nor destroyed"
    );
}

#[test]
fn transfers_apply_across_shards_and_balances_conserve() {
    let node = start_node();
    let mut client = client(&node, 1);
    let accounts = setup(&mut client, 16, 1_000);
    let all: Vec<u128> = accounts
        .iter()
        .flat_map(|ids| ids[1..].iter().copied())
        .collect();
    // A deterministic mix of local and cross-shard transfers.
    let mut expected = std::collections::HashMap::<u128, i128>::new();
    for id in &all {
        expected.insert(*id, 1_000);
    }
    let mut next_id = 1u128 << 100;
    for round in 0..20 {
        let transfers: Vec<Transfer> = (0..64)
            .map(|k| {
                let debit = all[(round * 7 + k * 3) % all.len()];
                let mut credit = all[(round * 11 + k * 5 + 1) % all.len()];
                if credit == debit {
                    credit = all[(round * 11 + k * 5 + 2) % all.len()];
                }
                next_id += 1;
                transfer(next_id, debit, credit, 1 + (k as u128 % 5))
            })
            .collect();
        let results: Vec<RecordResult> = client
            .submit(
                Operation::CreateTransfers.into(),
                &transfers,
                |t: &Transfer| route_transfer(t, SHARDS),
            )
            .unwrap();
        for (t, r) in transfers.iter().zip(&results) {
            assert_eq!(r.code, CreateTransferResult::Ok as u32, "transfer {t:?}");
            *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
            *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
        }
    }
    // Insufficient funds is refused and changes nothing.
    let poor = all[0];
    let greedy = transfer(next_id + 1, poor, all[1], 1_000_000);
    let results: Vec<RecordResult> = client
        .submit(
            Operation::CreateTransfers.into(),
            &[greedy],
            |t: &Transfer| route_transfer(t, SHARDS),
        )
        .unwrap();
    assert_eq!(results[0].code, CreateTransferResult::ExceedsCredits as u32);

    let reports = node.shutdown().expect("clean shutdown");
    assert_conserved(&reports);
    for (id, want) in &expected {
        assert_eq!(balance(&reports, *id), *want, "balance of {id:#x}");
    }
}

#[test]
fn a_retried_transfer_is_not_applied_twice() {
    let node = start_node();
    let mut client = client(&node, 2);
    let accounts = setup(&mut client, 2, 100);
    let (a, b) = (accounts[0][1], accounts[1][1]);
    let t = transfer(42 << 64, a, b, 10);
    let first: Vec<RecordResult> = client
        .submit(Operation::CreateTransfers.into(), &[t], |t: &Transfer| {
            route_transfer(t, SHARDS)
        })
        .unwrap();
    assert_eq!(first[0].code, CreateTransferResult::Ok as u32);
    // The same transfer again, as a client retry after a lost reply would send it.
    let mut other = client_with_fresh_connections(&node, 2);
    let again: Vec<RecordResult> = other
        .submit(Operation::CreateTransfers.into(), &[t], |t: &Transfer| {
            route_transfer(t, SHARDS)
        })
        .unwrap();
    assert_eq!(again[0].code, CreateTransferResult::Exists as u32);
    let reports = node.shutdown().unwrap();
    assert_eq!(balance(&reports, a), 90);
    assert_eq!(balance(&reports, b), 110);
    assert_conserved(&reports);
}

/// `percore_request_latency_seconds` is request arrival to reply: a connection's idle time
/// before a request (here 1.5 s) is not part of it.
#[test]
fn request_latency_excludes_the_wait_for_the_next_request() {
    const IDLE_MS: u64 = 1_500;
    const BOUND_US: u64 = 1_000_000;
    let node = start_node();
    let mut client = client(&node, 3);
    let accounts = setup(&mut client, 2, 100);
    let (a, b) = (accounts[0][1], accounts[0][2]);
    let route = |t: &Transfer| route_transfer(t, SHARDS);
    let shard = route(&transfer(1, a, b, 1));
    let before = node.metrics()[shard].request_latency.count();
    for id in 1..=2u128 {
        std::thread::sleep(Duration::from_millis(IDLE_MS));
        let results: Vec<RecordResult> = client
            .submit(
                Operation::CreateTransfers.into(),
                &[transfer((7 << 64) + id, a, b, 1)],
                route,
            )
            .unwrap();
        assert_eq!(results[0].code, CreateTransferResult::Ok as u32);
    }
    let histogram = &node.metrics()[shard].request_latency;
    // Recorded once the reply is written, which may be just after the client read it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while histogram.count() - before < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(histogram.count() - before, 2, "both requests recorded");
    let over: u64 = histogram
        .buckets()
        .iter()
        .zip(
            percore_shards::metrics::LATENCY_BUCKETS_US
                .iter()
                .map(Some)
                .chain([None]),
        )
        .filter(|(_, bound)| bound.is_none_or(|&us| us > BOUND_US))
        .map(|(count, _)| count)
        .sum();
    assert_eq!(
        over, 0,
        "no request took over {BOUND_US} µs from arrival to reply"
    );
    // Each request was its own batch (1.5 s apart), and each batch's apply is timed.
    let applied = node.metrics()[shard].apply_latency.count();
    assert!(applied >= 2, "{applied} batch applies recorded");
    let reports = node.shutdown().unwrap();
    assert_conserved(&reports);
}

fn client_with_fresh_connections(node: &Node<Ledger>, client_id: u128) -> Client {
    client(node, client_id)
}

fn raw_exchange(address: SocketAddr, bytes: &[u8]) -> (Option<frame::DecodedHeader>, bool) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let decoded = match stream.read_exact(&mut header) {
        Ok(()) => Some(
            frame::decode_header(
                &header,
                frame::FRAME_BYTES_MAX_DEFAULT,
                &frame::ReplySchema {
                    reply_record_bytes: 8,
                },
            )
            .expect("server replies decode"),
        ),
        Err(_) => None,
    };
    // After an error reply the server closes the connection.
    let mut rest = [0u8; 1];
    let closed = matches!(stream.read(&mut rest), Ok(0));
    (decoded, closed)
}

#[test]
fn malformed_frames_get_typed_errors_and_lose_nothing() {
    let node = start_node();
    let mut good = client(&node, 3);
    let accounts = setup(&mut good, 2, 100);
    let address = node.client_addresses()[0];

    // Garbage: bad magic.
    let (reply, closed) = raw_exchange(address, &[0xAB; FRAME_HEADER_BYTES]);
    let reply = reply.expect("an error reply");
    assert_eq!(reply.kind, Kind::ErrorReply);
    assert_eq!(reply.error_code, frame::ErrorCode::BadMagic as u32);
    assert!(closed);

    // A valid header whose body checksum is wrong.
    let envelope = Envelope {
        client_id: 9,
        request_number: 1,
        operation: Operation::CreateTransfers.into(),
        shard: 0,
    };
    let mut buffer = vec![0u8; FRAME_HEADER_BYTES + 128];
    let t = transfer(77 << 64, accounts[0][1], accounts[0][2], 1);
    let bytes = frame::encode_request(&mut buffer, &envelope, &[t]);
    buffer[bytes - 1] ^= 0x01;
    let (reply, closed) = raw_exchange(address, &buffer[..bytes]);
    let reply = reply.expect("an error reply");
    assert_eq!(reply.error_code, frame::ErrorCode::BodyChecksum as u32);
    assert_eq!(
        reply.envelope.request_number, 1,
        "the reply names the refused request"
    );
    assert!(closed);

    // Oversize: more records than one frame may carry here.
    let many = vec![t; 4_000];
    let mut big = vec![0u8; FRAME_HEADER_BYTES + many.len() * 128];
    let bytes = frame::encode_request(&mut big, &envelope, &many);
    let (reply, _) = raw_exchange(address, &big[..bytes]);
    assert_eq!(
        reply.expect("an error reply").error_code,
        frame::ErrorCode::TooLarge as u32
    );

    // Operations clients may not submit: a lookup this machine does not serve, and the
    // internal credit-leg operation (code 256) that only shards send each other.
    for operation in [Operation::LookupAccounts.into(), 256u16] {
        let mut header_only = [0u8; FRAME_HEADER_BYTES];
        let refused = Envelope {
            operation,
            ..envelope
        };
        let bytes = frame::encode_request::<u128>(&mut header_only, &refused, &[]);
        let (reply, closed) = raw_exchange(address, &header_only[..bytes]);
        assert_eq!(
            reply.expect("an error reply").error_code,
            frame::ErrorCode::UnknownOperation as u32,
            "operation {operation}"
        );
        assert!(closed);
    }

    // The node still serves, and the refused transfer was never applied.
    let fine: Vec<RecordResult> = good
        .submit(Operation::CreateTransfers.into(), &[t], |t: &Transfer| {
            route_transfer(t, SHARDS)
        })
        .unwrap();
    assert_eq!(
        fine[0].code,
        CreateTransferResult::Ok as u32,
        "id 77<<64 was free: the corrupt frame changed nothing"
    );
    let reports = node.shutdown().unwrap();
    assert_eq!(balance(&reports, accounts[0][1]), 99);
    assert_conserved(&reports);
}

#[test]
fn shutdown_answers_or_refuses_every_request_and_drains() {
    let node = start_node();
    let mut setup_client = client(&node, 4);
    let accounts = setup(&mut setup_client, 8, 1_000_000);
    let address = node.client_addresses()[0];
    let local = &accounts[0][1..];
    let mut pipeline = Pipeline::connect(
        0,
        address,
        5,
        frame::FRAME_BYTES_MAX_DEFAULT,
        Duration::from_secs(10),
    )
    .unwrap();
    let requests = 256u64;
    let per_request = 100usize;
    let mut sent = Vec::new();
    for request in 1..=requests {
        let transfers: Vec<Transfer> = (0..per_request)
            .map(|k| {
                let id = (9 << 120) | ((request as u128) << 32) | k as u128;
                transfer(id, local[k % local.len()], local[(k + 1) % local.len()], 1)
            })
            .collect();
        pipeline
            .send(Operation::CreateTransfers.into(), request, &transfers)
            .unwrap();
        sent.push(transfers);
    }
    // Wait for the first answer so the node is mid-stream, then stop it.
    let first = pipeline.receive(8).expect("first reply");
    assert_eq!(first.header.envelope.request_number, 1);
    let stop = node.stop_flag();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 1u64;
    loop {
        match pipeline.receive(8) {
            Ok(reply) => {
                answered += 1;
                assert_eq!(
                    reply.header.envelope.request_number, answered,
                    "answers arrive in order"
                );
            }
            Err(ClientError::Io { .. }) => break,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let reports = node.wait().unwrap();
    // The stop landed mid-stream: some requests were sent and never answered (else the
    // check below of unanswered ones checks nothing).
    eprintln!("{answered} of {requests} requests answered before the stop");
    assert!(answered < requests, "the stop came after every request");
    // Every answered request is applied in full; no unanswered request is applied at all.
    for (index, transfers) in sent.iter().enumerate() {
        let applied = transfers
            .iter()
            .filter(|t| reports[0].state_machine.lookup_transfer(t.id).is_some())
            .count();
        if (index as u64) < answered {
            assert_eq!(applied, per_request, "request {} was answered", index + 1);
        } else {
            assert_eq!(applied, 0, "request {} was never answered", index + 1);
        }
    }
    assert_conserved(&reports);
}

#[test]
fn a_port_in_use_is_refused_with_a_typed_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = NodeConfig {
        cores: vec![0],
        client_port_base: port,
        transactions: 1_024,
        batches: 16,
        ..NodeConfig::default()
    };
    let ledger = LedgerConfig {
        shard_count: 1,
        ..LedgerConfig::new(0, 1)
    };
    match Node::start(config, move |_, _| Ledger::new(ledger)) {
        Err(percore_shards::runtime::NodeError::Listen {
            shard: 0, address, ..
        }) => {
            assert_eq!(address.port(), port);
        }
        Err(other) => panic!("expected a Listen error, got {other}"),
        Ok(_) => panic!("a second listener on a taken port must be refused"),
    }
}

#[test]
fn a_client_stalled_mid_frame_loses_its_connection_and_holds_no_shutdown() {
    let node = start_node();
    let address = node.client_addresses()[0];
    let partial = |bytes: usize| {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(&vec![0u8; bytes]).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream
    };
    // Part of a header, then nothing: the node closes the connection once the frame has
    // been arriving for longer than the timeout.
    let mut stalled = partial(10);
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = stalled.read(&mut byte);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "the connection stays open: {read:?}"
    );
    let timeout = Duration::from_millis(percore_shards::runtime::CLIENT_FRAME_READ_TIMEOUT_MS);
    assert!(
        waited >= timeout - Duration::from_millis(100) && waited < timeout * 3,
        "closed after {waited:?}"
    );
    // Another stalls mid-header; shutdown does not wait for it to finish the frame.
    let _held = partial(10);
    std::thread::sleep(Duration::from_millis(100));
    let reports = shutdown_promptly(node);
    assert_conserved(&reports);
}

/// After an error reply the node reads what the client sent for a moment (so that closing
/// sends FIN, not an RST that could destroy the reply), but not for as long as a client
/// keeps trickling bytes: the connection, and with it the shutdown, was held one byte at a
/// time for up to a frame's worth (about an hour at a byte every 20 ms).
#[test]
fn a_client_trickling_after_an_error_reply_holds_no_shutdown() {
    let node = start_node();
    let address = node.client_addresses()[0];
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&[0xAB; FRAME_HEADER_BYTES]).unwrap();
    let mut reply = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut reply).expect("an error reply");
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let (mut stream, stop) = (stream.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && stream.write_all(&[0]).is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The node closes the connection within its drain bound, trickle or not.
    let started = Instant::now();
    let mut rest = [0u8; 1];
    let read = stream.read(&mut rest);
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "the connection stays open: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    let reports = shutdown_promptly(node);
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    assert_conserved(&reports);
}

/// Dropping a node stops it and waits for its shards: they went on serving (and
/// journaling), detached, and a node with a data directory released its lock meanwhile.
#[test]
fn a_dropped_node_stops_its_shards() {
    let node = start_node();
    let address = node.client_addresses()[0];
    drop(TcpStream::connect(address).expect("the node accepts"));
    drop(node);
    assert!(
        TcpStream::connect(address).is_err(),
        "a shard still accepts connections after its node was dropped"
    );
}
