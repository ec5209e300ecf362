//! The BFT client against fake replicas on loopback: a replica that stops reading does not
//! hold up the others, and a late reply to an earlier request of another operation does not
//! cost a replica's connection.
//!
//! The fakes are std threads: each replica's listener serves every connection in a thread of
//! its own, reading signed requests of `u64` records and answering, as the test decides, one
//! result per record (`u64` for [`OPERATION_SMALL`], `u128` for [`OPERATION_LARGE`], the
//! record plus one), after a delay, or never. A "sink" replica accepts connections and never
//! reads. Every fake stops when dropped.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use percore_engine::bft::SigningKey;
use percore_engine::frame::{self, FRAME_HEADER_BYTES, FrameSchema, Kind};
use percore_net::client::{BftClient, ClientConfig};

mod support {
    pub mod fake_io;
}
use support::fake_io::{FakeServer, read_full};

/// Requests whose results are `u64`s.
const OPERATION_SMALL: u16 = 3;
/// Requests whose results are `u128`s.
const OPERATION_LARGE: u16 = 4;
const FRAME_BYTES_MAX: usize = 1 << 20;
const REPLICAS: usize = 4;
const FAULTS: usize = 1;
const POLL_MS: u64 = 5;

/// Requests carry `u64` records.
struct RequestSchema;

impl FrameSchema for RequestSchema {
    fn record_bytes(&self, _kind: Kind, _operation: u16) -> Option<usize> {
        Some(8)
    }
}

/// What a fake replica does with request `request_number` of `operation`.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Results after this delay.
    After(Duration),
    /// Never answers.
    Hang,
}

type Decide = dyn Fn(usize, u64, u16) -> Answer + Send + Sync;

fn serve(mut stream: TcpStream, replica: usize, decide: &Decide, stop: &AtomicBool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(POLL_MS)))
        .unwrap();
    let mut buffer = vec![0u8; FRAME_BYTES_MAX];
    loop {
        if !read_full(&mut stream, &mut buffer[..FRAME_HEADER_BYTES], stop) {
            return;
        }
        let header = frame::decode_header(&buffer, FRAME_BYTES_MAX, &RequestSchema)
            .expect("the client sends valid headers");
        assert_eq!(header.kind, Kind::SignedRequest);
        let body_bytes = header.body_bytes as usize;
        if !read_full(
            &mut stream,
            &mut buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_bytes],
            stop,
        ) {
            return;
        }
        let records_bytes = body_bytes - frame::SIGNATURE_TRAILER_BYTES;
        let mut records = vec![0u64; records_bytes / 8];
        frame::read_records(
            &buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + records_bytes],
            &mut records,
        );
        let envelope = header.envelope;
        let delay = match decide(replica, envelope.request_number, envelope.operation) {
            Answer::After(delay) => delay,
            Answer::Hang => continue,
        };
        let mut reply = vec![0u8; FRAME_BYTES_MAX];
        let bytes = if envelope.operation == OPERATION_LARGE {
            let results: Vec<u128> = records.iter().map(|r| u128::from(*r) + 1).collect();
            frame::encode_reply(&mut reply, &envelope, &results)
        } else {
            let results: Vec<u64> = records.iter().map(|r| r + 1).collect();
            frame::encode_reply(&mut reply, &envelope, &results)
        };
        std::thread::sleep(delay);
        if stream.write_all(&reply[..bytes]).is_err() {
            return;
        }
    }
}

/// A fake replica; with `sink`, one whose connections are accepted and never read, with a
/// small receive buffer so that they fill soon.
fn spawn(replica: usize, sink: bool, decide: Arc<Decide>) -> (SocketAddr, FakeServer) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    if sink {
        let bytes: libc::c_int = 4096;
        // SAFETY: a valid socket descriptor and a pointer to a live `c_int` of the size
        // passed; accepted sockets inherit the option.
        let set = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const bytes).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
    }
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        let mut threads = Vec::new();
        while !stopping.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    if sink {
                        held.push(stream);
                        continue;
                    }
                    let (decide, stop) = (decide.clone(), stopping.clone());
                    threads.push(std::thread::spawn(move || {
                        serve(stream, replica, &*decide, &stop)
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(POLL_MS));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        for thread in threads {
            thread.join().unwrap();
        }
    });
    (
        address,
        FakeServer {
            stop,
            thread: Some(thread),
        },
    )
}

/// Four fake replicas of one shard (`sink`: replica 0 never reads) and a client of them.
fn cluster(
    sink: bool,
    decide: impl Fn(usize, u64, u16) -> Answer + Send + Sync + 'static,
    request_timeout: Duration,
) -> (BftClient, Vec<FakeServer>) {
    let decide: Arc<Decide> = Arc::new(decide);
    let (addresses, fakes): (Vec<Vec<SocketAddr>>, Vec<FakeServer>) = (0..REPLICAS)
        .map(|replica| {
            let (address, fake) = spawn(replica, sink && replica == 0, decide.clone());
            (vec![address], fake)
        })
        .unzip();
    let mut config = ClientConfig::replicated(addresses, 5);
    config.request_timeout = Some(request_timeout);
    config.frame_bytes_max = FRAME_BYTES_MAX;
    let client = BftClient::new(config, FAULTS, SigningKey::from_bytes(&[9; 32]));
    (client, fakes)
}

/// A replica that accepts and never reads fills its socket; the client's write to it must
/// not wait out the request (it waited for the whole timeout it set at connect, sending
/// nothing to the others meanwhile), and the three others answer.
#[test]
fn a_replica_that_stops_reading_does_not_hold_up_the_request() {
    let (mut client, _fakes) = cluster(
        true,
        |_, _, _| Answer::After(Duration::ZERO),
        Duration::from_secs(3),
    );
    let records: Vec<u64> = (0..60_000).collect();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let started = Instant::now();
        let results: Vec<u64> = client
            .submit(OPERATION_SMALL, &records, |_| 0)
            .expect("f + 1 replicas answer");
        slowest = slowest.max(started.elapsed());
        assert_eq!(results[7], 8);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?} on a replica that does not read"
    );
}

/// The replies to request 1 agree at replicas 0-2 while replica 3's comes late; request 2
/// (another operation: larger results) needs replica 3, which the client finds with the
/// late reply in front of the one it waits for. That reply is skipped, not taken as a bad
/// frame (which dropped the connection and waited out a round, 2 s).
#[test]
fn a_late_reply_of_another_operation_is_skipped() {
    let (mut client, _fakes) = cluster(
        false,
        |replica, _, operation| match (operation, replica) {
            (OPERATION_SMALL, 3) => Answer::After(Duration::from_millis(200)),
            (OPERATION_SMALL, _) => Answer::After(Duration::ZERO),
            // The second request: replicas 0 and 1 do not answer.
            (_, 0 | 1) => Answer::Hang,
            _ => Answer::After(Duration::ZERO),
        },
        Duration::from_secs(10),
    );
    let small: Vec<u64> = client
        .submit(OPERATION_SMALL, &[1u64, 2], |_| 0)
        .expect("first request");
    assert_eq!(small, [2, 3]);
    // Replica 3's reply to the first request arrives meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let large: Vec<u128> = client
        .submit(OPERATION_LARGE, &[5u64], |_| 0)
        .expect("second request");
    assert_eq!(large, [6]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the second request took {:?}",
        started.elapsed()
    );
}
