//! The authenticated peer transport over loopback: handshakes, frames in order, and every
//! refusal the protocol promises (docs/protocol.md section 3). A "rogue" dialer, built from
//! the engine's public message API, sends the bytes an honest `PeerSender` never would.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use percore_engine::journal::{EntryMeta, encode_entry, entry_bytes_padded};
use percore_engine::message::{
    self, ClusterKey, Command, HANDSHAKE_FRAME_BYTES, HandshakeFrame, HandshakeStep, MessageError,
    NONCE_BYTES, PEER_HEADER_BYTES, PeerHeader, PeerKeys, SessionKey, Transcript, field,
};
use percore_net::peer::{self, PeerError, PeerIdentity, PeerReceiver};

/// Counts allocations per thread, so a test can assert a path allocates nothing.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to `System` unchanged; the counter is a plain thread-local
// `Cell` with const initialisation and no destructor, so touching it never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract; passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract; passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const CLUSTER_ID: u128 = 0x00C0_FFEE;
const GROUP: u32 = 2;
const REPLICA_COUNT: u8 = 3;
const LISTENER: u8 = 0;
const DIALER: u8 = 1;
const BODY_BYTES_MAX: usize = 64 * 1024;
const SEND_BUFFER_BYTES: usize = 256 * 1024;
/// Registered io_uring memory per test executor: the box allows 8 MiB of memlock in all.
const IO_MEMORY_BYTES: usize = 256 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// No test may run longer than this.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

fn cluster_key() -> ClusterKey {
    ClusterKey::new([0x42; 32])
}

/// Digest of the (imaginary) peers list every test node shares.
const PEERS_DIGEST: u64 = 0xD16E57;
/// Digest of the (imaginary) settings every test node shares.
const SETTINGS_DIGEST: u64 = 0x5E77;

fn identity(replica: u8) -> PeerIdentity {
    PeerIdentity {
        cluster_id: CLUSTER_ID,
        group: GROUP,
        replica,
        replica_count: REPLICA_COUNT,
        peers_digest: PEERS_DIGEST,
        settings_digest: SETTINGS_DIGEST,
    }
}

fn nonce(byte: u8) -> [u8; NONCE_BYTES] {
    [byte; NONCE_BYTES]
}

/// Runs `test` on its own small glommio executor under [`TEST_DEADLINE`].
fn run<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(IO_MEMORY_BYTES)
        .spawn(move || async move {
            glommio::timer::timeout(TEST_DEADLINE, async {
                test().await;
                Ok(())
            })
            .await
            .expect("test ran past its deadline");
        })
        .expect("executor starts")
        .join()
        .expect("test executor finished");
}

fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    (listener, address)
}

/// Accepts one connection and runs the listener's handshake as replica [`LISTENER`].
async fn accept_one(
    listener: TcpListener,
    key: ClusterKey,
    timeout: Duration,
) -> Result<PeerReceiver, PeerError> {
    let stream = listener.accept().await.expect("accept");
    peer::accept_handshake(
        stream,
        &identity(LISTENER),
        &key,
        nonce(0xBB),
        timeout,
        None,
    )
    .await
    .map(|accepted| accepted.receiver(vec![0; BODY_BYTES_MAX]))
}

/// Spawns [`accept_one`] with the cluster key and the usual timeout.
fn spawn_acceptor(listener: TcpListener) -> glommio::Task<Result<PeerReceiver, PeerError>> {
    glommio::spawn_local(accept_one(listener, cluster_key(), HANDSHAKE_TIMEOUT))
}

/// A dialer that follows the handshake by hand and then writes whatever bytes it likes.
struct RogueDialer {
    stream: TcpStream,
    session_key: SessionKey,
}

impl RogueDialer {
    async fn connect(address: SocketAddr) -> RogueDialer {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let sent = Transcript {
            cluster_id: CLUSTER_ID,
            group: GROUP,
            from: DIALER,
            to: LISTENER,
            nonce_dialer: nonce(0xAA),
            nonce_listener: [0; NONCE_BYTES],
            peers_digest: PEERS_DIGEST,
            settings_digest: SETTINGS_DIGEST,
        };
        let hello = HandshakeFrame::new(HandshakeStep::Hello, &sent, 0);
        stream.write_all(&hello.encode()).await.expect("hello");
        let mut bytes = [0u8; HANDSHAKE_FRAME_BYTES];
        stream.read_exact(&mut bytes).await.expect("hello reply");
        let reply = HandshakeFrame::decode(&bytes, HandshakeStep::HelloReply).expect("reply");
        let transcript = message::check_hello_reply(&reply, &sent, &cluster_key()).unwrap();
        let mac = message::hello_mac_dialer(&cluster_key(), &transcript);
        let confirm = HandshakeFrame::new(HandshakeStep::HelloConfirm, &transcript, mac);
        stream.write_all(&confirm.encode()).await.expect("confirm");
        RogueDialer {
            stream,
            session_key: message::session_key(&cluster_key(), &transcript),
        }
    }

    /// Header + body of a sealed frame with this sequence.
    fn frame(&self, sequence: u64, body: &[u8]) -> Vec<u8> {
        let mut header = PeerHeader::new(Command::Headers, GROUP, 1, DIALER, 1);
        header.body_bytes = body.len() as u32;
        header.checksum_body = message::body_checksum(body);
        message::seal(&mut header, &self.session_key, sequence);
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("rogue write");
    }
}

/// The error the receiver's first `recv` returns.
async fn first_recv_error(receiver: &mut PeerReceiver) -> PeerError {
    match receiver.recv().await {
        Ok((header, _)) => panic!("accepted {header:?}"),
        Err(err) => err,
    }
}

fn body_of(index: u64) -> Vec<u8> {
    let bytes = (index as usize * 37) % 2000;
    (0..bytes).map(|i| (i as u64 ^ index) as u8).collect()
}

#[test]
fn handshake_and_a_thousand_frames_arrive_in_order() {
    const FRAMES: u64 = 1000;
    run(|| async {
        let (listener, address) = bind();
        let receiving = glommio::spawn_local(async move {
            let mut receiver = accept_one(listener, cluster_key(), HANDSHAKE_TIMEOUT)
                .await
                .expect("listener handshake");
            assert_eq!(receiver.from(), DIALER);
            for index in 1..=FRAMES {
                let (header, body) = receiver.recv().await.expect("frame");
                assert_eq!(header.sequence, index);
                if index % 100 == 0 {
                    assert_eq!(header.command(), Ok(Command::Prepare));
                    assert_eq!(header.field_u64(field::PREPARE_OP), index);
                    let entry =
                        percore_engine::journal::decode_entry(body, BODY_BYTES_MAX).expect("entry");
                    assert_eq!(entry.meta.op, index);
                } else {
                    assert_eq!(header.field_u64(field::PING_TIME_US), index);
                    assert_eq!(body, body_of(index).as_slice());
                }
            }
            receiver.frames_received()
        });

        let mut sender = peer::dial(
            address,
            &identity(DIALER),
            LISTENER,
            &PeerKeys::new(cluster_key()),
            nonce(0xAA),
            HANDSHAKE_TIMEOUT,
            SEND_BUFFER_BYTES,
            None,
        )
        .await
        .expect("dial");
        assert_eq!(sender.to(), LISTENER);
        // Prepared before the loop, so the loop measures `push` alone.
        let bodies: Vec<Vec<u8>> = (1..=FRAMES).map(body_of).collect();
        let entries: Vec<(Vec<u8>, u128)> = (1..=FRAMES / 100).map(|n| entry(n * 100)).collect();
        // The counter sees allocations on this thread (else the zero below proves nothing).
        let before = allocations();
        std::hint::black_box(vec![0u8; 64]);
        assert!(allocations() > before);
        let mut push_allocations = 0;
        for index in 1..=FRAMES {
            let (header, parts) = if index % 100 == 0 {
                let (bytes, checksum) = &entries[(index / 100 - 1) as usize];
                let mut header = PeerHeader::new(Command::Prepare, GROUP, 1, DIALER, 1);
                header.set_field_u64(field::PREPARE_OP, index);
                header.checksum_body = *checksum;
                // Split in two parts, as the runtime sends entry header and records.
                let (entry_header, records) = bytes.split_at(128);
                (header, [entry_header, records])
            } else {
                let body = bodies[(index - 1) as usize].as_slice();
                let mut header = PeerHeader::new(Command::Ping, GROUP, 1, DIALER, 1);
                header.set_field_u64(field::PING_TIME_US, index);
                header.checksum_body = message::body_checksum(body);
                (header, [body, &[][..]])
            };
            loop {
                let before = allocations();
                let pushed = sender.push(header, &parts);
                push_allocations += allocations() - before;
                match pushed {
                    Ok(()) => break,
                    Err(full) => {
                        assert!(full.frame_bytes > full.free_bytes);
                        assert!(
                            sender.buffered_bytes() > 0,
                            "an empty buffer takes any frame"
                        );
                        sender.flush().await.expect("flush");
                    }
                }
            }
            if index % 64 == 0 {
                sender.flush().await.expect("flush");
            }
        }
        sender.flush().await.expect("flush");
        assert_eq!(sender.buffered_bytes(), 0);
        assert_eq!(push_allocations, 0, "push must not allocate");
        assert_eq!(receiving.await, FRAMES);
    });
}

/// A journal entry for `op` (header + records, unpadded) and its checksum.
fn entry(op: u64) -> (Vec<u8>, u128) {
    let records = vec![op as u8; 3 * 128];
    let meta = EntryMeta {
        shard: GROUP,
        view: 1,
        op,
        operation: 1,
        entry_count: 3,
        record_bytes: 128,
        request_count: 0,
    };
    let mut padded = vec![0u8; entry_bytes_padded(records.len())];
    let (_, checksum) = encode_entry(&mut padded, &meta, &records, 0);
    padded.truncate(128 + records.len());
    (padded, checksum)
}

#[test]
fn a_wrong_cluster_key_fails_on_both_sides() {
    run(|| async {
        let (listener, address) = bind();
        let accepting = glommio::spawn_local(accept_one(
            listener,
            ClusterKey::new([0x99; 32]),
            HANDSHAKE_TIMEOUT,
        ));
        let dialed = peer::dial(
            address,
            &identity(DIALER),
            LISTENER,
            &PeerKeys::new(cluster_key()),
            nonce(0xAA),
            HANDSHAKE_TIMEOUT,
            SEND_BUFFER_BYTES,
            None,
        )
        .await;
        assert!(
            matches!(dialed, Err(PeerError::Message(MessageError::BadMac))),
            "{dialed:?}"
        );
        // The dialer hung up without confirming: the listener never authenticates it.
        let accepted = accepting.await;
        assert!(matches!(accepted, Err(PeerError::Closed)), "{accepted:?}");
    });
}

/// During a key rotation a dialer whose cluster key is the new one, holding the old one as
/// accepted, connects to a listener still answering with the old key; the frames flow under
/// the old key, and the sender says the peer used the accepted key. (A dialer that does not
/// hold the listener's key is refused: `a_wrong_cluster_key_fails_on_both_sides`.)
#[test]
fn a_dialer_connects_with_its_accepted_key_during_a_rotation() {
    run(|| async {
        let (old, new) = (cluster_key(), ClusterKey::new([0x5A; 32]));
        let (listener, address) = bind();
        let receiving = glommio::spawn_local(async move {
            let mut receiver = accept_one(listener, cluster_key(), HANDSHAKE_TIMEOUT)
                .await
                .expect("listener handshake");
            let (header, body) = receiver.recv().await.expect("frame");
            assert_eq!(header.field_u64(field::PING_TIME_US), 7);
            body.to_vec()
        });
        let keys = PeerKeys {
            current: new,
            accepted: Some(old),
        };
        let mut sender = peer::dial(
            address,
            &identity(DIALER),
            LISTENER,
            &keys,
            nonce(0xAA),
            HANDSHAKE_TIMEOUT,
            SEND_BUFFER_BYTES,
            None,
        )
        .await
        .expect("dial with the accepted key");
        assert!(sender.by_accepted_key());
        let mut header = PeerHeader::new(Command::Ping, GROUP, 1, DIALER, 1);
        header.set_field_u64(field::PING_TIME_US, 7);
        header.checksum_body = message::body_checksum(b"rotated");
        sender.push(header, &[b"rotated"]).expect("fits");
        sender.flush().await.expect("flush");
        assert_eq!(receiving.await, b"rotated");
    });
}

/// Dials the listener as `me` (to [`LISTENER`]) and returns both sides' outcomes.
async fn dial_refused(me: PeerIdentity, to: u8) -> (PeerError, PeerError) {
    let (listener, address) = bind();
    let accepting = spawn_acceptor(listener);
    let dialed = peer::dial(
        address,
        &me,
        to,
        &PeerKeys::new(cluster_key()),
        nonce(0xAA),
        HANDSHAKE_TIMEOUT,
        SEND_BUFFER_BYTES,
        None,
    )
    .await;
    let accepted = accepting.await;
    (
        dialed.expect_err("dialer must fail"),
        accepted.expect_err("listener must refuse"),
    )
}

#[test]
fn a_foreign_cluster_id_is_refused_without_an_answer() {
    run(|| async {
        let foreign = PeerIdentity {
            cluster_id: CLUSTER_ID + 1,
            ..identity(DIALER)
        };
        let (dialer, listener) = dial_refused(foreign, LISTENER).await;
        assert!(matches!(dialer, PeerError::Closed), "{dialer:?}");
        assert!(
            matches!(
                listener,
                PeerError::Refused {
                    reason: MessageError::ForeignCluster { .. }
                }
            ),
            "{listener:?}"
        );
    });
}

/// A node configured with another peers list, or with other settings that decide results
/// (e.g. another `transfers_max`: it would answer some batches differently from its
/// group), is refused at the handshake without an answer.
#[test]
fn a_different_peers_list_or_settings_are_refused_without_an_answer() {
    run(|| async {
        let other_peers = PeerIdentity {
            peers_digest: PEERS_DIGEST ^ 0xFF,
            ..identity(DIALER)
        };
        let other_settings = PeerIdentity {
            settings_digest: SETTINGS_DIGEST ^ 1,
            ..identity(DIALER)
        };
        for misconfigured in [other_peers, other_settings] {
            let (dialer, listener) = dial_refused(misconfigured, LISTENER).await;
            assert!(matches!(dialer, PeerError::Closed), "{dialer:?}");
            let PeerError::Refused { reason } = listener else {
                panic!("{listener:?}");
            };
            let expected = if misconfigured.peers_digest != PEERS_DIGEST {
                MessageError::PeersMismatch {
                    expected: PEERS_DIGEST,
                    got: PEERS_DIGEST ^ 0xFF,
                }
            } else {
                MessageError::SettingsMismatch {
                    expected: SETTINGS_DIGEST,
                    got: SETTINGS_DIGEST ^ 1,
                }
            };
            assert_eq!(reason, expected);
        }
    });
}

#[test]
fn unknown_peers_and_wrong_targets_are_refused() {
    run(|| async {
        // A replica outside the listener's cluster size.
        let outsider = PeerIdentity {
            replica: 5,
            replica_count: 7,
            ..identity(DIALER)
        };
        let (dialer, listener) = dial_refused(outsider, LISTENER).await;
        assert!(matches!(dialer, PeerError::Closed), "{dialer:?}");
        assert!(
            matches!(
                listener,
                PeerError::Refused {
                    reason: MessageError::UnknownPeer { from: 5 }
                }
            ),
            "{listener:?}"
        );
        // A dialer that thinks the listener is replica 2.
        let (dialer, listener) = dial_refused(identity(DIALER), 2).await;
        assert!(matches!(dialer, PeerError::Closed), "{dialer:?}");
        assert!(
            matches!(
                listener,
                PeerError::Refused {
                    reason: MessageError::WrongTarget { to: 2 }
                }
            ),
            "{listener:?}"
        );
        // An honest dialer never dials itself or a replica outside the cluster.
        let (_, address) = bind();
        for to in [DIALER, REPLICA_COUNT] {
            let dialed = peer::dial(
                address,
                &identity(DIALER),
                to,
                &PeerKeys::new(cluster_key()),
                nonce(0xAA),
                HANDSHAKE_TIMEOUT,
                SEND_BUFFER_BYTES,
                None,
            )
            .await;
            assert!(matches!(dialed, Err(PeerError::InvalidTarget { .. })));
        }
    });
}

#[test]
fn a_hello_claiming_to_be_the_listener_is_refused() {
    run(|| async {
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let impostor = Transcript {
            cluster_id: CLUSTER_ID,
            group: GROUP,
            from: LISTENER,
            to: LISTENER,
            nonce_dialer: nonce(0xAA),
            nonce_listener: [0; NONCE_BYTES],
            peers_digest: PEERS_DIGEST,
            settings_digest: SETTINGS_DIGEST,
        };
        let hello = HandshakeFrame::new(HandshakeStep::Hello, &impostor, 0);
        stream.write_all(&hello.encode()).await.expect("hello");
        let accepted = accepting.await;
        assert!(
            matches!(
                accepted,
                Err(PeerError::Refused {
                    reason: MessageError::UnknownPeer { from: LISTENER }
                })
            ),
            "{accepted:?}"
        );
        // Closed without an answer.
        let mut answer = [0u8; 1];
        assert_eq!(stream.read(&mut answer).await.expect("read"), 0);
    });
}

#[test]
fn garbage_instead_of_a_hello_is_a_typed_error() {
    run(|| async {
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(&[0xEE; 300]).await.expect("garbage");
        let accepted = accepting.await;
        assert!(
            matches!(accepted, Err(PeerError::Message(MessageError::BadMagic))),
            "{accepted:?}"
        );

        // Half a hello, then a hang-up.
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(&[0xEE; 100]).await.expect("garbage");
        drop(stream);
        let accepted = accepting.await;
        assert!(matches!(accepted, Err(PeerError::Closed)), "{accepted:?}");
    });
}

#[test]
fn garbage_after_the_handshake_is_a_typed_error() {
    run(|| async {
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut rogue = RogueDialer::connect(address).await;
        let mut receiver = accepting.await.expect("handshake");
        rogue.send(&[0x17; PEER_HEADER_BYTES]).await;
        let err = first_recv_error(&mut receiver).await;
        assert!(
            matches!(err, PeerError::Message(MessageError::BadMagic)),
            "{err:?}"
        );
        // The connection stays dead.
        assert!(matches!(receiver.recv().await, Err(PeerError::Broken)));
    });
}

#[test]
fn a_flipped_byte_in_a_body_or_a_header_is_rejected() {
    run(|| async {
        let body = [0x33u8; 500];
        for (offset, expected) in [
            (PEER_HEADER_BYTES + 250, MessageError::BadBodyChecksum),
            (57, MessageError::BadMac),
            (3, MessageError::BadMac),
        ] {
            let (listener, address) = bind();
            let accepting = spawn_acceptor(listener);
            let mut rogue = RogueDialer::connect(address).await;
            let mut receiver = accepting.await.expect("handshake");
            let mut frame = rogue.frame(1, &body);
            frame[offset] ^= 0x01;
            rogue.send(&frame).await;
            let err = first_recv_error(&mut receiver).await;
            assert!(
                matches!(err, PeerError::Message(got) if got == expected),
                "offset {offset}: {err:?}"
            );
        }
    });
}

#[test]
fn a_replayed_frame_is_rejected_by_sequence() {
    run(|| async {
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut rogue = RogueDialer::connect(address).await;
        let mut receiver = accepting.await.expect("handshake");
        let frame = rogue.frame(1, b"once only");
        rogue.send(&frame).await;
        rogue.send(&frame).await;
        let (header, body) = receiver.recv().await.expect("first copy");
        assert_eq!((header.sequence, body), (1, &b"once only"[..]));
        let err = first_recv_error(&mut receiver).await;
        assert!(
            matches!(
                err,
                PeerError::Message(MessageError::BadSequence {
                    expected: 2,
                    got: 1
                })
            ),
            "{err:?}"
        );
    });
}

#[test]
fn an_oversize_or_unauthentic_size_is_refused_before_the_body_is_read() {
    run(|| async {
        // The rogue sends only headers and keeps the connection open: a receiver that waited
        // for the announced body would hang until the test deadline.
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut rogue = RogueDialer::connect(address).await;
        let mut receiver = accepting.await.expect("handshake");
        let mut header = PeerHeader::new(Command::Headers, GROUP, 1, DIALER, 1);
        header.body_bytes = (BODY_BYTES_MAX + 1) as u32;
        message::seal(&mut header, &rogue.session_key, 1);
        rogue.send(header.as_bytes()).await;
        let err = first_recv_error(&mut receiver).await;
        assert!(
            matches!(
                err,
                PeerError::Message(MessageError::BodyTooLarge { body_bytes, max })
                    if body_bytes as usize == BODY_BYTES_MAX + 1 && max == BODY_BYTES_MAX
            ),
            "{err:?}"
        );

        // A size within bounds but under a bad MAC is not trusted either.
        let (listener, address) = bind();
        let accepting = spawn_acceptor(listener);
        let mut rogue = RogueDialer::connect(address).await;
        let mut receiver = accepting.await.expect("handshake");
        let mut header = PeerHeader::new(Command::Headers, GROUP, 1, DIALER, 1);
        header.body_bytes = 1000;
        message::seal(&mut header, &SessionKey::new([7; 32]), 1);
        rogue.send(header.as_bytes()).await;
        let err = first_recv_error(&mut receiver).await;
        assert!(
            matches!(err, PeerError::Message(MessageError::BadMac)),
            "{err:?}"
        );
        drop(rogue);
    });
}

#[test]
fn a_silent_dialer_times_the_handshake_out() {
    const TIMEOUT: Duration = Duration::from_millis(200);
    run(|| async {
        let (listener, address) = bind();
        let accepting = glommio::spawn_local(accept_one(listener, cluster_key(), TIMEOUT));
        let start = Instant::now();
        let stream = TcpStream::connect(address).await.expect("connect");
        let accepted = accepting.await;
        let elapsed = start.elapsed();
        assert!(matches!(accepted, Err(PeerError::Timeout)), "{accepted:?}");
        assert!(elapsed >= TIMEOUT, "timed out early: {elapsed:?}");
        assert!(elapsed < TIMEOUT * 10, "timed out late: {elapsed:?}");
        drop(stream);
    });
}

#[test]
fn os_nonces_are_fresh() {
    let first = peer::os_nonce().expect("nonce");
    let second = peer::os_nonce().expect("nonce");
    assert_ne!(first, second);
    assert_ne!(first, [0; NONCE_BYTES]);
}

/// BFT mode: the listener takes a dialer as replica `from` only with `from`'s signature of
/// the handshake; the cluster key, which every replica holds, is not enough.
#[test]
fn with_replica_signing_a_dialer_must_sign_as_the_replica_it_claims() {
    use percore_engine::bft::SigningKey;
    let secret: Vec<SigningKey> = (0..REPLICA_COUNT)
        .map(|replica| SigningKey::from_bytes(&[replica + 7; 32]))
        .collect();
    let public: Vec<_> = secret.iter().map(SigningKey::verifying_key).collect();
    for (signer, accepted) in [(DIALER, true), (2, false)] {
        let (secret, public) = (secret.clone(), public.clone());
        run(move || async move {
            let (listener, address) = bind();
            let acceptor = {
                let public = public.clone();
                glommio::spawn_local(async move {
                    let stream = listener.accept().await.expect("accept");
                    let signing = peer::ReplicaSigning {
                        key: &secret[usize::from(LISTENER)],
                        replicas: &public,
                    };
                    peer::accept_handshake(
                        stream,
                        &identity(LISTENER),
                        &cluster_key(),
                        nonce(0xBB),
                        HANDSHAKE_TIMEOUT,
                        Some(signing),
                    )
                    .await
                    .map(|accepted| accepted.from())
                })
            };
            let dialer_key = SigningKey::from_bytes(&[signer + 7; 32]);
            let signing = peer::ReplicaSigning {
                key: &dialer_key,
                replicas: &public,
            };
            let _sender = peer::dial(
                address,
                &identity(DIALER),
                LISTENER,
                &PeerKeys::new(cluster_key()),
                nonce(0xAA),
                HANDSHAKE_TIMEOUT,
                SEND_BUFFER_BYTES,
                Some(signing),
            )
            .await
            .expect("the MACs check out either way");
            match acceptor.await {
                Ok(from) => assert!(accepted && from == DIALER, "accepted from {from}"),
                Err(PeerError::Refused {
                    reason: MessageError::BadSignature { from },
                }) => assert!(!accepted && from == DIALER, "refused {from}"),
                Err(other) => panic!("{other}"),
            }
        });
    }
}
