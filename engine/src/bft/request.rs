//! Client request authentication in BFT mode: what a client signs, the signed batch format a
//! leader proposes, and the checks every replica runs on it (`docs/bft.md` §2 and §12).
//!
//! A client holds an ed25519 key listed in the cluster file (`client <id> <public key>`):
//! its **client id is its index there** (1, 2, …), so a request under id `c` verifies only
//! with client `c`'s key and nobody can submit under another client's id. Each request is
//! signed once, whatever it holds, over a fixed statement ([`RequestStatement`]):
//!
//! ```text
//! "percore-bft-request-v1\0" | group u32 | client u128 | request number u64 | operation u16
//!     | blake3(record bytes) [32]
//! ```
//!
//! A proposed batch carries every request's signature ([`batch_encode`]), so a backup checks
//! each one before it votes for the proposal ([`ProposalCheck`], called by the core), and a
//! replica executing a committed batch checks again what it did not check already
//! ([`RequestVerifier::batch_checked`]). Verification is `verify_strict`, as for votes.
//!
//! The leader's `prepare` may rewrite fields of the records it proposes (the ledger
//! assigns timestamps), so replicas hash records with those fields reset to what a client
//! sends ([`RecordNormalizer`], the state machine's `unprepare`): the signature covers
//! everything the client chose, and a client must send those fields as zero.
//!
//! Pure and deterministic: no I/O, no clock. [`RequestVerifier`] keeps two bounded caches
//! keyed by blake3 digests (requests and batches already verified here), so a replica
//! verifies each request once; a cache hit returns what a full check would.

use bytemuck::Zeroable as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::message::{Digest, batch_digest};
use crate::session::{REQUEST_DESCRIPTOR_BYTES, RequestDescriptor};

/// Domain separation of a client request statement (version 1).
pub const REQUEST_DOMAIN: &[u8; 23] = b"percore-bft-request-v1\0";
/// Bytes of one request statement.
pub const REQUEST_STATEMENT_BYTES: usize = REQUEST_DOMAIN.len() + 4 + 16 + 8 + 2 + 32;
/// Bytes of one request signature.
pub const REQUEST_SIGNATURE_BYTES: usize = 64;
/// Most clients a cluster file may list (ids `1..=CLIENTS_MAX`).
pub const CLIENTS_MAX: usize = 4_096;
/// Bytes of the signed batch header: operation u16, format u16, record bytes u32.
pub const BATCH_HEADER_BYTES: usize = 8;
/// Batch format: records and request descriptors, no signatures (written before client
/// authentication; a replica refuses to vote for it and to apply it).
pub const BATCH_FORMAT_UNSIGNED: u16 = 0;
/// Batch format: records, request descriptors, then one signature per descriptor.
pub const BATCH_FORMAT_SIGNED: u16 = 1;
/// Batch format of a proven batch: another group's certified outputs
/// ([`super::xshard::encode_batch`]), which no client signed. [`batch_decode`] refuses it
/// (a client batch never carries internal records); the value is reserved here so that the
/// formats of one batch header never collide.
pub const BATCH_FORMAT_PROVEN: u16 = 2;
/// Requests remembered as verified (a direct-mapped cache of digests, 32 bytes each).
pub const VERIFIED_REQUESTS_CACHED: usize = 4_096;
/// Batches remembered as checked whole (a ring of digests): a commit trails the vote by
/// at most a log window.
pub const CHECKED_BATCHES_CACHED: usize = 2 * super::LOG_WINDOW_OPS_DEFAULT as usize;
/// Records are normalized and hashed this many bytes at a time (whole records): large
/// enough for blake3's SIMD over several chunks per update (hashing record by record was
/// several times slower), small enough to stay in L1/L2.
pub const NORMALIZE_CHUNK_BYTES: usize = 16 * 1024;

const _: () = assert!(VERIFIED_REQUESTS_CACHED.is_power_of_two());
const _: () = assert!(REQUEST_DESCRIPTOR_BYTES + REQUEST_SIGNATURE_BYTES == 96);
const _: () = assert!(crate::frame::SIGNATURE_TRAILER_BYTES == REQUEST_SIGNATURE_BYTES);

/// Why a client request, or a batch of them, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthError {
    /// The client id has no key in the cluster file.
    #[error("client {client_id} is not an authorised client of this cluster")]
    UnknownClient {
        /// The client id claimed.
        client_id: u128,
    },
    /// The signature is missing or `verify_strict` refuses it for this statement (signed
    /// by another key, or over other records, request number, operation or group).
    #[error("request {request_number} of client {client_id}: bad or missing signature")]
    BadSignature {
        /// The client id claimed.
        client_id: u128,
        /// The request number claimed.
        request_number: u64,
    },
    /// A batch without signatures (the format before client authentication).
    #[error("batch carries no client signatures")]
    Unsigned,
    /// Batch bytes that are not a signed batch: bad header, descriptors that do not cover
    /// every record exactly once in order, or not one signature per descriptor.
    #[error("batch is not a signed batch: {0}")]
    Malformed(&'static str),
    /// A proven batch (another group's certified outputs) that
    /// [`super::xshard::Groups::verify_batch_bytes`] refuses: a leader's made-up or altered
    /// internal records. The rule it broke ([`super::xshard::XShardError::rule`]; the
    /// error itself cannot nest here, it holds a [`super::BftError`]).
    #[error("proven batch refused: {0}")]
    Proven(&'static str),
}

/// Resets, in every record of `records` (whole records, 16-byte aligned), the fields the
/// leader's `prepare` assigns for `operation`: what a client sent. A pure function.
pub type RecordNormalizer = fn(operation: u16, records: &mut [u8]);

/// What a client signs for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestStatement {
    /// The shard's BFT group.
    pub group: u32,
    /// The client's id (its index in the cluster file).
    pub client_id: u128,
    /// The request number.
    pub request_number: u64,
    /// The operation code of every record.
    pub operation: u16,
    /// blake3 of the request's record bytes.
    pub records_digest: Digest,
}

impl RequestStatement {
    /// The statement of request `request_number` of `client_id` to `group` holding
    /// `records` (the record bytes as they travel).
    pub fn new(
        group: u32,
        client_id: u128,
        request_number: u64,
        operation: u16,
        records: &[u8],
    ) -> Self {
        Self {
            group,
            client_id,
            request_number,
            operation,
            records_digest: batch_digest(records),
        }
    }

    /// The exact bytes signed.
    pub fn signing_bytes(&self) -> [u8; REQUEST_STATEMENT_BYTES] {
        let mut bytes = [0u8; REQUEST_STATEMENT_BYTES];
        let mut at = 0;
        for part in [
            &REQUEST_DOMAIN[..],
            &self.group.to_le_bytes(),
            &self.client_id.to_le_bytes(),
            &self.request_number.to_le_bytes(),
            &self.operation.to_le_bytes(),
            &self.records_digest,
        ] {
            bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        debug_assert_eq!(at, REQUEST_STATEMENT_BYTES);
        bytes
    }

    /// Signs the statement (the client's side).
    pub fn sign(&self, key: &SigningKey) -> [u8; REQUEST_SIGNATURE_BYTES] {
        key.sign(&self.signing_bytes()).to_bytes()
    }

    /// The cache key of this statement with `signature`: equal keys mean the same
    /// statement and signature bytes.
    fn cache_key(&self, signature: &[u8; REQUEST_SIGNATURE_BYTES]) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.signing_bytes());
        hasher.update(signature);
        *hasher.finalize().as_bytes()
    }
}

/// The authorised clients' public keys: client id `c` has key `keys[c - 1]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientKeys {
    keys: Vec<VerifyingKey>,
}

impl ClientKeys {
    /// Client `i + 1` holds `keys[i]`. Weak keys and duplicates are refused by the cluster
    /// file parser (`keys::parse_cluster`); this asserts the count.
    ///
    /// # Panics
    /// With more than [`CLIENTS_MAX`] keys.
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        assert!(keys.len() <= CLIENTS_MAX, "at most CLIENTS_MAX clients");
        Self { keys }
    }

    /// Clients listed.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no client is listed (no request can be accepted).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key of `client_id`, if it is an authorised client.
    pub fn key(&self, client_id: u128) -> Option<&VerifyingKey> {
        let index = usize::try_from(client_id.checked_sub(1)?).ok()?;
        self.keys.get(index)
    }

    /// The public keys in client id order (client 1 first).
    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// Checks `signature` over `statement` with the client's key (`verify_strict`).
    pub fn verify(
        &self,
        statement: &RequestStatement,
        signature: &[u8; REQUEST_SIGNATURE_BYTES],
    ) -> Result<(), RequestAuthError> {
        let key = self
            .key(statement.client_id)
            .ok_or(RequestAuthError::UnknownClient {
                client_id: statement.client_id,
            })?;
        key.verify_strict(
            &statement.signing_bytes(),
            &Signature::from_bytes(signature),
        )
        .map_err(|_| RequestAuthError::BadSignature {
            client_id: statement.client_id,
            request_number: statement.request_number,
        })
    }
}

/// A batch's parts, borrowed from its bytes ([`batch_decode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchParts<'a> {
    /// The operation code of every record.
    pub operation: u16,
    /// [`BATCH_FORMAT_SIGNED`] or [`BATCH_FORMAT_UNSIGNED`].
    pub format: u16,
    /// The record bytes.
    pub records: &'a [u8],
    /// The request descriptors' bytes ([`REQUEST_DESCRIPTOR_BYTES`] each).
    pub requests: &'a [u8],
    /// One signature per descriptor ([`REQUEST_SIGNATURE_BYTES`] each); empty when unsigned.
    pub signatures: &'a [u8],
}

/// Encodes a batch as a leader proposes it: `operation u16 | format u16 | record bytes u32
/// | records | descriptors | signatures`, format [`BATCH_FORMAT_SIGNED`] when `signatures`
/// is not empty.
///
/// # Panics
/// If `signatures` is neither empty nor one per descriptor (a caller bug).
pub fn batch_encode(
    operation: u16,
    records: &[u8],
    requests: &[u8],
    signatures: &[u8],
    out: &mut Vec<u8>,
) {
    let format = if signatures.is_empty() {
        BATCH_FORMAT_UNSIGNED
    } else {
        assert_eq!(
            signatures.len() / REQUEST_SIGNATURE_BYTES * REQUEST_DESCRIPTOR_BYTES,
            requests.len(),
            "one signature per request descriptor"
        );
        BATCH_FORMAT_SIGNED
    };
    out.clear();
    out.extend_from_slice(&operation.to_le_bytes());
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(records);
    out.extend_from_slice(requests);
    out.extend_from_slice(signatures);
}

/// The inverse of [`batch_encode`] on untrusted bytes, or `None` when they are not shaped
/// so (too short, unknown format, records longer than what follows, descriptors or
/// signatures not whole, not one signature per descriptor).
pub fn batch_decode(batch: &[u8]) -> Option<BatchParts<'_>> {
    let header = batch.get(..BATCH_HEADER_BYTES)?;
    let operation = u16::from_le_bytes([header[0], header[1]]);
    let format = u16::from_le_bytes([header[2], header[3]]);
    let records_bytes = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let body = &batch[BATCH_HEADER_BYTES..];
    if records_bytes > body.len() {
        return None;
    }
    let (records, rest) = body.split_at(records_bytes);
    let per_request = match format {
        BATCH_FORMAT_UNSIGNED => REQUEST_DESCRIPTOR_BYTES,
        BATCH_FORMAT_SIGNED => REQUEST_DESCRIPTOR_BYTES + REQUEST_SIGNATURE_BYTES,
        _ => return None,
    };
    if !rest.len().is_multiple_of(per_request) {
        return None;
    }
    let (requests, signatures) = rest.split_at(rest.len() / per_request * REQUEST_DESCRIPTOR_BYTES);
    Some(BatchParts {
        operation,
        format,
        records,
        requests,
        signatures,
    })
}

/// Checks the contents of a proposal before this replica votes for it. Called by the core
/// ([`super::BftReplica::set_proposal_check`]) for every non-empty batch a backup is about
/// to sign a Prepare for. Must be a deterministic function of the batch bytes and the
/// configuration: every correct replica must decide alike.
pub trait ProposalCheck {
    /// `Ok` if this replica may vote for `batch`, whose digest is `digest` (the core
    /// checked it).
    fn check_proposal(&mut self, batch: &[u8], digest: &Digest) -> Result<(), RequestAuthError>;
}

/// Verifies client requests and signed batches for one group, remembering what it
/// verified (see the module docs). Holds only memory taken at construction.
pub struct RequestVerifier {
    group: u32,
    clients: ClientKeys,
    record_bytes: usize,
    normalize: Option<RecordNormalizer>,
    /// Whole records, normalized before they are hashed ([`NORMALIZE_CHUNK_BYTES`], at
    /// least one record; `u128`s for the alignment the normalizer may rely on).
    record_scratch: Box<[u128]>,
    /// Direct-mapped by the key's first bytes; a slot holds the last key verified there.
    verified: Box<[Digest]>,
    checked: Box<[Digest; CHECKED_BATCHES_CACHED]>,
    checked_next: usize,
    /// Signatures verified with `verify_strict` (cache misses).
    verifies: u64,
}

impl RequestVerifier {
    /// A verifier for `group` whose records are `record_bytes` long, hashed after
    /// `normalize` (none: as they are).
    ///
    /// # Panics
    /// If `record_bytes` is zero.
    pub fn new(
        group: u32,
        clients: ClientKeys,
        record_bytes: usize,
        normalize: Option<RecordNormalizer>,
    ) -> Self {
        assert!(record_bytes > 0);
        Self {
            group,
            clients,
            record_bytes,
            normalize,
            record_scratch: vec![
                0;
                (NORMALIZE_CHUNK_BYTES / record_bytes).max(1)
                    * record_bytes.div_ceil(16)
            ]
            .into_boxed_slice(),
            verified: vec![Digest::zeroed(); VERIFIED_REQUESTS_CACHED].into_boxed_slice(),
            checked: Box::new([Digest::zeroed(); CHECKED_BATCHES_CACHED]),
            checked_next: 0,
            verifies: 0,
        }
    }

    /// The authorised clients.
    pub fn clients(&self) -> &ClientKeys {
        &self.clients
    }

    /// Signatures verified so far (cache hits excluded): the cost this replica paid.
    pub fn verifies(&self) -> u64 {
        self.verifies
    }

    /// The statement of request `request_number` of `client_id` holding `records` (whole
    /// records, as sent or as the leader prepared them): their digest is taken with the
    /// leader-assigned fields reset.
    pub fn statement(
        &mut self,
        client_id: u128,
        request_number: u64,
        operation: u16,
        records: &[u8],
    ) -> RequestStatement {
        debug_assert!(records.len().is_multiple_of(self.record_bytes));
        let records_digest = match self.normalize {
            None => batch_digest(records),
            Some(normalize) => {
                let chunk_bytes =
                    (NORMALIZE_CHUNK_BYTES / self.record_bytes).max(1) * self.record_bytes;
                let scratch: &mut [u8] = bytemuck::cast_slice_mut(&mut self.record_scratch);
                let mut hasher = blake3::Hasher::new();
                for chunk in records.chunks(chunk_bytes) {
                    let scratch = &mut scratch[..chunk.len()];
                    scratch.copy_from_slice(chunk);
                    normalize(operation, scratch);
                    hasher.update(scratch);
                }
                *hasher.finalize().as_bytes()
            }
        };
        RequestStatement {
            group: self.group,
            client_id,
            request_number,
            operation,
            records_digest,
        }
    }

    /// Checks one request's signature, or finds it verified.
    pub fn verify_request(
        &mut self,
        statement: &RequestStatement,
        signature: &[u8; REQUEST_SIGNATURE_BYTES],
    ) -> Result<(), RequestAuthError> {
        if self.clients.key(statement.client_id).is_none() {
            return Err(RequestAuthError::UnknownClient {
                client_id: statement.client_id,
            });
        }
        let key = statement.cache_key(signature);
        let slot = (u64::from_le_bytes(key[..8].try_into().expect("8 bytes")) as usize)
            & (VERIFIED_REQUESTS_CACHED - 1);
        if self.verified[slot] == key {
            return Ok(());
        }
        self.verifies += 1;
        self.clients.verify(statement, signature)?;
        self.verified[slot] = key;
        Ok(())
    }

    /// Checks a whole batch: a signed batch whose descriptors cover every record exactly
    /// once, in order, each with a valid signature of its client over this group, its
    /// request number, the operation and its records. A batch that passes is remembered
    /// ([`RequestVerifier::batch_checked`]). `digest` is `batch_digest(batch)`, which the
    /// caller has already computed.
    pub fn check_batch(&mut self, batch: &[u8], digest: &Digest) -> Result<(), RequestAuthError> {
        debug_assert_eq!(batch_digest(batch), *digest);
        if self.batch_checked(digest) {
            return Ok(());
        }
        let parts = batch_decode(batch).ok_or(RequestAuthError::Malformed("bad header"))?;
        if parts.format != BATCH_FORMAT_SIGNED {
            return Err(RequestAuthError::Unsigned);
        }
        if parts.requests.is_empty() || !parts.records.len().is_multiple_of(self.record_bytes) {
            return Err(RequestAuthError::Malformed(
                "no requests or partial records",
            ));
        }
        let record_count = parts.records.len() / self.record_bytes;
        let mut next = 0usize;
        let descriptors = parts.requests.chunks_exact(REQUEST_DESCRIPTOR_BYTES);
        let signatures = parts.signatures.chunks_exact(REQUEST_SIGNATURE_BYTES);
        for (descriptor, signature) in descriptors.zip(signatures) {
            let descriptor: RequestDescriptor = bytemuck::pod_read_unaligned(descriptor);
            let start = descriptor.record_start as usize;
            let end = start + descriptor.record_count as usize;
            // Every record belongs to exactly one signed request: no unsigned records.
            if start != next || end <= start || end > record_count {
                return Err(RequestAuthError::Malformed(
                    "descriptors do not cover the records",
                ));
            }
            next = end;
            let records = &parts.records[start * self.record_bytes..end * self.record_bytes];
            let statement = self.statement(
                descriptor.client_id,
                descriptor.request_number,
                parts.operation,
                records,
            );
            let signature: &[u8; REQUEST_SIGNATURE_BYTES] =
                signature.try_into().expect("chunks_exact");
            self.verify_request(&statement, signature)?;
        }
        if next != record_count {
            return Err(RequestAuthError::Malformed(
                "descriptors do not cover the records",
            ));
        }
        self.note_checked(*digest);
        Ok(())
    }

    /// Remembers that the batch with `digest` passed [`RequestVerifier::check_batch`]
    /// (or was built here from requests verified at admission: a leader's own proposal).
    pub fn note_checked(&mut self, digest: Digest) {
        if !self.batch_checked(&digest) {
            self.checked[self.checked_next] = digest;
            self.checked_next = (self.checked_next + 1) % CHECKED_BATCHES_CACHED;
        }
    }

    /// Whether the batch with `digest` was checked here recently.
    pub fn batch_checked(&self, digest: &Digest) -> bool {
        *digest != Digest::zeroed() && self.checked.contains(digest)
    }
}

impl std::fmt::Debug for RequestVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestVerifier")
            .field("group", &self.group)
            .field("clients", &self.clients.len())
            .field("record_bytes", &self.record_bytes)
            .field("verifies", &self.verifies)
            .finish_non_exhaustive()
    }
}

impl ProposalCheck for RequestVerifier {
    fn check_proposal(&mut self, batch: &[u8], digest: &Digest) -> Result<(), RequestAuthError> {
        self.check_batch(batch, digest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const RECORD_BYTES: usize = 16;

    fn clients(count: u8) -> (Vec<SigningKey>, ClientKeys) {
        let secrets: Vec<SigningKey> = (1..=count)
            .map(|seed| SigningKey::from_bytes(&[seed; 32]))
            .collect();
        let keys = ClientKeys::new(secrets.iter().map(|key| key.verifying_key()).collect());
        (secrets, keys)
    }

    /// A signed batch of `requests` (client id, request number, record count).
    pub(crate) fn signed_batch(
        group: u32,
        secrets: &[SigningKey],
        requests: &[(u128, u64, u32)],
    ) -> Vec<u8> {
        let (mut records, mut descriptors, mut signatures) = (Vec::new(), Vec::new(), Vec::new());
        for &(client_id, request_number, count) in requests {
            let start = (records.len() / RECORD_BYTES) as u32;
            let mine: Vec<u8> = (0..count as usize * RECORD_BYTES)
                .map(|at| (at as u8) ^ request_number as u8)
                .collect();
            let statement = RequestStatement::new(group, client_id, request_number, 3, &mine);
            signatures.extend_from_slice(&statement.sign(&secrets[client_id as usize - 1]));
            records.extend_from_slice(&mine);
            let descriptor = RequestDescriptor {
                client_id,
                request_number,
                record_start: start,
                record_count: count,
            };
            descriptors.extend_from_slice(bytemuck::bytes_of(&descriptor));
        }
        let mut batch = Vec::new();
        batch_encode(3, &records, &descriptors, &signatures, &mut batch);
        batch
    }

    #[test]
    fn bft_signed_batches_verify_and_tampering_is_refused() {
        let (secrets, keys) = clients(3);
        let batch = signed_batch(5, &secrets, &[(1, 7, 2), (3, 1, 1)]);
        let mut verifier = RequestVerifier::new(5, keys.clone(), RECORD_BYTES, None);
        assert_eq!(verifier.check_batch(&batch, &batch_digest(&batch)), Ok(()));
        assert_eq!(verifier.verifies(), 2);
        // Checked whole once: the second check verifies nothing.
        assert_eq!(verifier.check_batch(&batch, &batch_digest(&batch)), Ok(()));
        assert_eq!(verifier.verifies(), 2);

        let fresh = || RequestVerifier::new(5, keys.clone(), RECORD_BYTES, None);
        // Another group: the group is signed in.
        assert!(matches!(
            RequestVerifier::new(6, keys.clone(), RECORD_BYTES, None)
                .check_batch(&batch, &batch_digest(&batch)),
            Err(RequestAuthError::BadSignature { client_id: 1, .. })
        ));
        let parts = batch_decode(&batch).expect("decodes");
        let records_at = BATCH_HEADER_BYTES;
        let requests_at = records_at + parts.records.len();
        let signatures_at = requests_at + parts.requests.len();
        // A record changed after signing.
        let mut tampered = batch.clone();
        tampered[records_at + 3] ^= 1;
        assert_eq!(
            fresh().check_batch(&tampered, &batch_digest(&tampered)),
            Err(RequestAuthError::BadSignature {
                client_id: 1,
                request_number: 7
            })
        );
        // The request number changed (offset 16 of the descriptor).
        let mut renumbered = batch.clone();
        renumbered[requests_at + 16] = 8;
        assert_eq!(
            fresh().check_batch(&renumbered, &batch_digest(&renumbered)),
            Err(RequestAuthError::BadSignature {
                client_id: 1,
                request_number: 8
            })
        );
        // Another client's id on client 1's request.
        let mut impersonated = batch.clone();
        impersonated[requests_at] = 2;
        assert_eq!(
            fresh().check_batch(&impersonated, &batch_digest(&impersonated)),
            Err(RequestAuthError::BadSignature {
                client_id: 2,
                request_number: 7
            })
        );
        // An unknown client.
        let mut unknown = batch.clone();
        unknown[requests_at] = 9;
        assert_eq!(
            fresh().check_batch(&unknown, &batch_digest(&unknown)),
            Err(RequestAuthError::UnknownClient { client_id: 9 })
        );
        // A garbage signature.
        let mut garbage = batch.clone();
        garbage[signatures_at + 70] ^= 0x40;
        assert!(matches!(
            fresh().check_batch(&garbage, &batch_digest(&garbage)),
            Err(RequestAuthError::BadSignature { client_id: 3, .. })
        ));
        // The same batch without signatures.
        let mut unsigned = Vec::new();
        batch_encode(3, parts.records, parts.requests, &[], &mut unsigned);
        assert_eq!(
            fresh().check_batch(&unsigned, &batch_digest(&unsigned)),
            Err(RequestAuthError::Unsigned)
        );
        // A record no request covers.
        let mut uncovered = Vec::new();
        let mut records = parts.records.to_vec();
        records.extend_from_slice(&[0; RECORD_BYTES]);
        batch_encode(
            3,
            &records,
            parts.requests,
            parts.signatures,
            &mut uncovered,
        );
        assert!(matches!(
            fresh().check_batch(&uncovered, &batch_digest(&uncovered)),
            Err(RequestAuthError::Malformed(_))
        ));
        let cut = &batch[..batch.len() - 1];
        assert_eq!(fresh().check_batch(cut, &batch_digest(cut)).ok(), None);
    }

    #[test]
    fn bft_request_verified_at_admission_is_not_verified_again() {
        let (secrets, keys) = clients(1);
        let records = [9u8; RECORD_BYTES];
        let statement = RequestStatement::new(0, 1, 1, 3, &records);
        let signature = statement.sign(&secrets[0]);
        let mut verifier = RequestVerifier::new(0, keys, RECORD_BYTES, None);
        assert_eq!(verifier.verify_request(&statement, &signature), Ok(()));
        assert_eq!(verifier.verify_request(&statement, &signature), Ok(()));
        assert_eq!(verifier.verifies(), 1);
        let other = RequestStatement {
            request_number: 2,
            ..statement
        };
        assert!(verifier.verify_request(&other, &signature).is_err());
        assert_eq!(verifier.verifies(), 2);
        assert_eq!(
            verifier.verify_request(
                &RequestStatement {
                    client_id: 0,
                    ..statement
                },
                &signature
            ),
            Err(RequestAuthError::UnknownClient { client_id: 0 })
        );
    }

    #[test]
    fn bft_fields_the_leader_assigns_are_not_signed_the_rest_is() {
        // The "leader-assigned field" of these records: their last byte.
        fn normalize(_operation: u16, records: &mut [u8]) {
            for record in records.chunks_exact_mut(RECORD_BYTES) {
                record[RECORD_BYTES - 1] = 0;
            }
        }
        let (secrets, keys) = clients(1);
        let sent = [[3u8; RECORD_BYTES - 1].as_slice(), &[0]].concat();
        let signature = RequestStatement::new(0, 1, 1, 3, &sent).sign(&secrets[0]);
        let descriptor = RequestDescriptor {
            client_id: 1,
            request_number: 1,
            record_start: 0,
            record_count: 1,
        };
        let proposal = |record: &[u8]| {
            let mut batch = Vec::new();
            batch_encode(
                3,
                record,
                bytemuck::bytes_of(&descriptor),
                &signature,
                &mut batch,
            );
            batch
        };
        let mut verifier = RequestVerifier::new(0, keys, RECORD_BYTES, Some(normalize));
        let statement = verifier.statement(1, 1, 3, &sent);
        assert_eq!(verifier.verify_request(&statement, &signature), Ok(()));
        let mut prepared = sent.clone();
        prepared[RECORD_BYTES - 1] = 0x77; // the leader's timestamp
        let batch = proposal(&prepared);
        assert_eq!(verifier.check_batch(&batch, &batch_digest(&batch)), Ok(()));
        let mut changed = prepared.clone();
        changed[0] ^= 1; // anything else the client chose
        let batch = proposal(&changed);
        assert!(verifier.check_batch(&batch, &batch_digest(&batch)).is_err());
    }

    #[test]
    fn bft_batch_format_round_trips_and_refuses_malformed_bytes() {
        let mut batch = Vec::new();
        let descriptor = [1u8; REQUEST_DESCRIPTOR_BYTES];
        batch_encode(3, &[7; 32], &descriptor, &[2; 64], &mut batch);
        let parts = batch_decode(&batch).expect("decodes");
        assert_eq!(
            (parts.operation, parts.format, parts.records.len()),
            (3, BATCH_FORMAT_SIGNED, 32)
        );
        assert_eq!(
            (parts.requests, parts.signatures),
            (&descriptor[..], &[2u8; 64][..])
        );
        batch_encode(3, &[7; 32], &descriptor, &[], &mut batch);
        let parts = batch_decode(&batch).expect("decodes");
        assert_eq!(
            (parts.format, parts.requests.len(), parts.signatures.len()),
            (BATCH_FORMAT_UNSIGNED, 32, 0)
        );
        batch[2] = 2; // unknown format
        assert_eq!(batch_decode(&batch), None);
        assert_eq!(batch_decode(&[3, 0, 0, 0]), None);
    }
}
