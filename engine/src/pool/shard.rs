//! The three typed pools one shard owns, sized once from [`PoolConfig`].

use super::{Pool, PoolError, PoolStats, check_capacity};
use crate::limits;
use std::fmt;

/// Bytes in one transaction record (the `Transfer` record is 128 bytes, `Pod`).
pub const TX_SLOT_BYTES: usize = 128;

/// Storage for one fixed-size transaction record, cache-line aligned.
///
/// The record type lands later; any `Pod` type of exactly [`TX_SLOT_BYTES`] bytes and
/// alignment at most 64 converts to and from a slot with [`TxSlot::record`],
/// [`TxSlot::record_mut`] and [`TxSlot::from_record`] (checked at compile time).
#[derive(Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub struct TxSlot {
    /// The raw record bytes.
    pub bytes: [u8; TX_SLOT_BYTES],
}

const _: () = assert!(size_of::<TxSlot>() == TX_SLOT_BYTES);

impl TxSlot {
    /// An all-zero slot.
    pub const ZEROED: TxSlot = TxSlot {
        bytes: [0; TX_SLOT_BYTES],
    };

    /// The slot viewed as a record `R`.
    #[inline]
    pub fn record<R: bytemuck::Pod>(&self) -> &R {
        const { assert_record_fits::<R>() };
        bytemuck::cast_ref(self)
    }

    /// The slot viewed as a mutable record `R`.
    #[inline]
    pub fn record_mut<R: bytemuck::Pod>(&mut self) -> &mut R {
        const { assert_record_fits::<R>() };
        bytemuck::cast_mut(self)
    }

    /// A slot holding `record`.
    #[inline]
    pub fn from_record<R: bytemuck::Pod>(record: R) -> Self {
        const { assert_record_fits::<R>() };
        bytemuck::cast(record)
    }
}

const fn assert_record_fits<R>() {
    assert!(
        size_of::<R>() == TX_SLOT_BYTES,
        "record must be TX_SLOT_BYTES"
    );
    assert!(
        align_of::<R>() <= align_of::<TxSlot>(),
        "record alignment above 64"
    );
}

impl fmt::Debug for TxSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxSlot").finish_non_exhaustive()
    }
}

/// One batch being built or replicated: metadata plus the indices of its transactions in
/// the shard's transaction pool. The index buffer is allocated once, at
/// `batch_entries_max`, and never grows.
pub struct BatchSlot {
    /// View the leader assigned the batch in (0 until assigned).
    pub view: u64,
    /// Op number the leader assigned the batch (0 until assigned).
    pub op: u64,
    tx_indices: Box<[u32]>,
    len: usize,
}

impl BatchSlot {
    /// An empty batch with room for `entries_max` transaction indices. Allocates: call it
    /// only at start-up (from a pool's `init`).
    pub fn new(entries_max: usize) -> Self {
        Self {
            view: 0,
            op: 0,
            tx_indices: vec![0; entries_max].into_boxed_slice(),
            len: 0,
        }
    }

    /// Appends a transaction index; hands it back if the batch is full.
    #[inline]
    pub fn push(&mut self, tx_index: u32) -> Result<(), u32> {
        let Some(entry) = self.tx_indices.get_mut(self.len) else {
            return Err(tx_index);
        };
        *entry = tx_index;
        self.len += 1;
        Ok(())
    }

    /// The transaction indices pushed so far.
    #[inline]
    pub fn tx_indices(&self) -> &[u32] {
        &self.tx_indices[..self.len]
    }

    /// Number of entries.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch has no entries.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the batch holds `capacity` entries.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len == self.tx_indices.len()
    }

    /// Most entries the batch can hold (`batch_entries_max`).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.tx_indices.len()
    }

    /// Empties the batch and zeroes its metadata; keeps the buffer.
    #[inline]
    pub fn reset(&mut self) {
        self.view = 0;
        self.op = 0;
        self.len = 0;
    }
}

impl fmt::Debug for BatchSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchSlot")
            .field("view", &self.view)
            .field("op", &self.op)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// A fixed-size byte buffer for one message, with a fill length. Allocated once at
/// `message_bytes`; never grows.
pub struct MessageBuf {
    bytes: Box<[u8]>,
    len: usize,
}

impl MessageBuf {
    /// An empty buffer of `capacity` bytes. Allocates: call it only at start-up (from a
    /// pool's `init`).
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: vec![0; capacity].into_boxed_slice(),
            len: 0,
        }
    }

    /// The filled bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The whole buffer, for writing in place; follow with [`MessageBuf::set_len`].
    #[inline]
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Sets the fill length after writing through [`MessageBuf::buffer_mut`].
    #[inline]
    pub fn set_len(&mut self, len: usize) -> Result<(), PoolError> {
        if len > self.bytes.len() {
            return Err(PoolError::MessageTooLarge {
                len,
                capacity: self.bytes.len(),
            });
        }
        self.len = len;
        Ok(())
    }

    /// Replaces the contents with `src`; an `Err` if it does not fit (contents unchanged).
    #[inline]
    pub fn fill_from(&mut self, src: &[u8]) -> Result<(), PoolError> {
        let Some(dst) = self.bytes.get_mut(..src.len()) else {
            return Err(PoolError::MessageTooLarge {
                len: src.len(),
                capacity: self.bytes.len(),
            });
        };
        dst.copy_from_slice(src);
        self.len = src.len();
        Ok(())
    }

    /// Filled length.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is filled.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buffer size (`message_bytes`).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.bytes.len()
    }

    /// Empties the buffer (bytes are left as they are).
    #[inline]
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

impl fmt::Debug for MessageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// Sizes of one shard's pools. Everything is allocated from these once, at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Transaction slots ([`TxSlot`], 128 bytes each).
    pub transactions: usize,
    /// Batches ([`BatchSlot`]).
    pub batches: usize,
    /// Message buffers ([`MessageBuf`]).
    pub messages: usize,
    /// Transaction indices one batch holds.
    pub batch_entries_max: usize,
    /// Bytes in one message buffer.
    pub message_bytes: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            transactions: limits::POOL_TRANSACTIONS_DEFAULT,
            batches: limits::POOL_BATCHES_DEFAULT,
            messages: limits::POOL_MESSAGES_DEFAULT,
            batch_entries_max: limits::BATCH_ENTRIES_MAX_DEFAULT,
            message_bytes: limits::MESSAGE_BUFFER_BYTES_DEFAULT,
        }
    }
}

impl PoolConfig {
    /// Checks every field and the memory each pool needs, allocating nothing.
    pub fn validate(&self) -> Result<(), PoolError> {
        check_capacity(ShardPools::TRANSACTIONS, self.transactions)?;
        check_capacity(ShardPools::BATCHES, self.batches)?;
        check_capacity(ShardPools::MESSAGES, self.messages)?;
        if self.batch_entries_max == 0 {
            return Err(PoolError::ZeroSize {
                field: "batch_entries_max",
            });
        }
        if self.batch_entries_max > limits::BATCH_ENTRIES_MAX_LIMIT {
            return Err(PoolError::BatchEntriesTooLarge {
                batch_entries_max: self.batch_entries_max,
                max: limits::BATCH_ENTRIES_MAX_LIMIT,
            });
        }
        if self.message_bytes == 0 {
            return Err(PoolError::ZeroSize {
                field: "message_bytes",
            });
        }
        check_total_bytes(
            ShardPools::TRANSACTIONS,
            self.transactions,
            size_of::<TxSlot>(),
        )?;
        let batch_bytes = size_of::<BatchSlot>() + self.batch_entries_max * size_of::<u32>();
        check_total_bytes(ShardPools::BATCHES, self.batches, batch_bytes)?;
        let message_bytes = size_of::<MessageBuf>().saturating_add(self.message_bytes);
        check_total_bytes(ShardPools::MESSAGES, self.messages, message_bytes)
    }
}

/// Rejects a pool whose total size would not fit in one allocation (`isize::MAX` bytes).
fn check_total_bytes(
    pool: &'static str,
    capacity: usize,
    bytes_each: usize,
) -> Result<(), PoolError> {
    match capacity.checked_mul(bytes_each) {
        Some(total) if total <= isize::MAX as usize => Ok(()),
        _ => Err(PoolError::TotalBytesOverflow {
            pool,
            capacity,
            bytes_each,
        }),
    }
}

/// The pools one shard owns: transaction records, batches and message buffers.
#[derive(Debug)]
pub struct ShardPools {
    /// Transaction record slots.
    pub transactions: Pool<TxSlot>,
    /// Batches (metadata + transaction indices).
    pub batches: Pool<BatchSlot>,
    /// Message buffers.
    pub messages: Pool<MessageBuf>,
}

impl ShardPools {
    /// Name of the transaction pool in errors and stats.
    pub const TRANSACTIONS: &'static str = "transactions";
    /// Name of the batch pool in errors and stats.
    pub const BATCHES: &'static str = "batches";
    /// Name of the message pool in errors and stats.
    pub const MESSAGES: &'static str = "messages";

    /// Validates `config` and allocates every pool. The only allocations the pools make.
    pub fn new(config: &PoolConfig) -> Result<Self, PoolError> {
        config.validate()?;
        let transactions = Pool::new(Self::TRANSACTIONS, config.transactions, |_| TxSlot::ZEROED)?;
        let batches = Pool::new(Self::BATCHES, config.batches, |_| {
            BatchSlot::new(config.batch_entries_max)
        })?;
        let messages = Pool::new(Self::MESSAGES, config.messages, |_| {
            MessageBuf::new(config.message_bytes)
        })?;
        Ok(Self {
            transactions,
            batches,
            messages,
        })
    }

    /// Counters of all three pools, in the order transactions, batches, messages.
    pub fn stats(&self) -> [PoolStats; 3] {
        [
            self.transactions.stats(),
            self.batches.stats(),
            self.messages.stats(),
        ]
    }

    /// Clears all three pools (see [`Pool::clear`]).
    pub fn clear(&mut self) {
        self.transactions.clear();
        self.batches.clear();
        self.messages.clear();
    }
}
