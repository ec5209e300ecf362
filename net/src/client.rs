//! The Rust client: finds each replication group's leader, routes records to the owning
//! shard's port, pipelines requests, retries.
//!
//! A [`Client`] holds one TCP connection per shard. [`Client::submit`] splits records by
//! their owning shard (the caller's routing function, e.g. `shard_of(debit_account_id)`),
//! sends one request frame per shard before reading any reply (so shards work in parallel),
//! and reassembles the per-record results in the caller's order.
//!
//! Group `k` is served by shard `k` of every replica; a single node is a group of one. The
//! client keeps, per shard, a leader hint: a replica index, first the view-0 leader `k mod N`.
//! An error reply `NotLeader` or `Busy`, a failed connection or a timeout moves the hint to
//! the replica that leads the group's next view after the hinted one
//! ([`percore_engine::placement::leader_next`]: after a failover that is the new leader) and
//! resends at once with the **same client id and request number**, so
//! the server (and the ledger's transfer-id idempotency: a transfer applied by an earlier
//! try answers `Exists`) can recognise the retry. After each full round of the N replicas
//! without an answer the client pauses, from `client_retry_backoff_us_min` doubling up to
//! `_max`, jittered; it gives up after `attempts_max` rounds or at `request_timeout`. Any
//! other refusal (`WrongShard` above all) is the caller's to handle and returns at once.
//!
//! [`Pipeline`] is the lower-level interface for load generators: one connection, many
//! requests in flight, replies matched by request number. [`Pipeline::connect_leader`]
//! finds a group's leader for one; [`Pipeline::split`] gives its two directions to two
//! threads (a sender keeping a schedule, a receiver waiting for replies).
//!
//! This client uses blocking std sockets so any application thread can embed it; the server
//! side is io_uring. Every retry loop here is bounded, by rounds or by a deadline.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use percore_engine::bft::{RequestStatement, SigningKey};
use percore_engine::frame::{
    self, DecodedHeader, Envelope, FRAME_HEADER_BYTES, FrameError, Kind, ReplySchema,
};
use percore_engine::placement;

/// Default rounds for one request, the first included (a round asks each replica once).
pub const ATTEMPTS_MAX_DEFAULT: u32 = 5;
/// Default socket timeout (connect, read, write).
pub const TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default deadline of one replicated request, every redirect and pause included (ms).
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default first pause after a full round of replicas without an answer (µs).
pub const CLIENT_RETRY_BACKOFF_US_MIN_DEFAULT: u64 = 1_000;
/// Default longest pause between rounds (µs).
pub const CLIENT_RETRY_BACKOFF_US_MAX_DEFAULT: u64 = 500_000;
/// The pause between attempts of a single-node client ([`ClientConfig::new`]), as it always
/// was (µs).
pub const SINGLE_NODE_RETRY_BACKOFF_US: u64 = 20_000;
/// Pause between failed pings of [`Client::ping_all`] (ms).
pub const PING_RETRY_INTERVAL_MS: u64 = 20;
/// Request number of [`Pipeline::connect_leader`]'s probe: pipelined requests count from 1.
pub const PROBE_REQUEST_NUMBER: u64 = 0;

/// Refusal codes of the runtime that this client acts on. They mirror
/// `percore_shards::runtime::ERROR_*` (this crate cannot depend on `shards`, which depends
/// on it): busy, e.g. a view change in progress or no free connection slot. Retried.
pub const ERROR_SERVER_BUSY: u32 = 1000;
/// This replica does not lead the shard's group. Retried at the next view's leader.
pub const ERROR_NOT_LEADER: u32 = 1010;
/// The request holds records of another shard: the caller's routing bug. Never retried.
pub const ERROR_WRONG_SHARD: u32 = 1012;
/// BFT mode: the request holds a record that would cross shards (a transfer between
/// accounts of two shards), which BFT groups refuse (`percore_shards::bft::
/// ERROR_BFT_CROSS_SHARD`, docs/bft.md §12). Never retried.
pub const ERROR_BFT_CROSS_SHARD: u32 = 1014;
/// BFT mode: the client id has no public key in the cluster file
/// (`percore_shards::bft::ERROR_BFT_UNKNOWN_CLIENT`). Never retried.
pub const ERROR_BFT_UNKNOWN_CLIENT: u32 = 1015;
/// BFT mode: the request's signature is missing or does not verify with the client's key
/// (`percore_shards::bft::ERROR_BFT_BAD_SIGNATURE`). Never retried.
pub const ERROR_BFT_BAD_SIGNATURE: u32 = 1016;
/// BFT mode: the request's number is behind the replica's session for this client, with no
/// reply kept (`percore_shards::bft::ERROR_BFT_STALE_REQUEST`): it was applied before or is
/// a stale duplicate. Never retried.
pub const ERROR_BFT_STALE_REQUEST: u32 = 1017;

const _: () = assert!(CLIENT_RETRY_BACKOFF_US_MIN_DEFAULT > 0);
const _: () = assert!(CLIENT_RETRY_BACKOFF_US_MIN_DEFAULT <= CLIENT_RETRY_BACKOFF_US_MAX_DEFAULT);
// A full backoff pause leaves room for further rounds before the deadline.
const _: () = assert!(CLIENT_RETRY_BACKOFF_US_MAX_DEFAULT < REQUEST_TIMEOUT_MS_DEFAULT * 1_000);
const _: () = assert!(ATTEMPTS_MAX_DEFAULT >= 1);

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error after all retries.
    #[error("shard {shard} at {address}: {source}")]
    Io {
        /// Shard index.
        shard: usize,
        /// Its address.
        address: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The server sent a frame that does not decode.
    #[error("shard {shard}: bad reply frame: {source}")]
    Frame {
        /// Shard index.
        shard: usize,
        /// Cause.
        source: FrameError,
    },
    /// The server refused the request with an error reply.
    #[error("shard {shard}: request {request_number} refused with error code {code}")]
    Refused {
        /// Shard index.
        shard: usize,
        /// The request.
        request_number: u64,
        /// Error code (frame codes < 1000, runtime codes >= 1000).
        code: u32,
    },
    /// A replicated shard refused a request holding records of another shard
    /// ([`ERROR_WRONG_SHARD`]): the caller's routing function disagrees with the server's.
    #[error("shard {shard}: request {request_number} holds records of another shard")]
    WrongShard {
        /// Shard index.
        shard: usize,
        /// The request.
        request_number: u64,
    },
    /// `f + 1` replicas of a BFT group refused the request because a record would cross
    /// shards ([`ERROR_BFT_CROSS_SHARD`]); nothing of it was applied.
    #[error("shard {shard}: request {request_number} refused: a record would cross shards")]
    CrossShardRefused {
        /// Shard index.
        shard: usize,
        /// The request.
        request_number: u64,
    },
    /// `f + 1` replicas of a BFT group do not know this client id
    /// ([`ERROR_BFT_UNKNOWN_CLIENT`]): it is not listed in the cluster file.
    #[error("shard {shard}: request {request_number} refused: unknown client id")]
    UnknownClient {
        /// Shard index.
        shard: usize,
        /// The request.
        request_number: u64,
    },
    /// `f + 1` replicas of a BFT group refused the request's signature
    /// ([`ERROR_BFT_BAD_SIGNATURE`]): the key is not the one the cluster file lists for
    /// this client id.
    #[error("shard {shard}: request {request_number} refused: bad client signature")]
    SignatureRefused {
        /// Shard index.
        shard: usize,
        /// The request.
        request_number: u64,
    },
    /// No replica of the shard's group answered before the request's deadline.
    #[error(
        "shard {shard}: no replica answered request {request_number} within {timeout:?}: {last}"
    )]
    Timeout {
        /// Shard index.
        shard: usize,
        /// The request.
        request_number: u64,
        /// The deadline it had, from its first send.
        timeout: Duration,
        /// The last failure seen.
        #[source]
        last: Box<ClientError>,
    },
    /// A reply did not match the request it answers.
    #[error("shard {shard}: reply for request {got}, expected {expected}")]
    Mismatch {
        /// Shard index.
        shard: usize,
        /// Request number expected.
        expected: u64,
        /// Request number received.
        got: u64,
    },
    /// More records than one frame may carry.
    #[error("{records} records exceed one frame's {max}")]
    TooManyRecords {
        /// Records given.
        records: usize,
        /// Most one frame carries.
        max: usize,
    },
}

impl ClientError {
    /// Whether another replica may answer where this one failed: a follower (`NotLeader`),
    /// a replica not ready to lead (`Busy`), or one that could not be reached in time.
    pub fn is_redirect(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. }
                | ClientError::Refused {
                    code: ERROR_NOT_LEADER | ERROR_SERVER_BUSY,
                    ..
                }
        )
    }

    /// The typed form of a refusal this client names ([`ClientError::WrongShard`]).
    fn typed(self) -> Self {
        match self {
            ClientError::Refused {
                shard,
                request_number,
                code: ERROR_WRONG_SHARD,
            } => ClientError::WrongShard {
                shard,
                request_number,
            },
            ClientError::Refused {
                shard,
                request_number,
                code: ERROR_BFT_CROSS_SHARD,
            } => ClientError::CrossShardRefused {
                shard,
                request_number,
            },
            ClientError::Refused {
                shard,
                request_number,
                code: ERROR_BFT_UNKNOWN_CLIENT,
            } => ClientError::UnknownClient {
                shard,
                request_number,
            },
            ClientError::Refused {
                shard,
                request_number,
                code: ERROR_BFT_BAD_SIGNATURE,
            } => ClientError::SignatureRefused {
                shard,
                request_number,
            },
            other => other,
        }
    }
}

/// Where a client instance starts numbering its requests: the wall clock in microseconds
/// since the Unix epoch.
///
/// The server keeps, per client id, the highest request number it applied and the replies
/// of the last few (`docs/protocol.md` 10): a request whose number it holds a reply for is a
/// retry and gets that reply, its records not applied. So a client id must never send a
/// number again with other records, also not from a later process: one that restarted and
/// counted from 1 again would have its first requests answered with the earlier process's
/// replies, and its records dropped. Counting from the clock, a later instance starts above
/// every number an earlier one used, as long as that one sent fewer requests than the
/// microseconds it ran (a request takes at least a round trip) and the clock did not step
/// back between them. [`Client`] and [`BftClient`] count from here; a [`Pipeline`]'s
/// caller numbers its requests itself and should do the same.
pub fn request_number_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| since.as_micros() as u64)
        .max(1)
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client address of every shard of every replica: `replicas[r][k]` is replica `r`'s
    /// shard `k`. Every replica lists the same shards; a single node is one replica.
    pub replicas: Vec<Vec<SocketAddr>>,
    /// This client's identity (echoed in replies; keys the server's session table; seeds
    /// the backoff jitter).
    pub client_id: u128,
    /// Largest frame sent or accepted (bytes, header included).
    pub frame_bytes_max: usize,
    /// Rounds per request, the first included. A round asks each replica once, so with one
    /// replica this counts attempts.
    pub attempts_max: u32,
    /// Socket connect/read/write timeout; never more than what is left of `request_timeout`.
    pub timeout: Duration,
    /// Deadline of one request from its first send, redirects and pauses included. `None`:
    /// only `attempts_max` bounds the retries.
    pub request_timeout: Option<Duration>,
    /// First pause after a full round without an answer (µs); doubles after each.
    pub client_retry_backoff_us_min: u64,
    /// The number before this client's first request: its requests are numbered from
    /// here + 1. Default: [`request_number_base`], the clock, so that a later instance
    /// under the same `client_id` numbers above every earlier one. A client that persists
    /// its own counter sets it from that.
    pub request_number_base: u64,
    /// Longest pause between rounds (µs). Each pause is drawn from `[b / 2, b]`.
    pub client_retry_backoff_us_max: u64,
}

impl ClientConfig {
    /// Defaults for a single node's `shards`, with `client_id`: up to
    /// [`ATTEMPTS_MAX_DEFAULT`] attempts per request, [`SINGLE_NODE_RETRY_BACKOFF_US`]
    /// apart, no overall deadline.
    pub fn new(shards: Vec<SocketAddr>, client_id: u128) -> Self {
        Self {
            replicas: vec![shards],
            client_id,
            frame_bytes_max: frame::FRAME_BYTES_MAX_DEFAULT,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            timeout: Duration::from_millis(TIMEOUT_MS_DEFAULT),
            request_timeout: None,
            client_retry_backoff_us_min: SINGLE_NODE_RETRY_BACKOFF_US,
            client_retry_backoff_us_max: SINGLE_NODE_RETRY_BACKOFF_US,
            request_number_base: request_number_base(),
        }
    }

    /// Defaults for a replicated cluster, `replicas[r][k]` being replica `r`'s client address
    /// for shard `k`: as many rounds as fit [`REQUEST_TIMEOUT_MS_DEFAULT`], pauses from
    /// [`CLIENT_RETRY_BACKOFF_US_MIN_DEFAULT`] to [`CLIENT_RETRY_BACKOFF_US_MAX_DEFAULT`].
    ///
    /// # Panics
    /// If there is no replica or the replicas list different numbers of shards.
    pub fn replicated(replicas: Vec<Vec<SocketAddr>>, client_id: u128) -> Self {
        assert!(!replicas.is_empty(), "a cluster has at least one replica");
        assert!(
            replicas
                .iter()
                .all(|shards| shards.len() == replicas[0].len()),
            "every replica lists the same shards"
        );
        Self {
            replicas,
            client_id,
            frame_bytes_max: frame::FRAME_BYTES_MAX_DEFAULT,
            attempts_max: u32::MAX,
            timeout: Duration::from_millis(TIMEOUT_MS_DEFAULT),
            request_timeout: Some(Duration::from_millis(REQUEST_TIMEOUT_MS_DEFAULT)),
            client_retry_backoff_us_min: CLIENT_RETRY_BACKOFF_US_MIN_DEFAULT,
            client_retry_backoff_us_max: CLIENT_RETRY_BACKOFF_US_MAX_DEFAULT,
            request_number_base: request_number_base(),
        }
    }
}

/// A decoded reply: its header and body bytes.
#[derive(Debug)]
pub struct Reply<'a> {
    /// The reply header.
    pub header: DecodedHeader,
    /// The body (results or looked-up records).
    pub body: &'a [u8],
}

/// Jitter for backoff pauses: xorshift64, seeded by the client id so a run replays.
#[derive(Debug, Clone)]
struct Jitter(u64);

impl Jitter {
    fn new(client_id: u128) -> Self {
        let folded = (client_id as u64) ^ ((client_id >> 64) as u64);
        // Never zero: xorshift would stay at zero.
        Self(folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Pauses between rounds: `b` doubles from the minimum to the maximum; each pause is drawn
/// from `[b / 2, b]` so clients that failed together do not retry together.
#[derive(Debug)]
struct Backoff {
    next_us: u64,
    max_us: u64,
}

impl Backoff {
    fn new(min_us: u64, max_us: u64) -> Self {
        assert!(
            min_us > 0 && min_us <= max_us,
            "backoff bounds {min_us}..{max_us} µs"
        );
        Self {
            next_us: min_us,
            max_us,
        }
    }

    /// Sleeps one jittered pause, cut short at `deadline`.
    fn pause(&mut self, jitter: &mut Jitter, deadline: Option<Instant>) {
        let base_us = self.next_us;
        let pause_us = base_us / 2 + jitter.next() % (base_us - base_us / 2 + 1);
        debug_assert!(pause_us <= base_us);
        self.next_us = base_us.saturating_mul(2).min(self.max_us);
        let mut pause = Duration::from_micros(pause_us);
        if let Some(deadline) = deadline {
            pause = pause.min(deadline.saturating_duration_since(Instant::now()));
        }
        std::thread::sleep(pause);
    }
}

/// The socket timeout of one try: `timeout`, cut to what is left before `deadline`, and
/// never zero (std refuses a zero timeout).
fn attempt_timeout(timeout: Duration, deadline: Option<Instant>) -> Duration {
    let left = deadline.map_or(timeout, |deadline| {
        deadline.saturating_duration_since(Instant::now())
    });
    timeout.min(left).max(Duration::from_millis(1))
}

/// What [`Pipeline::connect_leader`] asks each replica, and until when.
#[derive(Debug, Clone, Copy)]
pub struct LeaderProbe {
    /// A client operation of the server's state machine (for the ledger, e.g.
    /// `Operation::CreateTransfers`), sent with no records. Not a ping: a follower answers
    /// pings too, since the server handles them before its leader check.
    pub operation: u16,
    /// When to give up.
    pub deadline: Instant,
}

/// One connection with many requests in flight, answered in order.
#[derive(Debug)]
pub struct Pipeline {
    shard: usize,
    address: SocketAddr,
    client_id: u128,
    stream: TcpStream,
    /// The socket's read and write timeout as last set.
    timeout: Duration,
    write_buffer: Vec<u8>,
    read_buffer: Vec<u8>,
    in_flight: VecDeque<u64>,
}

impl Pipeline {
    /// Connects to `address` (shard `shard`).
    pub fn connect(
        shard: usize,
        address: SocketAddr,
        client_id: u128,
        frame_bytes_max: usize,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let io = |source| ClientError::Io {
            shard,
            address,
            source,
        };
        let stream = TcpStream::connect_timeout(&address, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(Self {
            shard,
            address,
            client_id,
            stream,
            timeout,
            write_buffer: vec![0; frame_bytes_max],
            read_buffer: vec![0; frame_bytes_max],
            in_flight: VecDeque::new(),
        })
    }

    /// Connects to the replica that leads shard `shard`'s group, asking the replicas of
    /// `replicas_of_shard` in the group's view order ([`placement::leader_next`]) from
    /// `start_hint` on, and returns the pipeline with the
    /// index of that replica (the next hint). Each is sent a request of `probe.operation`
    /// with no records under [`PROBE_REQUEST_NUMBER`]: a follower answers `NotLeader`, a
    /// replica in a view change `Busy`, the leader an empty reply at once (its leader check
    /// comes before submission, and there is nothing to submit). After each full round
    /// without a leader it pauses as [`Client::submit`] does, with the default bounds.
    ///
    /// This relies on today's server answering an empty request without ordering it; a
    /// server with client sessions may have to offer an explicit leader query instead.
    ///
    /// # Panics
    /// If `replicas_of_shard` is empty or lists more than 255 replicas.
    pub fn connect_leader(
        shard: usize,
        replicas_of_shard: &[SocketAddr],
        start_hint: usize,
        client_id: u128,
        frame_bytes_max: usize,
        timeout: Duration,
        probe: LeaderProbe,
    ) -> Result<(Self, usize), ClientError> {
        let replicas = replicas_of_shard.len();
        assert!(
            (1..=usize::from(u8::MAX)).contains(&replicas),
            "a group has 1 to 255 replicas"
        );
        let budget = probe.deadline.saturating_duration_since(Instant::now());
        let mut hint = start_hint % replicas;
        let mut jitter = Jitter::new(client_id);
        let mut backoff = Backoff::new(
            CLIENT_RETRY_BACKOFF_US_MIN_DEFAULT,
            CLIENT_RETRY_BACKOFF_US_MAX_DEFAULT,
        );
        let mut failures: usize = 0;
        // Bounded by the deadline: every pass returns, or ends in a timeout, a refusal or
        // a pause.
        loop {
            let address = replicas_of_shard[hint];
            let try_timeout = attempt_timeout(timeout, Some(probe.deadline));
            let error = match Self::probe(
                shard,
                address,
                client_id,
                frame_bytes_max,
                try_timeout,
                probe.operation,
            ) {
                Ok(mut pipeline) => {
                    pipeline.set_timeout(timeout)?;
                    return Ok((pipeline, hint));
                }
                Err(error) if error.is_redirect() => error,
                Err(error) => return Err(error.typed()),
            };
            if Instant::now() >= probe.deadline {
                return Err(ClientError::Timeout {
                    shard,
                    request_number: PROBE_REQUEST_NUMBER,
                    timeout: budget,
                    last: Box::new(error),
                });
            }
            hint = next_hint(shard, hint, replicas);
            failures += 1;
            if failures.is_multiple_of(replicas) {
                backoff.pause(&mut jitter, Some(probe.deadline));
            }
        }
    }

    /// One leader probe of `address`: the connection if it answered as a leader.
    fn probe(
        shard: usize,
        address: SocketAddr,
        client_id: u128,
        frame_bytes_max: usize,
        timeout: Duration,
        operation: u16,
    ) -> Result<Self, ClientError> {
        let mut pipeline = Self::connect(shard, address, client_id, frame_bytes_max, timeout)?;
        pipeline.send::<u8>(operation, PROBE_REQUEST_NUMBER, &[])?;
        let reply = pipeline.receive(0)?;
        debug_assert_eq!(reply.header.record_count, 0);
        Ok(pipeline)
    }

    /// The address this pipeline is connected to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sets the socket's read and write timeout (nonzero).
    fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        debug_assert!(!timeout.is_zero());
        if timeout == self.timeout {
            return Ok(());
        }
        let io = |source| ClientError::Io {
            shard: self.shard,
            address: self.address,
            source,
        };
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(io)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends one request frame of `operation` with `records` under `request_number`.
    pub fn send<R: Pod>(
        &mut self,
        operation: u16,
        request_number: u64,
        records: &[R],
    ) -> Result<(), ClientError> {
        send_request(
            &mut self.stream,
            &mut self.write_buffer,
            (self.client_id, self.shard, self.address),
            operation,
            request_number,
            records,
        )?;
        self.in_flight.push_back(request_number);
        Ok(())
    }

    /// Reads the next reply, whose records are `reply_record_bytes` each; it must answer the
    /// oldest request in flight.
    pub fn receive(&mut self, reply_record_bytes: usize) -> Result<Reply<'_>, ClientError> {
        let expected = self.in_flight.front().copied();
        let at = (self.shard, self.address);
        let reply = read_reply(
            &mut self.stream,
            &mut self.read_buffer,
            at,
            reply_record_bytes,
            expected,
        );
        // A reply that was read answers the oldest request, even a refusal or a mismatch.
        if matches!(
            reply,
            Ok(_) | Err(ClientError::Refused { .. } | ClientError::Mismatch { .. })
        ) {
            self.in_flight.pop_front();
        }
        reply
    }

    /// Splits the pipeline into a sending and a receiving half on two handles of its
    /// socket, so that one thread can send on a schedule while another waits for replies
    /// (an open-loop load generator). Replies still answer requests in order; the receiver
    /// is told which request number it expects next, so the caller keeps the numbers of
    /// requests already in flight (the pipeline's own list is dropped).
    ///
    /// # Errors
    /// `Io` if the socket cannot be duplicated.
    pub fn split(self) -> Result<(PipelineSender, PipelineReceiver), ClientError> {
        let read_stream = self.stream.try_clone().map_err(|source| ClientError::Io {
            shard: self.shard,
            address: self.address,
            source,
        })?;
        Ok((
            PipelineSender {
                shard: self.shard,
                address: self.address,
                client_id: self.client_id,
                stream: self.stream,
                write_buffer: self.write_buffer,
            },
            PipelineReceiver {
                shard: self.shard,
                address: self.address,
                stream: read_stream,
                read_buffer: self.read_buffer,
            },
        ))
    }
}

/// The sending half of a [`Pipeline::split`] connection.
#[derive(Debug)]
pub struct PipelineSender {
    shard: usize,
    address: SocketAddr,
    client_id: u128,
    stream: TcpStream,
    write_buffer: Vec<u8>,
}

impl PipelineSender {
    /// Sends one request frame of `operation` with `records` under `request_number`, as
    /// [`Pipeline::send`] does.
    pub fn send<R: Pod>(
        &mut self,
        operation: u16,
        request_number: u64,
        records: &[R],
    ) -> Result<(), ClientError> {
        send_request(
            &mut self.stream,
            &mut self.write_buffer,
            (self.client_id, self.shard, self.address),
            operation,
            request_number,
            records,
        )
    }

    /// Shuts the connection down in both directions, so that the receiving half's next read
    /// fails at once instead of waiting for a reply that will not come (a load generator
    /// whose send failed, moving to another replica).
    pub fn shutdown(&self) {
        // Already closed or reset is fine: the point is that nothing more is read.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The receiving half of a [`Pipeline::split`] connection.
#[derive(Debug)]
pub struct PipelineReceiver {
    shard: usize,
    address: SocketAddr,
    stream: TcpStream,
    read_buffer: Vec<u8>,
}

impl PipelineReceiver {
    /// Reads the next reply, whose records are `reply_record_bytes` each; it must answer
    /// request `request_number` (the sender's oldest unanswered one).
    pub fn receive(
        &mut self,
        reply_record_bytes: usize,
        request_number: u64,
    ) -> Result<Reply<'_>, ClientError> {
        let at = (self.shard, self.address);
        read_reply(
            &mut self.stream,
            &mut self.read_buffer,
            at,
            reply_record_bytes,
            Some(request_number),
        )
    }
}

/// Sends request `request_number` of `operation` with `records` from client `client_id` to
/// shard `shard` at `address` (the pipelined connection's and its sending half's `send`).
fn send_request<R: Pod>(
    stream: &mut TcpStream,
    write_buffer: &mut [u8],
    (client_id, shard, address): (u128, usize, SocketAddr),
    operation: u16,
    request_number: u64,
    records: &[R],
) -> Result<(), ClientError> {
    let envelope = Envelope {
        client_id,
        request_number,
        operation,
        shard: shard as u16,
    };
    write_request(stream, write_buffer, (shard, address), &envelope, records)
}

/// Writes one request frame through `write_buffer` (its length is the largest frame).
fn write_request<R: Pod>(
    stream: &mut TcpStream,
    write_buffer: &mut [u8],
    (shard, address): (usize, SocketAddr),
    envelope: &Envelope,
    records: &[R],
) -> Result<(), ClientError> {
    write_frame(
        stream,
        write_buffer,
        (shard, address),
        envelope,
        records,
        None,
    )
}

/// Writes a request, signed (a `SignedRequest` frame) when `signature` is given.
fn write_frame<R: Pod>(
    stream: &mut TcpStream,
    write_buffer: &mut [u8],
    (shard, address): (usize, SocketAddr),
    envelope: &Envelope,
    records: &[R],
    signature: Option<&[u8; frame::SIGNATURE_TRAILER_BYTES]>,
) -> Result<(), ClientError> {
    let trailer = signature.map_or(0, |_| frame::SIGNATURE_TRAILER_BYTES);
    let max = (write_buffer.len() - FRAME_HEADER_BYTES - trailer) / size_of::<R>().max(1);
    if records.len() > max {
        return Err(ClientError::TooManyRecords {
            records: records.len(),
            max,
        });
    }
    let bytes = match signature {
        Some(signature) => frame::encode_signed_request(write_buffer, envelope, records, signature),
        None => frame::encode_request(write_buffer, envelope, records),
    };
    stream
        .write_all(&write_buffer[..bytes])
        .map_err(|source| ClientError::Io {
            shard,
            address,
            source,
        })
}

/// Reads one reply frame into `read_buffer` (its length is the largest frame) and checks
/// that it answers request `expected`.
fn read_reply<'a>(
    stream: &mut TcpStream,
    read_buffer: &'a mut [u8],
    (shard, address): (usize, SocketAddr),
    reply_record_bytes: usize,
    expected: Option<u64>,
) -> Result<Reply<'a>, ClientError> {
    let schema = ReplySchema { reply_record_bytes };
    let io = |source| ClientError::Io {
        shard,
        address,
        source,
    };
    let frame_bytes_max = read_buffer.len();
    stream
        .read_exact(&mut read_buffer[..FRAME_HEADER_BYTES])
        .map_err(io)?;
    let header = frame::decode_header(&read_buffer[..FRAME_HEADER_BYTES], frame_bytes_max, &schema)
        .map_err(|source| ClientError::Frame { shard, source })?;
    let body_bytes = header.body_bytes as usize;
    stream
        .read_exact(&mut read_buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_bytes])
        .map_err(io)?;
    let body = frame::verify_body(&header, &read_buffer[FRAME_HEADER_BYTES..])
        .map_err(|source| ClientError::Frame { shard, source })?;
    let request_number = header.envelope.request_number;
    if header.kind == Kind::ErrorReply {
        return Err(ClientError::Refused {
            shard,
            request_number,
            code: header.error_code,
        });
    }
    if expected != Some(request_number) {
        return Err(ClientError::Mismatch {
            shard,
            expected: expected.unwrap_or(0),
            got: request_number,
        });
    }
    Ok(Reply { header, body })
}

/// One request as every try of it is sent.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    operation: u16,
    request_number: u64,
    /// From `request_timeout`; `None` when only rounds bound the retries.
    deadline: Option<Instant>,
}

/// A client of every shard of one node, or of every replication group of a cluster. See
/// the module docs.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    /// Per shard, the connection to its hinted replica, opened on first use.
    connections: Vec<Option<Pipeline>>,
    /// Per shard, the replica believed to lead its group.
    leader_hints: Vec<usize>,
    /// Times a shard moved on to another replica.
    redirects: u64,
    request_number: u64,
    /// Records of the current request, by shard: their indexes in the caller's slice.
    routed: Vec<Vec<usize>>,
    jitter: Jitter,
}

/// The replica to try after `hint` for `shard`'s group: the leader of the view after the one
/// `hint` leads ([`placement::leader_next`]). `replicas` is at most 255 (checked where a
/// client or pipeline is built).
fn next_hint(shard: usize, hint: usize, replicas: usize) -> usize {
    usize::from(placement::leader_next(
        shard as u32,
        hint as u8,
        replicas as u8,
    ))
}

impl Client {
    /// A client for `config.replicas`; connections open on first use.
    ///
    /// # Panics
    /// On a configuration that cannot work: no replica (or more than 255) or no shard,
    /// replicas listing different shards, no attempt allowed, unbounded retries, or bad
    /// backoff bounds.
    pub fn new(config: ClientConfig) -> Self {
        let replicas = config.replicas.len();
        assert!(
            (1..=usize::from(u8::MAX)).contains(&replicas),
            "a client needs 1 to 255 replicas"
        );
        let shards = config.replicas[0].len();
        assert!(shards > 0, "a client needs at least one shard");
        assert!(
            config.replicas.iter().all(|r| r.len() == shards),
            "every replica lists the same shards"
        );
        assert!(config.attempts_max >= 1, "attempts_max counts the first");
        assert!(
            config.request_timeout.is_some() || config.attempts_max < u32::MAX,
            "retries need a bound: attempts_max or request_timeout"
        );
        // Checks the backoff bounds once, here, rather than on the first failure.
        let _ = Backoff::new(
            config.client_retry_backoff_us_min,
            config.client_retry_backoff_us_max,
        );
        let request_number = config.request_number_base;
        Self {
            jitter: Jitter::new(config.client_id),
            config,
            connections: (0..shards).map(|_| None).collect(),
            leader_hints: (0..shards).map(|shard| shard % replicas).collect(),
            redirects: 0,
            request_number,
            routed: vec![Vec::new(); shards],
        }
    }

    /// Number of shards (replication groups).
    pub fn shards(&self) -> usize {
        self.connections.len()
    }

    /// Number of replicas (1 for a single node).
    pub fn replica_count(&self) -> usize {
        self.config.replicas.len()
    }

    /// Per shard, the replica the next request goes to: the last one found leading.
    pub fn leader_hints(&self) -> &[usize] {
        &self.leader_hints
    }

    /// How many times a shard's request moved on to another replica (a refusal `NotLeader`
    /// or `Busy`, or a failed connection), since this client was made.
    pub fn redirects(&self) -> u64 {
        self.redirects
    }

    /// The connection of `shard` to its hinted replica, opened if needed, with its socket
    /// timeout cut to `deadline`.
    fn connection(
        &mut self,
        shard: usize,
        deadline: Option<Instant>,
    ) -> Result<&mut Pipeline, ClientError> {
        let address = self.config.replicas[self.leader_hints[shard]][shard];
        let timeout = attempt_timeout(self.config.timeout, deadline);
        if self.connections[shard]
            .as_ref()
            .is_some_and(|c| c.address() != address)
        {
            self.connections[shard] = None;
        }
        if self.connections[shard].is_none() {
            let pipeline = Pipeline::connect(
                shard,
                address,
                self.config.client_id,
                self.config.frame_bytes_max,
                timeout,
            )?;
            self.connections[shard] = Some(pipeline);
        }
        let connection = self.connections[shard].as_mut().expect("just connected");
        connection.set_timeout(timeout)?;
        Ok(connection)
    }

    /// Moves `shard` on to the replica that leads the view after the hinted one's
    /// ([`placement::leader_next`]); with one replica there is nowhere else to go.
    fn redirect(&mut self, shard: usize) {
        self.connections[shard] = None;
        let replicas = self.replica_count();
        if replicas > 1 {
            self.leader_hints[shard] = next_hint(shard, self.leader_hints[shard], replicas);
            self.redirects += 1;
        }
    }

    /// Drops every connection with a reply still owed, so no later request reads it.
    fn abandon_in_flight(&mut self) {
        for connection in &mut self.connections {
            if connection.as_ref().is_some_and(|c| c.in_flight() > 0) {
                *connection = None;
            }
        }
    }

    /// Submits `records` of `operation`, each to shard `route(record)`, and returns one
    /// result per record in the given order. Shards are asked in parallel, each at its
    /// hinted leader; a shard whose replica refuses as a follower or busy, or cannot be
    /// reached, is asked again at the next view's leader with the same request number (see the
    /// module docs for pauses and bounds). A record applied by an earlier try answers as the
    /// state machine answers a duplicate (the ledger: `Exists`).
    pub fn submit<R: Pod, Res: Pod>(
        &mut self,
        operation: u16,
        records: &[R],
        route: impl Fn(&R) -> usize,
    ) -> Result<Vec<Res>, ClientError> {
        let shards = self.shards();
        for routed in &mut self.routed {
            routed.clear();
        }
        for (index, record) in records.iter().enumerate() {
            self.routed[route(record) % shards].push(index);
        }
        self.request_number += 1;
        let attempt = Attempt {
            operation,
            request_number: self.request_number,
            deadline: self
                .config
                .request_timeout
                .and_then(|timeout| Instant::now().checked_add(timeout)),
        };
        let mut results = vec![Res::zeroed(); records.len()];
        let mut pending: Vec<usize> = (0..shards)
            .filter(|s| !self.routed[*s].is_empty())
            .collect();
        // Per shard, tries of this request that failed: whole rounds are failures / N.
        let mut failures = vec![0u32; shards];
        let mut backoff = Backoff::new(
            self.config.client_retry_backoff_us_min,
            self.config.client_retry_backoff_us_max,
        );
        // Bounded: each pass answers or fails every pending shard, and failures are bounded
        // by attempts_max rounds or by the deadline (`Client::new` checks one is set).
        loop {
            let mut failed = Vec::new();
            let sent = self.send_pending(&attempt, records, &pending, &mut failed)?;
            self.receive_sent(&attempt, &sent, &mut results, &mut failed)?;
            if failed.is_empty() {
                return Ok(results);
            }
            pending = self.retry_failed(&attempt, failed, &mut failures, &mut backoff)?;
        }
    }

    /// Sends the request's records of every `pending` shard; returns the shards sent to and
    /// adds the others, with why, to `failed`.
    fn send_pending<R: Pod>(
        &mut self,
        attempt: &Attempt,
        records: &[R],
        pending: &[usize],
        failed: &mut Vec<(usize, ClientError)>,
    ) -> Result<Vec<usize>, ClientError> {
        let mut sent = Vec::with_capacity(pending.len());
        for &shard in pending {
            let batch: Vec<R> = self.routed[shard].iter().map(|&i| records[i]).collect();
            match self
                .connection(shard, attempt.deadline)
                .and_then(|c| c.send(attempt.operation, attempt.request_number, &batch))
            {
                Ok(()) => sent.push(shard),
                Err(error) if error.is_redirect() => failed.push((shard, error)),
                Err(error) => {
                    self.connections[shard] = None;
                    self.abandon_in_flight();
                    return Err(error);
                }
            }
        }
        Ok(sent)
    }

    /// Reads the reply of every `sent` shard into `results`; adds the shards to retry, with
    /// why, to `failed`. Any other failure ends the request.
    fn receive_sent<Res: Pod>(
        &mut self,
        attempt: &Attempt,
        sent: &[usize],
        results: &mut [Res],
        failed: &mut Vec<(usize, ClientError)>,
    ) -> Result<(), ClientError> {
        for &shard in sent {
            let timeout = attempt_timeout(self.config.timeout, attempt.deadline);
            let connection = self.connections[shard].as_mut().expect("sent on it");
            let outcome = connection
                .set_timeout(timeout)
                .and_then(|()| connection.receive(size_of::<Res>()));
            let error = match outcome {
                Ok(reply) => {
                    let body: &[u8] = reply.body;
                    let expected = self.routed[shard].len() * size_of::<Res>();
                    if body.len() != expected {
                        let bytes = body.len();
                        self.connections[shard] = None;
                        self.abandon_in_flight();
                        return Err(ClientError::Frame {
                            shard,
                            source: FrameError::Truncated {
                                bytes,
                                needed: expected,
                            },
                        });
                    }
                    for (k, &index) in self.routed[shard].iter().enumerate() {
                        results[index] = bytemuck::pod_read_unaligned(
                            &body[k * size_of::<Res>()..(k + 1) * size_of::<Res>()],
                        );
                    }
                    continue;
                }
                Err(error) => error,
            };
            self.connections[shard] = None;
            if !error.is_redirect() {
                self.abandon_in_flight();
                return Err(error.typed());
            }
            failed.push((shard, error));
        }
        Ok(())
    }

    /// Moves each failed shard on to its next view's leader; pauses when one of them has been
    /// refused by a whole round. Returns the shards to send again, or the error that ends
    /// the request: the last failure once a shard has used `attempts_max` rounds, or
    /// [`ClientError::Timeout`] at the deadline.
    fn retry_failed(
        &mut self,
        attempt: &Attempt,
        failed: Vec<(usize, ClientError)>,
        failures: &mut [u32],
        backoff: &mut Backoff,
    ) -> Result<Vec<usize>, ClientError> {
        debug_assert!(!failed.is_empty());
        let replicas = self.replica_count() as u32;
        let mut round_done = false;
        let mut pending = Vec::with_capacity(failed.len());
        let mut last = None;
        for (shard, error) in failed {
            self.redirect(shard);
            failures[shard] += 1;
            if failures[shard] / replicas >= self.config.attempts_max {
                self.abandon_in_flight();
                return Err(error);
            }
            round_done |= failures[shard].is_multiple_of(replicas);
            pending.push(shard);
            last = Some((shard, error));
        }
        let (shard, error) = last.expect("a shard failed");
        let timed_out = |now: Instant| attempt.deadline.is_some_and(|d| now >= d);
        if !timed_out(Instant::now()) && round_done {
            backoff.pause(&mut self.jitter, attempt.deadline);
        }
        if timed_out(Instant::now()) {
            return Err(ClientError::Timeout {
                shard,
                request_number: attempt.request_number,
                timeout: self.config.request_timeout.unwrap_or_default(),
                last: Box::new(error),
            });
        }
        Ok(pending)
    }

    /// Sends a ping to every shard's hinted replica and waits for the answers (a readiness
    /// check); a replica that does not answer moves the hint on. A follower answers pings
    /// too, so this shows each group has a live replica, not where its leader is.
    pub fn ping_all(&mut self, deadline: Instant) -> Result<(), ClientError> {
        for shard in 0..self.shards() {
            // Bounded by the deadline.
            loop {
                self.request_number += 1;
                let request_number = self.request_number;
                let outcome = self.connection(shard, Some(deadline)).and_then(|c| {
                    c.send::<u8>(frame::OPERATION_PING, request_number, &[])?;
                    c.receive(0).map(|_| ())
                });
                match outcome {
                    Ok(()) => break,
                    Err(err) if Instant::now() >= deadline => {
                        self.connections[shard] = None;
                        return Err(err);
                    }
                    Err(_) => {
                        self.redirect(shard);
                        std::thread::sleep(Duration::from_millis(PING_RETRY_INTERVAL_MS));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Default time a [`BftClient`] waits for a replica that neither answered nor failed before
/// it sends the request to it again (µs).
pub const BFT_ROUND_TIMEOUT_US_DEFAULT: u64 = 2_000_000;
/// BFT client: longest one request's write to one replica may block (µs). A replica whose
/// socket takes nothing for this long is not reading; it is dropped for the round.
pub const BFT_SEND_TIMEOUT_US: u64 = 100_000;
/// Pause of a [`BftClient`] when no socket had bytes (µs): it polls non-blocking sockets.
pub const BFT_POLL_PAUSE_US: u64 = 50;

/// One replica's connection of a [`BftClient`]: a non-blocking socket and the reply bytes
/// read from it so far.
#[derive(Debug)]
struct QuorumConnection {
    stream: TcpStream,
    received: Vec<u8>,
}

/// Where one replica stands on the current request of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReplicaAnswer {
    /// Sent, no reply yet.
    Waiting,
    /// Replied with these result bytes.
    Replied(Vec<u8>),
    /// Refused with a code every correct replica gives for this request
    /// ([`ERROR_WRONG_SHARD`], [`ERROR_BFT_CROSS_SHARD`], [`ERROR_BFT_UNKNOWN_CLIENT`],
    /// [`ERROR_BFT_BAD_SIGNATURE`]): not asked again; `f + 1` of them end the request with
    /// that refusal.
    Refused(u32),
    /// Refused, or its connection failed: sent again next round.
    Failed,
}

/// The client of a BFT cluster (`--fault-model bft`, `docs/bft.md` §12): it sends each
/// request to **every** replica of the shard's group and accepts a result once `f + 1`
/// replicas sent identical result bytes, so at least one correct replica vouches for it;
/// replies that differ (a Byzantine replica's made-up results) are counted and ignored. A
/// replica that refuses or cannot be reached gets the request again after a pause, under
/// the same request number; one that says nothing is asked again after
/// [`BFT_ROUND_TIMEOUT_US_DEFAULT`]. The request fails at `request_timeout`.
///
/// Every request is signed once per shard it goes to, with the client's key (the cluster
/// file lists it as client `config.client_id`), over the group, client id, request number,
/// operation and a digest of the records ([`RequestStatement`]); replicas verify it before
/// anything of it can be proposed, voted for or applied (`docs/bft.md` §2).
/// Replies are read from non-blocking sockets, polled in turn: a silent replica never
/// holds up the others.
pub struct BftClient {
    config: ClientConfig,
    faults_max: usize,
    /// The client's ed25519 key.
    key: SigningKey,
    /// `connections[replica][shard]`, opened on use.
    connections: Vec<Vec<Option<QuorumConnection>>>,
    request_number: u64,
    write_buffer: Vec<u8>,
    routed: Vec<Vec<usize>>,
    mismatched_replies: u64,
    round_timeout: Duration,
}

impl std::fmt::Debug for BftClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BftClient")
            .field("client_id", &self.config.client_id)
            .field("faults_max", &self.faults_max)
            .field("request_number", &self.request_number)
            .finish_non_exhaustive()
    }
}

impl BftClient {
    /// A client of `config.replicas` (every replica of every group) tolerating
    /// `faults_max` Byzantine replicas, signing with `key`: the key the cluster file lists
    /// for client `config.client_id` (`percore keygen --clients`).
    ///
    /// # Panics
    /// If the replicas cannot tolerate `faults_max` (`n < 3f + 1`), list different shards,
    /// or no request timeout is set.
    pub fn new(config: ClientConfig, faults_max: usize, key: SigningKey) -> Self {
        let replicas = config.replicas.len();
        assert!(replicas > 3 * faults_max, "n >= 3f + 1 replicas");
        let shards = config.replicas[0].len();
        assert!(shards > 0 && config.replicas.iter().all(|r| r.len() == shards));
        assert!(
            config.request_timeout.is_some(),
            "a BFT request needs a deadline"
        );
        Self {
            connections: (0..replicas)
                .map(|_| (0..shards).map(|_| None).collect())
                .collect(),
            request_number: config.request_number_base,
            write_buffer: vec![0; config.frame_bytes_max],
            routed: vec![Vec::new(); shards],
            mismatched_replies: 0,
            round_timeout: Duration::from_micros(BFT_ROUND_TIMEOUT_US_DEFAULT),
            faults_max,
            key,
            config,
        }
    }

    /// Number of shards (replication groups).
    pub fn shards(&self) -> usize {
        self.routed.len()
    }

    /// Replies that did not match the accepted result (or came too late to matter and
    /// differed), since this client was made.
    pub fn mismatched_replies(&self) -> u64 {
        self.mismatched_replies
    }

    /// Submits `records` of `operation`, each to shard `route(record)`, to every replica,
    /// and returns one result per record once `f + 1` replicas agree on each shard's.
    pub fn submit<R: Pod, Res: Pod>(
        &mut self,
        operation: u16,
        records: &[R],
        route: impl Fn(&R) -> usize,
    ) -> Result<Vec<Res>, ClientError> {
        let shards = self.shards();
        for routed in &mut self.routed {
            routed.clear();
        }
        for (index, record) in records.iter().enumerate() {
            self.routed[route(record) % shards].push(index);
        }
        self.request_number += 1;
        let deadline = Instant::now()
            + self
                .config
                .request_timeout
                .expect("checked in BftClient::new");
        let mut results = vec![Res::zeroed(); records.len()];
        for shard in 0..shards {
            if self.routed[shard].is_empty() {
                continue;
            }
            let batch: Vec<R> = self.routed[shard].iter().map(|&i| records[i]).collect();
            let body = self.quorum_reply(shard, operation, &batch, size_of::<Res>(), deadline)?;
            for (k, &index) in self.routed[shard].iter().enumerate() {
                results[index] = bytemuck::pod_read_unaligned(
                    &body[k * size_of::<Res>()..(k + 1) * size_of::<Res>()],
                );
            }
        }
        Ok(results)
    }

    /// Sends the request to every replica of `shard` and polls until `f + 1` identical
    /// replies of `records.len()` results arrive. Bounded by `deadline`.
    fn quorum_reply<R: Pod>(
        &mut self,
        shard: usize,
        operation: u16,
        records: &[R],
        result_bytes: usize,
        deadline: Instant,
    ) -> Result<Vec<u8>, ClientError> {
        let replicas = self.connections.len();
        let envelope = Envelope {
            client_id: self.config.client_id,
            request_number: self.request_number,
            operation,
            shard: shard as u16,
        };
        // One signature per request (and shard), whatever it holds.
        let signature = RequestStatement::new(
            shard as u32,
            envelope.client_id,
            envelope.request_number,
            operation,
            bytemuck::cast_slice(records),
        )
        .sign(&self.key);
        let mut answers = vec![ReplicaAnswer::Failed; replicas];
        let mut sent_at = vec![Instant::now(); replicas];
        let mut last_error = None;
        let mut backoff = Backoff::new(
            self.config.client_retry_backoff_us_min,
            self.config.client_retry_backoff_us_max,
        );
        let mut jitter = Jitter::new(self.config.client_id);
        loop {
            // (Re)send where the last try failed or went unanswered for a round.
            let mut resent = false;
            for replica in 0..replicas {
                let stale = answers[replica] == ReplicaAnswer::Waiting
                    && sent_at[replica].elapsed() >= self.round_timeout;
                if answers[replica] != ReplicaAnswer::Failed && !stale {
                    continue;
                }
                resent = true;
                sent_at[replica] = Instant::now();
                let request = (&envelope, records, &signature);
                answers[replica] = match self.send_to(replica, shard, request, deadline) {
                    Ok(()) => ReplicaAnswer::Waiting,
                    Err(error) => {
                        last_error = Some(error);
                        ReplicaAnswer::Failed
                    }
                };
            }
            let round_end = Instant::now() + self.round_timeout;
            while Instant::now() < round_end.min(deadline) {
                let progressed =
                    self.poll_replies(shard, &mut answers, result_bytes, &mut last_error);
                if let Some(body) = self.agreed(&answers) {
                    self.mismatched_replies += answers
                        .iter()
                        .filter(|a| matches!(a, ReplicaAnswer::Replied(b) if *b != body))
                        .count() as u64;
                    return Ok(body);
                }
                if let Some(code) = self.agreed_refusal(&answers) {
                    return Err(ClientError::Refused {
                        shard,
                        request_number: self.request_number,
                        code,
                    }
                    .typed());
                }
                if answers.iter().all(|a| *a != ReplicaAnswer::Waiting) {
                    break;
                }
                if !progressed {
                    std::thread::sleep(Duration::from_micros(BFT_POLL_PAUSE_US));
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout {
                    shard,
                    request_number: self.request_number,
                    timeout: self.config.request_timeout.unwrap_or_default(),
                    last: Box::new(last_error.unwrap_or(ClientError::Refused {
                        shard,
                        request_number: self.request_number,
                        code: ERROR_SERVER_BUSY,
                    })),
                });
            }
            if !resent || answers.iter().all(|a| *a != ReplicaAnswer::Waiting) {
                backoff.pause(&mut jitter, Some(deadline));
            }
            // Every replica answered and none agree (a reply of a lagging replica that
            // was not applied yet cannot happen: replicas answer only once committed): ask
            // all again, a commit may have happened since.
            if answers
                .iter()
                .all(|a| matches!(a, ReplicaAnswer::Replied(_) | ReplicaAnswer::Refused(_)))
            {
                answers.fill(ReplicaAnswer::Failed);
            }
        }
    }

    /// The result bytes `f + 1` replicas agree on, if any.
    fn agreed(&self, answers: &[ReplicaAnswer]) -> Option<Vec<u8>> {
        answers.iter().find_map(|answer| {
            let ReplicaAnswer::Replied(body) = answer else {
                return None;
            };
            let same = answers
                .iter()
                .filter(|other| matches!(other, ReplicaAnswer::Replied(b) if b == body))
                .count();
            (same > self.faults_max).then(|| body.clone())
        })
    }

    /// The deterministic refusal code `f + 1` replicas agree on, if any.
    fn agreed_refusal(&self, answers: &[ReplicaAnswer]) -> Option<u32> {
        answers.iter().find_map(|answer| {
            let ReplicaAnswer::Refused(code) = answer else {
                return None;
            };
            let same = answers.iter().filter(|other| *other == answer).count();
            (same > self.faults_max).then_some(*code)
        })
    }

    /// Opens (if needed) `replica`'s connection of `shard` and writes the request.
    fn send_to<R: Pod>(
        &mut self,
        replica: usize,
        shard: usize,
        (envelope, records, signature): (&Envelope, &[R], &[u8; frame::SIGNATURE_TRAILER_BYTES]),
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let address = self.config.replicas[replica][shard];
        let io = |source| ClientError::Io {
            shard,
            address,
            source,
        };
        if self.connections[replica][shard].is_none() {
            let timeout = attempt_timeout(self.config.timeout, Some(deadline));
            let stream = TcpStream::connect_timeout(&address, timeout).map_err(io)?;
            stream.set_nodelay(true).map_err(io)?;
            stream.set_write_timeout(Some(timeout)).map_err(io)?;
            self.connections[replica][shard] = Some(QuorumConnection {
                stream,
                received: Vec::with_capacity(self.config.frame_bytes_max),
            });
        }
        let connection = self.connections[replica][shard]
            .as_mut()
            .expect("connected above");
        // Each write is bounded on its own, not by what was left when the connection
        // opened: a replica that stopped reading (frozen, or Byzantine) fills its socket's
        // buffers, and the write then waits while no other replica is written to or read.
        // Past the bound the connection is dropped and the request goes on with the others.
        let write_timeout = attempt_timeout(
            Duration::from_micros(BFT_SEND_TIMEOUT_US).min(self.config.timeout),
            Some(deadline),
        );
        connection
            .stream
            .set_write_timeout(Some(write_timeout))
            .map_err(io)?;
        connection.stream.set_nonblocking(false).map_err(io)?;
        let written = write_frame(
            &mut connection.stream,
            &mut self.write_buffer,
            (shard, address),
            envelope,
            records,
            Some(signature),
        );
        let nonblocking = connection.stream.set_nonblocking(true).map_err(io);
        if let Err(error) = written.and(nonblocking) {
            self.connections[replica][shard] = None;
            return Err(error);
        }
        Ok(())
    }

    /// Reads what each waiting replica sent and records whole replies to this request.
    /// Returns whether any bytes arrived.
    fn poll_replies(
        &mut self,
        shard: usize,
        answers: &mut [ReplicaAnswer],
        result_bytes: usize,
        last_error: &mut Option<ClientError>,
    ) -> bool {
        let mut progressed = false;
        let frame_bytes_max = self.config.frame_bytes_max;
        for (replica, answer) in answers.iter_mut().enumerate() {
            if *answer != ReplicaAnswer::Waiting {
                continue;
            }
            let address = self.config.replicas[replica][shard];
            let Some(connection) = self.connections[replica][shard].as_mut() else {
                *answer = ReplicaAnswer::Failed;
                continue;
            };
            let mut chunk = [0u8; 4096];
            let failure = loop {
                let room = frame_bytes_max - connection.received.len();
                match connection.stream.read(&mut chunk[..room.min(4096)]) {
                    Ok(0) => break Some(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(read) => {
                        progressed = true;
                        connection.received.extend_from_slice(&chunk[..read]);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break None,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => break Some(error),
                }
                if connection.received.len() >= frame_bytes_max {
                    break None;
                }
            };
            let parsed = take_reply(
                &mut connection.received,
                (shard, frame_bytes_max, result_bytes),
                self.request_number,
            );
            match (parsed, failure) {
                (Ok(Some(outcome)), _) => *answer = outcome,
                (Ok(None), None) => {}
                (Ok(None), Some(source)) => {
                    *last_error = Some(ClientError::Io {
                        shard,
                        address,
                        source,
                    });
                    self.connections[replica][shard] = None;
                    *answer = ReplicaAnswer::Failed;
                }
                (Err(error), _) => {
                    *last_error = Some(error);
                    self.connections[replica][shard] = None;
                    *answer = ReplicaAnswer::Failed;
                }
            }
        }
        progressed
    }
}

/// Takes whole frames off the front of `received`: replies to earlier requests are
/// dropped; the reply to `request_number` becomes an answer (`Refused` for a refusal every
/// correct replica gives, `Failed` for any other).
/// `Ok(None)`: no answer to this request yet. An undecodable frame is an error (the
/// connection is dropped).
fn take_reply(
    received: &mut Vec<u8>,
    (shard, frame_bytes_max, result_bytes): (usize, usize, usize),
    request_number: u64,
) -> Result<Option<ReplicaAnswer>, ClientError> {
    let schema = ReplySchema {
        reply_record_bytes: result_bytes,
    };
    // Bounded: each pass removes one whole frame.
    while received.len() >= FRAME_HEADER_BYTES {
        // A late reply to an earlier request is skipped on its authentic envelope alone:
        // judged by this request's schema, a reply of another operation (other result
        // records) would read as a bad frame and cost the connection.
        let (envelope, frame_bytes) = frame::peek_header(received, frame_bytes_max)
            .map_err(|source| ClientError::Frame { shard, source })?;
        if envelope.request_number != request_number {
            if received.len() < frame_bytes {
                return Ok(None);
            }
            received.drain(..frame_bytes);
            continue;
        }
        let header =
            frame::decode_header(&received[..FRAME_HEADER_BYTES], frame_bytes_max, &schema)
                .map_err(|source| ClientError::Frame { shard, source })?;
        let frame_bytes = header.frame_bytes();
        if received.len() < frame_bytes {
            return Ok(None);
        }
        let body = frame::verify_body(&header, &received[FRAME_HEADER_BYTES..frame_bytes])
            .map_err(|source| ClientError::Frame { shard, source })?
            .to_vec();
        received.drain(..frame_bytes);
        if header.kind == Kind::ErrorReply {
            return Ok(Some(match header.error_code {
                code @ (ERROR_WRONG_SHARD
                | ERROR_BFT_CROSS_SHARD
                | ERROR_BFT_UNKNOWN_CLIENT
                | ERROR_BFT_BAD_SIGNATURE
                | ERROR_BFT_STALE_REQUEST) => ReplicaAnswer::Refused(code),
                _ => ReplicaAnswer::Failed,
            }));
        }
        return Ok(Some(ReplicaAnswer::Replied(body)));
    }
    Ok(None)
}
