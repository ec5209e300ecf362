//! The client against fake replicas on loopback: finding each group's leader through
//! `NotLeader`, `Busy`, closed ports and hung servers; the retry bounds; the single-node
//! client as before.
//!
//! The fakes are std threads speaking the client frame protocol through `engine::frame`; a
//! request carries `u64` records and its reply one `u64` per record (the record plus one),
//! so a test sees which record each result belongs to. Every fake stops when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percore_engine::frame::{self, FRAME_HEADER_BYTES, FrameSchema, Kind, OPERATION_PING};
use percore_net::client::{
    Client, ClientConfig, ClientError, ERROR_NOT_LEADER, ERROR_SERVER_BUSY, ERROR_WRONG_SHARD,
    LeaderProbe, Pipeline,
};

#[path = "../../tests/support/refusing_port.rs"]
mod refusing_port;
use refusing_port::RefusingPort;
mod support {
    pub mod fake_io;
}
use support::fake_io::{FakeServer, read_full};

/// The operation the fakes serve (any code but ping).
const OPERATION: u16 = 3;
const FRAME_BYTES_MAX: usize = 1 << 16;
/// How often a fake's threads look at their stop flag.
const POLL_MS: u64 = 5;

/// The fakes' protocol: `u64` records both ways, none for a ping.
struct TestSchema;

impl FrameSchema for TestSchema {
    fn record_bytes(&self, _kind: Kind, operation: u16) -> Option<usize> {
        Some(if operation == OPERATION_PING { 0 } else { 8 })
    }
}

/// A request a fake received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    replica: usize,
    shard: usize,
    client_id: u128,
    request_number: u64,
    operation: u16,
    records: usize,
}

/// What a fake does with a request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A reply with one result per record.
    Reply,
    /// An error reply with this code; the connection stays open (as the runtime does).
    Error(u32),
    /// Never answers.
    Hang,
}

type Decide = dyn Fn(&Seen) -> Answer + Send + Sync;

fn serve_connection(
    mut stream: TcpStream,
    (replica, shard): (usize, usize),
    decide: &Decide,
    log: &Mutex<Vec<Seen>>,
    stop: &AtomicBool,
) {
    use std::io::Write;
    stream
        .set_read_timeout(Some(Duration::from_millis(POLL_MS)))
        .expect("read timeout");
    let mut buffer = vec![0u8; FRAME_BYTES_MAX];
    loop {
        if !read_full(&mut stream, &mut buffer[..FRAME_HEADER_BYTES], stop) {
            return;
        }
        let header = frame::decode_header(&buffer, FRAME_BYTES_MAX, &TestSchema)
            .expect("the client sends valid headers");
        assert_eq!(header.kind, Kind::Request);
        let body_bytes = header.body_bytes as usize;
        let body_range = FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_bytes;
        if !read_full(&mut stream, &mut buffer[body_range.clone()], stop) {
            return;
        }
        let body = frame::verify_body(&header, &buffer[FRAME_HEADER_BYTES..]).expect("body");
        let mut records = vec![0u64; body.len() / 8];
        if !records.is_empty() {
            frame::read_records(body, &mut records);
        }
        let seen = Seen {
            replica,
            shard,
            client_id: header.envelope.client_id,
            request_number: header.envelope.request_number,
            operation: header.envelope.operation,
            records: records.len(),
        };
        log.lock().unwrap().push(seen);
        let answer = if seen.operation == OPERATION_PING {
            Answer::Reply
        } else {
            decide(&seen)
        };
        let mut reply = vec![0u8; FRAME_BYTES_MAX];
        let bytes = match answer {
            Answer::Reply => {
                let results: Vec<u64> = records.iter().map(|r| r + 1).collect();
                frame::encode_reply(&mut reply, &header.envelope, &results)
            }
            Answer::Error(code) => frame::encode_error_reply(&mut reply, &header.envelope, code),
            Answer::Hang => continue,
        };
        if stream.write_all(&reply[..bytes]).is_err() {
            return;
        }
    }
}

fn spawn_server(
    listener: TcpListener,
    position: (usize, usize),
    decide: Arc<Decide>,
    log: Arc<Mutex<Vec<Seen>>>,
) -> FakeServer {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    listener.set_nonblocking(true).expect("nonblocking");
    let thread = std::thread::spawn(move || {
        let mut connections = Vec::new();
        while !stopping.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    let (decide, log, stop) = (decide.clone(), log.clone(), stopping.clone());
                    connections.push(std::thread::spawn(move || {
                        serve_connection(stream, position, &*decide, &log, &stop);
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(POLL_MS));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        for connection in connections {
            connection.join().expect("fake connection thread");
        }
    });
    FakeServer {
        stop,
        thread: Some(thread),
    }
}

/// A fake cluster: `replicas × shards` listeners, those of the `down` replicas closed.
struct Fleet {
    /// `addresses[r][k]`: replica `r`'s client address for shard `k`.
    addresses: Vec<Vec<SocketAddr>>,
    log: Arc<Mutex<Vec<Seen>>>,
    _servers: Vec<FakeServer>,
    /// The `down` replicas' ports: held, refusing, so no other test's fake takes one.
    _down: Vec<RefusingPort>,
}

impl Fleet {
    fn start(
        replicas: usize,
        shards: usize,
        down: &[usize],
        decide: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let decide: Arc<Decide> = Arc::new(decide);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut addresses = vec![Vec::new(); replicas];
        let (mut servers, mut refusing) = (Vec::new(), Vec::new());
        for (replica, row) in addresses.iter_mut().enumerate() {
            for shard in 0..shards {
                if down.contains(&replica) {
                    // Closed: connecting is refused.
                    let port = RefusingPort::bind().expect("bind");
                    row.push(port.address());
                    refusing.push(port);
                } else {
                    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                    row.push(listener.local_addr().expect("address"));
                    servers.push(spawn_server(
                        listener,
                        (replica, shard),
                        decide.clone(),
                        log.clone(),
                    ));
                }
            }
        }
        Self {
            addresses,
            log,
            _servers: servers,
            _down: refusing,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// Requests of the test operation (pings left out).
    fn requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.operation == OPERATION)
            .collect()
    }
}

/// The leader of `shard` in `view` among `replicas`, as the cluster places it.
fn leader(shard: usize, view: usize, replicas: usize) -> usize {
    usize::from(percore_engine::placement::leader_of(
        shard as u32,
        view as u64,
        replicas as u8,
    ))
}

/// A replicated client config with short bounds for tests.
fn replicated(fleet: &Fleet, client_id: u128, request_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::replicated(fleet.addresses.clone(), client_id);
    config.frame_bytes_max = FRAME_BYTES_MAX;
    config.timeout = Duration::from_secs(10);
    config.request_timeout = Some(request_timeout);
    // Requests numbered from 1, as the assertions expect.
    config.request_number_base = 0;
    config
}

fn submit(client: &mut Client, records: &[u64]) -> Result<Vec<u64>, ClientError> {
    let shards = client.shards();
    client.submit(OPERATION, records, |r: &u64| (*r as usize) % shards)
}

fn plus_one(records: &[u64]) -> Vec<u64> {
    records.iter().map(|r| r + 1).collect()
}

#[test]
fn not_leader_moves_the_hint_and_resends_the_same_request() {
    // One shard, three replicas, view 1: replica 1 leads.
    let fleet = Fleet::start(3, 1, &[], |seen| {
        if seen.replica == leader(0, 1, 3) {
            Answer::Reply
        } else {
            Answer::Error(ERROR_NOT_LEADER)
        }
    });
    let mut client = Client::new(replicated(&fleet, 41, Duration::from_secs(5)));
    assert_eq!(client.leader_hints(), &[0]);
    let records = [10, 20, 30];
    assert_eq!(submit(&mut client, &records).unwrap(), plus_one(&records));
    assert_eq!(client.leader_hints(), &[1]);
    assert_eq!(client.redirects(), 1);
    let requests = fleet.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].replica, 0);
    assert_eq!(requests[1].replica, 1);
    for seen in &requests {
        assert_eq!((seen.client_id, seen.request_number), (41, 1), "a resend");
        assert_eq!(seen.records, 3);
    }
    // The next request goes straight to the leader found.
    assert_eq!(submit(&mut client, &[7]).unwrap(), vec![8]);
    assert_eq!(client.redirects(), 1);
    let last = *fleet.requests().last().unwrap();
    assert_eq!((last.replica, last.request_number), (1, 2));
}

#[test]
fn every_group_finds_its_own_leader() {
    // Two shards, three replicas, view 1: shard 0 is led by replica 1, shard 1 (whose
    // stride is 2) by replica 0.
    let fleet = Fleet::start(3, 2, &[], |seen| {
        if seen.replica == leader(seen.shard, 1, 3) {
            Answer::Reply
        } else {
            Answer::Error(ERROR_NOT_LEADER)
        }
    });
    let mut client = Client::new(replicated(&fleet, 42, Duration::from_secs(5)));
    assert_eq!(client.leader_hints(), &[0, 1], "view-0 leaders");
    let records: Vec<u64> = (100..120).collect();
    assert_eq!(submit(&mut client, &records).unwrap(), plus_one(&records));
    assert_eq!(client.leader_hints(), &[1, 0]);
    // Each hint moved once, to the group's next view's leader.
    assert_eq!(client.redirects(), 2);
    for seen in fleet.requests() {
        assert_eq!(seen.records, 10, "each shard gets its own records only");
    }
}

#[test]
fn a_down_replicas_port_refuses_and_stays_taken() {
    let port = RefusingPort::bind().unwrap();
    let refused = TcpStream::connect(port.address()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // No other socket can bind it while it is held, a listener with SO_REUSEADDR included.
    let taken = TcpListener::bind(port.address()).unwrap_err();
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    let address = port.address();
    drop(port);
    drop(TcpListener::bind(address).expect("free once dropped"));
}

#[test]
fn a_closed_port_is_skipped() {
    // Replica 0 follows, replica 1 is down, replica 2 leads.
    let fleet = Fleet::start(3, 1, &[1], |seen| {
        if seen.replica == 2 {
            Answer::Reply
        } else {
            Answer::Error(ERROR_NOT_LEADER)
        }
    });
    let mut client = Client::new(replicated(&fleet, 43, Duration::from_secs(5)));
    assert_eq!(submit(&mut client, &[5, 6]).unwrap(), vec![6, 7]);
    assert_eq!(client.leader_hints(), &[2]);
    assert_eq!(client.redirects(), 2);
    let replicas: Vec<usize> = fleet.requests().iter().map(|s| s.replica).collect();
    assert_eq!(replicas, vec![0, 2]);
}

#[test]
fn busy_everywhere_backs_off_then_succeeds_within_the_deadline() {
    // Every replica is busy for the first two full rounds (a view change), then replica 2
    // leads.
    const BUSY_TRIES: u32 = 6;
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    let fleet = Fleet::start(3, 1, &[], move |seen| {
        if counted.fetch_add(1, Ordering::Relaxed) < BUSY_TRIES {
            Answer::Error(ERROR_SERVER_BUSY)
        } else if seen.replica == 2 {
            Answer::Reply
        } else {
            Answer::Error(ERROR_NOT_LEADER)
        }
    });
    let mut config = replicated(&fleet, 44, Duration::from_secs(5));
    config.client_retry_backoff_us_min = 20_000;
    config.client_retry_backoff_us_max = 40_000;
    let mut client = Client::new(config);
    let started = Instant::now();
    assert_eq!(submit(&mut client, &[1]).unwrap(), vec![2]);
    let elapsed = started.elapsed();
    // Two pauses, at least half of 20 ms and of 40 ms.
    assert!(
        elapsed >= Duration::from_millis(30),
        "no backoff: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(client.leader_hints(), &[2]);
    let requests = fleet.requests();
    // Two busy rounds (6 tries), then replica 0 refuses, 1 refuses, 2 answers.
    assert_eq!(requests.len(), 9);
    assert!(requests.iter().all(|s| s.request_number == 1));
    assert_eq!(client.redirects(), 8);
}

#[test]
fn all_replicas_down_times_out_typed_within_the_deadline() {
    let fleet = Fleet::start(3, 1, &[0, 1, 2], |_| Answer::Reply);
    let request_timeout = Duration::from_millis(300);
    let mut client = Client::new(replicated(&fleet, 45, request_timeout));
    let started = Instant::now();
    let error = submit(&mut client, &[1]).unwrap_err();
    let elapsed = started.elapsed();
    match &error {
        ClientError::Timeout {
            shard: 0,
            request_number: 1,
            timeout,
            last,
        } => {
            assert_eq!(*timeout, request_timeout);
            assert!(matches!(**last, ClientError::Io { .. }), "{last}");
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(elapsed >= request_timeout, "gave up early: {elapsed:?}");
    assert!(
        elapsed < request_timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
    assert!(client.redirects() >= 3, "went round the replicas");
}

#[test]
fn hung_replicas_time_out_at_the_deadline_not_the_socket_timeout() {
    // Replicas that accept and never answer: the 10 s socket timeout is cut to the deadline.
    let fleet = Fleet::start(3, 1, &[], |_| Answer::Hang);
    let request_timeout = Duration::from_millis(400);
    let mut client = Client::new(replicated(&fleet, 46, request_timeout));
    let started = Instant::now();
    let error = submit(&mut client, &[1]).unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(error, ClientError::Timeout { .. }),
        "expected a timeout, got {error}"
    );
    assert!(
        elapsed < request_timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
    // The first replica held the request until the deadline.
    assert_eq!(fleet.requests()[0].replica, 0);
}

#[test]
fn wrong_shard_returns_at_once_without_retry() {
    let fleet = Fleet::start(3, 1, &[], |_| Answer::Error(ERROR_WRONG_SHARD));
    let mut client = Client::new(replicated(&fleet, 47, Duration::from_secs(5)));
    let error = submit(&mut client, &[1, 2]).unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::WrongShard {
                shard: 0,
                request_number: 1
            }
        ),
        "{error}"
    );
    assert_eq!(fleet.requests().len(), 1, "no retry");
    assert_eq!(client.redirects(), 0);
    assert_eq!(client.leader_hints(), &[0]);
}

#[test]
fn single_node_client_works_as_before() {
    let fleet = Fleet::start(1, 2, &[], |_| Answer::Reply);
    let mut config = ClientConfig::new(fleet.addresses[0].clone(), 48);
    config.frame_bytes_max = FRAME_BYTES_MAX;
    config.request_number_base = 0;
    assert_eq!(config.request_timeout, None);
    let mut client = Client::new(config);
    assert_eq!((client.shards(), client.replica_count()), (2, 1));
    client
        .ping_all(Instant::now() + Duration::from_secs(5))
        .unwrap();
    let records: Vec<u64> = (0..9).collect();
    assert_eq!(submit(&mut client, &records).unwrap(), plus_one(&records));
    assert_eq!(submit(&mut client, &[]).unwrap(), Vec::<u64>::new());
    assert_eq!(client.leader_hints(), &[0, 0]);
    assert_eq!(client.redirects(), 0);
    let requests = fleet.requests();
    assert_eq!(requests.len(), 2, "one request per shard");
    assert!(
        requests
            .iter()
            .all(|s| s.request_number == 3 && s.client_id == 48)
    );
}

#[test]
fn single_node_retries_the_same_replica_then_returns_the_io_error() {
    // A node that is busy twice, then answers: retried in place.
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    let fleet = Fleet::start(1, 1, &[], move |_| {
        if counted.fetch_add(1, Ordering::Relaxed) < 2 {
            Answer::Error(ERROR_SERVER_BUSY)
        } else {
            Answer::Reply
        }
    });
    let mut config = ClientConfig::new(fleet.addresses[0].clone(), 49);
    config.frame_bytes_max = FRAME_BYTES_MAX;
    config.request_number_base = 0;
    let mut client = Client::new(config);
    assert_eq!(submit(&mut client, &[4]).unwrap(), vec![5]);
    assert_eq!(fleet.requests().len(), 3);
    assert!(fleet.requests().iter().all(|s| s.request_number == 1));
    assert_eq!((client.leader_hints(), client.redirects()), (&[0][..], 0));

    // A node that is gone: `attempts_max` attempts, then the socket error, no deadline.
    let gone = Fleet::start(1, 1, &[0], |_| Answer::Reply);
    let mut client = Client::new(ClientConfig::new(gone.addresses[0].clone(), 50));
    let started = Instant::now();
    let error = submit(&mut client, &[4]).unwrap_err();
    assert!(matches!(error, ClientError::Io { shard: 0, .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn connect_leader_skips_followers_and_closed_ports() {
    // Replica 0 follows, replica 1 is down, replica 2 leads.
    let fleet = Fleet::start(3, 1, &[1], |seen| {
        if seen.replica == 2 {
            Answer::Reply
        } else {
            Answer::Error(ERROR_NOT_LEADER)
        }
    });
    let replicas_of_shard: Vec<SocketAddr> = fleet.addresses.iter().map(|r| r[0]).collect();
    let probe = LeaderProbe {
        operation: OPERATION,
        deadline: Instant::now() + Duration::from_secs(5),
    };
    let (mut pipeline, hint) = Pipeline::connect_leader(
        0,
        &replicas_of_shard,
        0,
        51,
        FRAME_BYTES_MAX,
        Duration::from_secs(5),
        probe,
    )
    .unwrap();
    assert_eq!(hint, 2);
    assert_eq!(pipeline.address(), replicas_of_shard[2]);
    assert_eq!(pipeline.in_flight(), 0);
    let probes = fleet.requests();
    assert_eq!(probes.len(), 2);
    assert!(
        probes
            .iter()
            .all(|s| s.records == 0 && s.request_number == 0)
    );
    // The pipeline carries requests as usual.
    pipeline.send(OPERATION, 1, &[41u64, 42]).unwrap();
    let reply = pipeline.receive(8).unwrap();
    assert_eq!(reply.header.envelope.request_number, 1);
    assert_eq!(reply.body, bytemuck::cast_slice::<u64, u8>(&[42, 43]));
}

#[test]
fn a_split_pipeline_sends_from_one_thread_and_receives_in_another() {
    let fleet = Fleet::start(1, 1, &[], |_| Answer::Reply);
    let pipeline = Pipeline::connect(
        0,
        fleet.addresses[0][0],
        53,
        FRAME_BYTES_MAX,
        Duration::from_secs(5),
    )
    .unwrap();
    let (mut sender, mut receiver) = pipeline.split().unwrap();
    const REQUESTS: u64 = 20;
    let sending = std::thread::spawn(move || {
        for request_number in 1..=REQUESTS {
            sender
                .send(OPERATION, request_number, &[request_number * 10])
                .unwrap();
        }
    });
    for request_number in 1..=REQUESTS {
        let reply = receiver.receive(8, request_number).unwrap();
        assert_eq!(reply.header.envelope.request_number, request_number);
        assert_eq!(
            reply.body,
            bytemuck::cast_slice::<u64, u8>(&[request_number * 10 + 1])
        );
    }
    sending.join().unwrap();
    assert_eq!(fleet.requests().len() as u64, REQUESTS);
}

#[test]
fn a_split_receiver_names_a_reply_out_of_order() {
    let fleet = Fleet::start(1, 1, &[], |_| Answer::Reply);
    let pipeline = Pipeline::connect(
        0,
        fleet.addresses[0][0],
        54,
        FRAME_BYTES_MAX,
        Duration::from_secs(5),
    )
    .unwrap();
    let (mut sender, mut receiver) = pipeline.split().unwrap();
    sender.send(OPERATION, 7, &[1u64]).unwrap();
    let error = receiver.receive(8, 6).unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Mismatch {
                expected: 6,
                got: 7,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn connect_leader_times_out_when_no_replica_leads() {
    let fleet = Fleet::start(2, 1, &[], |_| Answer::Error(ERROR_SERVER_BUSY));
    let replicas_of_shard: Vec<SocketAddr> = fleet.addresses.iter().map(|r| r[0]).collect();
    let started = Instant::now();
    let probe = LeaderProbe {
        operation: OPERATION,
        deadline: started + Duration::from_millis(200),
    };
    let error = Pipeline::connect_leader(
        0,
        &replicas_of_shard,
        1,
        52,
        FRAME_BYTES_MAX,
        Duration::from_secs(5),
        probe,
    )
    .unwrap_err();
    assert!(
        matches!(error, ClientError::Timeout { shard: 0, .. }),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(fleet.requests()[0].replica, 1, "asked from the hint on");
}
