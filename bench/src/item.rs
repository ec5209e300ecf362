//! The payload moved through rings and stored in pools: `N` bytes, a `u64` key up front.
//!
//! The key is what kernels sum into their checksum; the remaining bytes are zero but are
//! still copied on every push and pop, so `N` is the true per-item copy size.

/// Smallest item that can carry its key.
pub const ITEM_BYTES_MIN: usize = 8;

/// A `Copy` payload of exactly `N` bytes whose first eight bytes hold a little-endian key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item<const N: usize>(pub [u8; N]);

impl<const N: usize> Item<N> {
    const SIZE_CHECK: () = assert!(N >= ITEM_BYTES_MIN, "an item must hold its u64 key");

    /// An item carrying `key`.
    #[inline(always)]
    pub fn new(key: u64) -> Self {
        let () = Self::SIZE_CHECK;
        let mut bytes = [0u8; N];
        bytes[..ITEM_BYTES_MIN].copy_from_slice(&key.to_le_bytes());
        Self(bytes)
    }

    /// The key this item was made with.
    #[inline(always)]
    pub fn key(&self) -> u64 {
        let mut key = [0u8; ITEM_BYTES_MIN];
        key.copy_from_slice(&self.0[..ITEM_BYTES_MIN]);
        u64::from_le_bytes(key)
    }
}

impl<const N: usize> Default for Item<N> {
    fn default() -> Self {
        Self::new(0)
    }
}

/// Sum of the keys `0..count`: the checksum every kernel must reproduce.
pub const fn key_sum(count: u64) -> u64 {
    // Wrapping arithmetic keeps huge counts well defined; both sides wrap alike.
    if count == 0 {
        0
    } else if count.is_multiple_of(2) {
        (count / 2).wrapping_mul(count - 1)
    } else {
        count.wrapping_mul((count - 1) / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_and_size_is_exact() {
        assert_eq!(Item::<16>::new(0xDEAD_BEEF).key(), 0xDEAD_BEEF);
        assert_eq!(Item::<128>::new(u64::MAX).key(), u64::MAX);
        assert_eq!(size_of::<Item<16>>(), 16);
        assert_eq!(size_of::<Item<128>>(), 128);
    }

    #[test]
    fn key_sum_matches_loop() {
        for count in [0u64, 1, 2, 3, 10, 1001] {
            assert_eq!(key_sum(count), (0..count).sum::<u64>());
        }
    }
}
