//! The journal recovers even when glommio's io_uring poll-ring probe was fooled.
//!
//! glommio decides once per process and device whether O_DIRECT reads go to the poll ring,
//! by reading offset 0 of the first DMA file opened there. An empty file answers with
//! success, after which every O_DIRECT read fails with EOPNOTSUPP on a device without poll
//! queues. This test (its own process, so the probe is fresh) opens an empty DMA file first
//! and checks that the journal still writes, recovers and replays through its buffered-read
//! fallback.

use percore_engine::journal::{EntryMeta, Tail};
use percore_shards::journal::{FsyncPolicy, Journal, JournalConfig};

#[test]
fn journal_recovers_after_an_empty_file_fooled_the_poll_probe() {
    let root = std::env::temp_dir().join(format!("percore-journal-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("temp dir");
    let dir = root.join("shard-0");
    let probe_path = root.join("empty.dat");
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            // The first DMA open on this device in this process: an empty file.
            let empty = glommio::io::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .dma_open(&probe_path)
                .await
                .expect("empty file");
            empty.close().await.expect("close empty");
            // Whether this device now refuses O_DIRECT reads (it does on one without poll
            // queues; a tmpfs or a polled NVMe device reads fine, and the test still holds).
            std::fs::write(&probe_path, vec![1u8; 4096]).expect("fill probe file");
            let filled = glommio::io::DmaFile::open(&probe_path)
                .await
                .expect("reopen");
            let refused = filled.read_at_aligned(0, 4096).await.is_err();
            filled.close().await.expect("close filled");
            println!("O_DIRECT reads refused after the fooled probe: {refused}");

            let config = JournalConfig {
                dir: dir.clone(),
                shard: 0,
                cluster_id: 7,
                segment_bytes: 1 << 20,
                body_bytes_max: 16 * 1024,
                fsync: FsyncPolicy::Always,
                write_buffer_bytes: 256 * 1024,
            };
            let (mut journal, recovered) =
                Journal::open(config.clone(), |_| {}).await.expect("create");
            assert_eq!(recovered.op_last, 0);
            let mut written = Vec::new();
            for op in 1..=20u64 {
                let body = vec![op as u8; 128 * (op as usize % 5 + 1)];
                let meta = EntryMeta {
                    shard: 0,
                    view: 1,
                    op,
                    operation: 2,
                    entry_count: (body.len() / 128) as u32,
                    record_bytes: 128,
                    request_count: 0,
                };
                journal.stage(meta, &body).expect("stage");
                written.push((meta, body));
                if op % 4 == 0 {
                    journal.commit().await.expect("commit");
                }
            }
            journal.write_superblock().await.expect("superblock");
            journal.close().await.expect("close");

            let mut replayed = Vec::new();
            let (_journal, recovered) = Journal::open(config, |entry| {
                replayed.push((entry.meta, entry.body.to_vec()));
            })
            .await
            .expect("reopen");
            assert_eq!(recovered.op_last, 20);
            assert_eq!(recovered.tail, Tail::Clean);
            assert_eq!(replayed, written);
        })
        .expect("executor")
        .join()
        .expect("join");
    let _ = std::fs::remove_dir_all(&root);
}
