//! Heap allocations on the journal's write path, counted.
//!
//! A counting global allocator (the same pattern as `core_alloc.rs`) wraps the system
//! allocator, per thread. `Journal::stage` must allocate nothing. `Journal::commit` is
//! measured and bounded: glommio allocates per I/O (its `Source` bookkeeping) and the
//! journal takes one fresh staging `DmaBuffer` per group commit (glommio's `write_at` owns
//! and frees the buffer it writes; see the module docs of `percore_shards::journal`).

use percore_engine::journal::EntryMeta;
use percore_shards::journal::{FsyncPolicy, Journal, JournalConfig};

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Heap allocations one group commit may make: glommio's per-I/O bookkeeping (about six
/// per operation, measured: the write and the `fdatasync`) and the journal's fresh staging
/// buffer (none when it fits the executor's registered io memory).
const COMMIT_ALLOCATIONS_MAX: u64 = 16;

#[test]
fn stage_allocates_nothing_and_commit_allocates_a_bounded_few() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Dsync, FsyncPolicy::Never] {
        measure(fsync);
    }
}

fn measure(fsync: FsyncPolicy) {
    let root = std::env::temp_dir().join(format!(
        "percore-journal-alloc-{fsync:?}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("shard-0");
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let config = JournalConfig {
                dir,
                shard: 0,
                cluster_id: 9,
                segment_bytes: 64 << 20,
                body_bytes_max: 128 * 1024,
                fsync,
                write_buffer_bytes: 1 << 20,
            };
            let (mut journal, _) = Journal::open(config, |_| {}).await.expect("open");
            let body = vec![0x42u8; 128 * 1024];
            let mut op = 1u64;
            let mut stage_allocations = 0;
            let mut commit_allocations = Vec::new();
            for round in 0..40 {
                for _ in 0..(round % 4 + 1) {
                    let meta = EntryMeta {
                        shard: 0,
                        view: 0,
                        op,
                        operation: 1,
                        entry_count: 1024,
                        record_bytes: 128,
                        request_count: 0,
                    };
                    let before = allocations();
                    journal.stage(meta, &body).expect("stage");
                    stage_allocations += allocations() - before;
                    op += 1;
                }
                let before = allocations();
                journal.commit().await.expect("commit");
                commit_allocations.push(allocations() - before);
            }
            let steady = &commit_allocations[4..];
            println!(
                "heap allocations per group commit (fsync {fsync:?}): min {} max {}",
                steady.iter().min().expect("commits"),
                steady.iter().max().expect("commits"),
            );
            let before = allocations();
            journal.write_superblock().await.expect("superblock");
            journal.write_superblock().await.expect("superblock");
            println!(
                "heap allocations per superblock write (buffer reused): {}",
                (allocations() - before) / 2
            );
            assert_eq!(stage_allocations, 0, "stage must not allocate");
            assert!(steady.iter().all(|&count| count <= COMMIT_ALLOCATIONS_MAX));
            journal.close().await.expect("close");
        })
        .expect("executor")
        .join()
        .expect("join");
    let _ = std::fs::remove_dir_all(&root);
}
