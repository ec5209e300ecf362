//! Large tables allocated once at start-up: the ledger's accounts, transfer window and
//! index (about 168 MiB per shard by default).
//!
//! [`zeroed_table`] commits every page before the first transaction (each element is
//! written, never left to the allocator's lazily mapped zero pages), so an out-of-memory
//! surfaces at start-up and the hot path takes no page faults.
//!
//! Before writing it, a table of [`HUGE_PAGE_BYTES`] or more is advised to the kernel for
//! transparent huge pages (`madvise(MADV_HUGEPAGE)`). These tables are read at random, a
//! few cache lines per transfer: with 4 KiB pages nearly every such access also misses the
//! TLB (168 MiB is 43,000 pages; a core's second-level TLB holds a few thousand), and under
//! a hypervisor a TLB miss is a two-level page walk. Backed by 2 MiB pages the same
//! tables need under a hundred TLB entries. The advice changes only how the kernel backs
//! the pages, never their contents; the kernel decides:
//! - `/sys/kernel/mm/transparent_hugepage/enabled` = `madvise` (the usual distribution
//!   default): advised tables get huge pages, the rest of the process does not;
//! - `always`: every large anonymous mapping gets them, advised or not;
//! - `never`, or a kernel without transparent huge pages: 4 KiB pages, as without advice.
//!
//! Which it was is visible as `AnonHugePages` in `/proc/<pid>/smaps_rollup`; the node logs
//! it at start-up. This module's one `unsafe` block is the `madvise` call.

use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::Pod;

/// The transparent huge page size on x86-64 and most arm64 kernels (bytes). Tables this
/// large or larger are advised; only the whole huge pages inside a table are.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Bytes advised for huge pages so far by this process (the kernel may have backed fewer).
static ADVISED_BYTES: AtomicU64 = AtomicU64::new(0);
/// `madvise` calls refused so far (a kernel without transparent huge pages: `EINVAL`).
static ADVICE_REFUSED: AtomicU64 = AtomicU64::new(0);

/// What this process has advised for huge pages so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePageAdvice {
    /// Bytes of table memory advised (whole huge pages only).
    pub advised_bytes: u64,
    /// Advice calls the kernel refused.
    pub refused: u64,
}

/// A snapshot of the process's huge page advice (all tables, all shards).
pub fn huge_page_advice() -> HugePageAdvice {
    HugePageAdvice {
        advised_bytes: ADVISED_BYTES.load(Ordering::Relaxed),
        refused: ADVICE_REFUSED.load(Ordering::Relaxed),
    }
}

/// `len` zeroed elements, each written into fresh memory after the memory was advised for
/// huge pages (when at least [`HUGE_PAGE_BYTES`]): see the module documentation.
pub fn zeroed_table<T: Pod>(len: usize) -> Box<[T]> {
    let mut table: Vec<T> = Vec::with_capacity(len);
    advise_huge_pages(
        table.as_mut_ptr().cast::<u8>(),
        table.capacity() * size_of::<T>(),
    );
    table.resize(len, T::zeroed());
    table.into_boxed_slice()
}

/// Advises the whole huge pages inside `[start, start + bytes)` for transparent huge pages.
fn advise_huge_pages(start: *mut u8, bytes: usize) {
    if cfg!(miri) || bytes < HUGE_PAGE_BYTES {
        return;
    }
    let address = start.addr();
    let first = address.next_multiple_of(HUGE_PAGE_BYTES);
    let end = (address + bytes) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if end <= first {
        return;
    }
    let length = end - first;
    // SAFETY: MADV_HUGEPAGE only changes how the kernel backs the range (it may back it
    // with huge pages from the next fault on, or collapse pages already there); it never
    // changes the range's contents, its mapping or its protection, so no memory that Rust
    // code can observe changes. The range is inside the allocation `start` points to.
    let advised = unsafe {
        rustix::mm::madvise(
            start.with_addr(first).cast::<core::ffi::c_void>(),
            length,
            rustix::mm::Advice::LinuxHugepage,
        )
    };
    match advised {
        Ok(()) => ADVISED_BYTES.fetch_add(length as u64, Ordering::Relaxed),
        Err(_) => ADVICE_REFUSED.fetch_add(1, Ordering::Relaxed),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tables_are_zeroed() {
        let table: Box<[u64]> = zeroed_table(1_000);
        assert_eq!(table.len(), 1_000);
        assert!(table.iter().all(|&word| word == 0));
    }

    #[test]
    #[cfg_attr(miri, ignore = "no system calls under miri")]
    fn a_large_table_is_advised_in_whole_huge_pages() {
        let before = huge_page_advice();
        let table: Box<[u64]> = zeroed_table(3 * HUGE_PAGE_BYTES / 8);
        assert!(table.iter().all(|&word| word == 0));
        let after = huge_page_advice();
        let advised = (after.advised_bytes - before.advised_bytes) as usize;
        let refused = after.refused - before.refused;
        // Other tests may advise at the same time: at least this table's whole pages.
        assert!(
            refused > 0 || advised >= 2 * HUGE_PAGE_BYTES,
            "advised {advised} bytes, refused {refused}"
        );
        assert_eq!(advised % HUGE_PAGE_BYTES, 0);
    }
}
