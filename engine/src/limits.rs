//! Named limits, units last. Every bound in percore is one of these (or a config field
//! defaulting to one of these); relations between them are checked at compile time.

/// Largest number of items one batch ring operation moves (push a slice / pop into a buffer).
pub const RING_BATCH_ITEMS_MAX: usize = 16_384;

/// Default capacity of a shard's transaction ring (entries; power of two).
pub const TX_RING_CAPACITY_DEFAULT: usize = 16_384;

/// Default number of pooled transaction slots per shard.
pub const POOL_TRANSACTIONS_DEFAULT: usize = 10_000;
/// Default number of pooled batches per shard.
pub const POOL_BATCHES_DEFAULT: usize = 5_000;
/// Default number of pooled message buffers per shard.
pub const POOL_MESSAGES_DEFAULT: usize = 50_000;
/// Default size of one pooled message buffer (bytes).
pub const MESSAGE_BUFFER_BYTES_DEFAULT: usize = 256;

/// Default largest number of entries sealed into one batch.
pub const BATCH_ENTRIES_MAX_DEFAULT: usize = 1_000;
/// Largest batch size a configuration may ask for.
pub const BATCH_ENTRIES_MAX_LIMIT: usize = 10_000;

const _: () = assert!(TX_RING_CAPACITY_DEFAULT.is_power_of_two());
const _: () = assert!(BATCH_ENTRIES_MAX_DEFAULT <= BATCH_ENTRIES_MAX_LIMIT);
const _: () = assert!(BATCH_ENTRIES_MAX_LIMIT <= RING_BATCH_ITEMS_MAX);
const _: () = assert!(BATCH_ENTRIES_MAX_LIMIT <= TX_RING_CAPACITY_DEFAULT);
