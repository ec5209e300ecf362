//! The Rust client: routes records to the owning shard's port, pipelines requests, retries.
//!
//! A [`Client`] holds one TCP connection per shard. [`Client::submit`] splits records by
//! their owning shard (the caller's routing function, e.g. `shard_of(debit_account_id)`),
//! sends one request frame per shard before reading any reply (so shards work in parallel),
//! and reassembles the per-record results in the caller's order. A lost connection is
//! re-established and the request resent with the **same request number**, so the server (and
//! the ledger's transfer-id idempotency) can recognise the retry.
//!
//! [`Pipeline`] is the lower-level interface for load generators: one connection, many
//! requests in flight, replies matched by request number.
//!
//! This client uses blocking std sockets so any application thread can embed it; the server
//! side is io_uring.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use percore_engine::frame::{
    self, DecodedHeader, Envelope, FRAME_HEADER_BYTES, FrameError, Kind, ReplySchema,
};

/// Default number of attempts for one request (the first plus retries).
pub const ATTEMPTS_MAX_DEFAULT: u32 = 5;
/// Default socket timeout.
pub const TIMEOUT_MS_DEFAULT: u64 = 10_000;

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

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client address of each shard, in shard order.
    pub shards: Vec<SocketAddr>,
    /// This client's identity (echoed in replies; keys the server's session table).
    pub client_id: u128,
    /// Largest frame sent or accepted (bytes, header included).
    pub frame_bytes_max: usize,
    /// Attempts per request, the first included.
    pub attempts_max: u32,
    /// Socket read/write timeout.
    pub timeout: Duration,
}

impl ClientConfig {
    /// Defaults for `shards`, with `client_id`.
    pub fn new(shards: Vec<SocketAddr>, client_id: u128) -> Self {
        Self {
            shards,
            client_id,
            frame_bytes_max: frame::FRAME_BYTES_MAX_DEFAULT,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            timeout: Duration::from_millis(TIMEOUT_MS_DEFAULT),
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

/// One connection with many requests in flight, answered in order.
#[derive(Debug)]
pub struct Pipeline {
    shard: usize,
    address: SocketAddr,
    client_id: u128,
    stream: TcpStream,
    frame_bytes_max: usize,
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
            frame_bytes_max,
            write_buffer: vec![0; frame_bytes_max],
            read_buffer: vec![0; frame_bytes_max],
            in_flight: VecDeque::new(),
        })
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends one request frame of `operation` with `records` under `request_number`.
    pub fn send<R: Pod>(
        &mut self,
        operation: u16,
        request_number: u64,
        records: &[R],
    ) -> Result<(), ClientError> {
        let max = (self.frame_bytes_max - FRAME_HEADER_BYTES) / size_of::<R>().max(1);
        if records.len() > max {
            return Err(ClientError::TooManyRecords {
                records: records.len(),
                max,
            });
        }
        let envelope = Envelope {
            client_id: self.client_id,
            request_number,
            operation,
            shard: self.shard as u16,
        };
        let bytes = frame::encode_request(&mut self.write_buffer, &envelope, records);
        self.stream
            .write_all(&self.write_buffer[..bytes])
            .map_err(|source| ClientError::Io {
                shard: self.shard,
                address: self.address,
                source,
            })?;
        self.in_flight.push_back(request_number);
        Ok(())
    }

    /// Reads the next reply, whose records are `reply_record_bytes` each; it must answer the
    /// oldest request in flight.
    pub fn receive(&mut self, reply_record_bytes: usize) -> Result<Reply<'_>, ClientError> {
        let schema = ReplySchema { reply_record_bytes };
        let io = |source| ClientError::Io {
            shard: self.shard,
            address: self.address,
            source,
        };
        self.stream
            .read_exact(&mut self.read_buffer[..FRAME_HEADER_BYTES])
            .map_err(io)?;
        let header = frame::decode_header(
            &self.read_buffer[..FRAME_HEADER_BYTES],
            self.frame_bytes_max,
            &schema,
        )
        .map_err(|source| ClientError::Frame {
            shard: self.shard,
            source,
        })?;
        let body_bytes = header.body_bytes as usize;
        self.stream
            .read_exact(&mut self.read_buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_bytes])
            .map_err(|source| ClientError::Io {
                shard: self.shard,
                address: self.address,
                source,
            })?;
        let body = frame::verify_body(&header, &self.read_buffer[FRAME_HEADER_BYTES..]).map_err(
            |source| ClientError::Frame {
                shard: self.shard,
                source,
            },
        )?;
        let expected = self.in_flight.pop_front();
        let request_number = header.envelope.request_number;
        if header.kind == Kind::ErrorReply {
            return Err(ClientError::Refused {
                shard: self.shard,
                request_number,
                code: header.error_code,
            });
        }
        if expected != Some(request_number) {
            return Err(ClientError::Mismatch {
                shard: self.shard,
                expected: expected.unwrap_or(0),
                got: request_number,
            });
        }
        Ok(Reply { header, body })
    }
}

/// A client of every shard of one node. See the module docs.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    connections: Vec<Option<Pipeline>>,
    request_number: u64,
    /// Records of the current request, by shard: (original index, record bytes).
    routed: Vec<Vec<usize>>,
}

impl Client {
    /// A client for `config.shards`; connections open on first use.
    pub fn new(config: ClientConfig) -> Self {
        let shards = config.shards.len();
        Self {
            config,
            connections: (0..shards).map(|_| None).collect(),
            request_number: 0,
            routed: vec![Vec::new(); shards],
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.config.shards.len()
    }

    fn connection(&mut self, shard: usize) -> Result<&mut Pipeline, ClientError> {
        if self.connections[shard].is_none() {
            let pipeline = Pipeline::connect(
                shard,
                self.config.shards[shard],
                self.config.client_id,
                self.config.frame_bytes_max,
                self.config.timeout,
            )?;
            self.connections[shard] = Some(pipeline);
        }
        Ok(self.connections[shard].as_mut().expect("just connected"))
    }

    /// Submits `records` of `operation`, each to shard `route(record)`, and returns one
    /// result per record in the given order. Shards are asked in parallel; a failed
    /// connection is reopened and its request resent with the same request number.
    pub fn submit<R: Pod, Res: Pod>(
        &mut self,
        operation: u16,
        records: &[R],
        route: impl Fn(&R) -> usize,
    ) -> Result<Vec<Res>, ClientError> {
        for routed in &mut self.routed {
            routed.clear();
        }
        for (index, record) in records.iter().enumerate() {
            self.routed[route(record) % self.config.shards.len()].push(index);
        }
        self.request_number += 1;
        let request_number = self.request_number;
        let mut results = vec![Res::zeroed(); records.len()];
        let mut last_error = None;
        let mut pending: Vec<usize> = (0..self.shards())
            .filter(|s| !self.routed[*s].is_empty())
            .collect();
        for _attempt in 0..self.config.attempts_max {
            // Send every pending shard's frame first, then collect replies.
            let mut sent = Vec::with_capacity(pending.len());
            for &shard in &pending {
                let batch: Vec<R> = self.routed[shard].iter().map(|&i| records[i]).collect();
                match self
                    .connection(shard)
                    .and_then(|c| c.send(operation, request_number, &batch))
                {
                    Ok(()) => sent.push(shard),
                    Err(err) => {
                        self.connections[shard] = None;
                        last_error = Some(err);
                    }
                }
            }
            let mut failed = Vec::new();
            for &shard in &pending {
                if !sent.contains(&shard) {
                    failed.push(shard);
                    continue;
                }
                let connection = self.connections[shard].as_mut().expect("sent on it");
                match connection.receive(size_of::<Res>()) {
                    Ok(reply) => {
                        let body: &[u8] = reply.body;
                        let expected = self.routed[shard].len() * size_of::<Res>();
                        if body.len() != expected {
                            return Err(ClientError::Frame {
                                shard,
                                source: FrameError::Truncated {
                                    bytes: body.len(),
                                    needed: expected,
                                },
                            });
                        }
                        for (k, &index) in self.routed[shard].iter().enumerate() {
                            results[index] = bytemuck::pod_read_unaligned(
                                &body[k * size_of::<Res>()..(k + 1) * size_of::<Res>()],
                            );
                        }
                    }
                    Err(
                        err @ (ClientError::Refused { .. }
                        | ClientError::Frame { .. }
                        | ClientError::Mismatch { .. }),
                    ) => {
                        self.connections[shard] = None;
                        return Err(err);
                    }
                    Err(err) => {
                        self.connections[shard] = None;
                        failed.push(shard);
                        last_error = Some(err);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(results);
            }
            pending = failed;
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last_error.expect("an attempt failed"))
    }

    /// Sends a ping to every shard and waits for the answers (a readiness check).
    pub fn ping_all(&mut self, deadline: Instant) -> Result<(), ClientError> {
        for shard in 0..self.shards() {
            loop {
                self.request_number += 1;
                let request_number = self.request_number;
                let outcome = self.connection(shard).and_then(|c| {
                    c.send::<u8>(frame::OPERATION_PING, request_number, &[])?;
                    c.receive(0).map(|_| ())
                });
                match outcome {
                    Ok(()) => break,
                    Err(err) if Instant::now() >= deadline => return Err(err),
                    Err(_) => {
                        self.connections[shard] = None;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        Ok(())
    }
}
