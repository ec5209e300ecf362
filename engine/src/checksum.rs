//! Checksums and digests: one place that decides which function protects what.
//!
//! This module owns the choice of `frame_checksum` (CRC-32C, for frames on the wire) and
//! `digest256` (BLAKE3, for state digests and anything compared across replicas). Callers name
//! the purpose, not the algorithm, so the journal can later pick by measurement without
//! touching call sites. It must never be used as authentication: CRC-32C catches accidents
//! (every 1- and 2-bit error, every burst up to 32 bits), not adversaries.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// A frame checksum (CRC-32C, Castagnoli polynomial).
pub type FrameChecksum = u32;

/// A 256-bit digest (BLAKE3).
pub type Digest256 = [u8; 32];

/// Checksum of one frame part (header or body): CRC-32C, which runs on the SSE4.2 / ARMv8
/// CRC instructions where present (tens of GB/s), so checking every frame costs little.
pub fn frame_checksum(bytes: &[u8]) -> FrameChecksum {
    crc32c::crc32c(bytes)
}

/// Continues `checksum` over `bytes`: `frame_checksum_append(frame_checksum(a), b)` equals
/// the checksum of `a` followed by `b`.
pub fn frame_checksum_append(checksum: FrameChecksum, bytes: &[u8]) -> FrameChecksum {
    crc32c::crc32c_append(checksum, bytes)
}

/// BLAKE3 digest of `bytes`.
pub fn digest256(bytes: &[u8]) -> Digest256 {
    *blake3::hash(bytes).as_bytes()
}

/// Incremental [`digest256`]: `update` in pieces, then `finalize`.
#[derive(Clone, Debug, Default)]
pub struct Digest256Hasher {
    hasher: blake3::Hasher,
}

impl Digest256Hasher {
    /// A hasher over no bytes yet.
    pub fn new() -> Digest256Hasher {
        Digest256Hasher::default()
    }

    /// Appends `bytes` to the input.
    pub fn update(&mut self, bytes: &[u8]) -> &mut Digest256Hasher {
        self.hasher.update(bytes);
        self
    }

    /// The digest of everything appended so far.
    pub fn finalize(&self) -> Digest256 {
        *self.hasher.finalize().as_bytes()
    }

    /// The digest's first 8 bytes as a little-endian `u64` (a short digest to compare, such
    /// as `StateMachine::settings_digest`).
    pub fn finalize_u64(&self) -> u64 {
        let digest = self.finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_checksum_matches_the_crc32c_check_value() {
        // The standard CRC-32C check value (RFC 3720, appendix B.4).
        assert_eq!(frame_checksum(b"123456789"), 0xe306_9283);
        assert_eq!(frame_checksum(b""), 0);
    }

    #[test]
    fn frame_checksum_append_equals_one_shot() {
        let bytes = b"percore frame checksum";
        for split in 0..=bytes.len() {
            let (head, tail) = bytes.split_at(split);
            assert_eq!(
                frame_checksum_append(frame_checksum(head), tail),
                frame_checksum(bytes)
            );
        }
    }

    #[test]
    fn digest256_matches_the_blake3_empty_vector() {
        let expected = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        let hex: String = digest256(b"").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn incremental_digest_equals_one_shot() {
        let mut hasher = Digest256Hasher::new();
        hasher.update(b"per").update(b"core");
        assert_eq!(hasher.finalize(), digest256(b"percore"));
    }
}
