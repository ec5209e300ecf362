//! `percore inspect`: read a node's data directory offline and say what is there.
//!
//! For every shard directory it prints the superblock, the checkpoint (op, checksum, its
//! snapshot file and whether that verifies), each segment's entries (ops, bytes, the last
//! checksum) and the first problem found: a torn tail (which the node would truncate at
//! start), corruption (which a replicated node cuts at start and repairs from its peers,
//! recovering meanwhile, and a node without peers refuses to start on), a journal that ends
//! below the superblock's `op_durable` (a replicated node recovers the rest from its
//! peers), or a bad snapshot. Segments are
//! scanned from the previous checkpoint, as recovery does (older ones are listed, not read).
//! With `--replay` it restores each shard's checkpoint snapshot into a reference ledger,
//! replays the journal after it, and prints every account's balance and the conservation
//! sum. It uses plain blocking reads: it is a tool, not a shard.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use percore_engine::journal::{
    self, Checkpoint, JournalChecksum, SUPERBLOCK_BYTES, Superblock, Tail,
};
use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_engine::session::{RequestDescriptor, Sessioned, descriptors_valid};
use percore_engine::state_machine::StateMachine;

/// What to inspect.
#[derive(Debug, Clone)]
pub struct InspectConfig {
    /// The node's `--data-dir`.
    pub data_dir: PathBuf,
    /// Largest batch body to accept (bytes).
    pub body_bytes_max: usize,
    /// Replay into a ledger with these sizes and print balances.
    pub replay: Option<LedgerConfig>,
    /// Client sessions of the replayed state machine (the node's `--session-clients-max`).
    pub session_clients_max: usize,
}

/// Why inspection could not run.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No `shard-<i>` directories.
    #[error("{0}: no shard-<i> directories")]
    Empty(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InspectError + '_ {
    move |source| InspectError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Shard directories under `data_dir`, in shard order.
fn shard_dirs(data_dir: &Path) -> Result<Vec<PathBuf>, InspectError> {
    let mut shards: Vec<(u32, PathBuf)> = std::fs::read_dir(data_dir)
        .map_err(io(data_dir))?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let index = name.strip_prefix("shard-")?.parse().ok()?;
            Some((index, entry.path()))
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(InspectError::Empty(data_dir.to_path_buf()));
    }
    Ok(shards.into_iter().map(|(_, path)| path).collect())
}

fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, InspectError> {
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some((journal::parse_segment_name(&name)?, entry.path()))
        })
        .collect();
    segments.sort();
    Ok(segments)
}

/// Reads and prints the superblock of `dir`; `None` (a problem, printed) if neither copy
/// is valid.
fn superblock_read(dir: &Path, out: &mut String) -> Result<Option<Superblock>, InspectError> {
    let path = dir.join("superblock");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let (copy0, copy1) = bytes.split_at(SUPERBLOCK_BYTES.min(bytes.len()));
    match journal::superblock_latest(copy0, copy1) {
        Ok(superblock) => {
            let _ = writeln!(
                out,
                "  superblock: sequence {}, view {}, log_view {}, commit_max {}, op_durable {}, \
                 segment_bytes {}, settings digest {}{}",
                superblock.sequence,
                superblock.view,
                superblock.log_view,
                superblock.commit_max,
                superblock.op_durable,
                superblock.segment_bytes,
                match superblock.settings_digest {
                    0 => "not recorded".to_string(),
                    digest => crate::config::SettingsDigest(digest).to_string(),
                },
                if superblock.replacing {
                    ", replacing (format --replace: rebuilding from peers, votes in nothing yet)"
                } else {
                    ""
                }
            );
            Ok(Some(superblock))
        }
        Err(error) => {
            let _ = writeln!(out, "  PROBLEM superblock {}: {error}", path.display());
            Ok(None)
        }
    }
}

/// Whether the journal was written under other settings that decide results than the
/// replay's (the ledger's limits and the session table's width, as `percore node` computes
/// them): its balances would then not be the node's. Said as a problem. BFT journals are
/// not compared: their digest also covers the node's batch cap, which inspect is not told.
fn replay_settings_differ(
    config: &InspectConfig,
    ledger: &LedgerConfig,
    shard_count: u32,
    superblock: &Superblock,
    out: &mut String,
) -> bool {
    let replay = crate::config::SettingsDigest::of_ledger(
        shard_count as usize,
        ledger,
        config.session_clients_max,
    );
    let recorded = superblock.settings_digest;
    if recorded == 0 || recorded == replay.0 {
        return false;
    }
    let _ = writeln!(
        out,
        "  PROBLEM settings: the journal was written under settings digest {}, this replay \
         runs under {replay}: pass the node's --accounts-max, --transfers-max, \
         --credit-legs-max and --session-clients-max, or the balances below are not the node's",
        crate::config::SettingsDigest(recorded)
    );
    true
}

/// Prints the checkpoint and verifies its snapshot file; restores it into `ledger` when
/// given. Returns whether the snapshot is good (true when there is no checkpoint).
fn checkpoint_inspect(
    dir: &Path,
    superblock: &Superblock,
    ledger: Option<&mut Replayed>,
    out: &mut String,
) -> Result<bool, InspectError> {
    let checkpoint = superblock.checkpoint;
    let previous = superblock.checkpoint_previous;
    if checkpoint.op == 0 {
        let _ = writeln!(out, "  checkpoint: none (replay from op 1)");
        return Ok(true);
    }
    let _ = writeln!(
        out,
        "  checkpoint: op {}, checksum {:032x}, next entry at segment {} offset {}; previous op {} (segment {} offset {})",
        checkpoint.op,
        checkpoint.checksum,
        checkpoint.segment,
        checkpoint.offset,
        previous.op,
        previous.segment,
        previous.offset
    );
    let path = dir.join(journal::snapshot_file_name(checkpoint.op));
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = writeln!(out, "  PROBLEM snapshot {}: {error}", path.display());
            return Ok(false);
        }
    };
    match journal::verify_snapshot(&bytes, superblock) {
        Ok((meta, snapshot)) => {
            let _ = writeln!(
                out,
                "  snapshot {}: {} bytes, checksum {:032x}, verified",
                path.display(),
                meta.snapshot_bytes,
                meta.snapshot_checksum
            );
            let Some(ledger) = ledger else {
                return Ok(true);
            };
            let restored = ledger.restore(snapshot).and_then(|()| {
                if ledger.digest() == meta.digest {
                    Ok(())
                } else {
                    Err(percore_engine::state_machine::RestoreError::DigestMismatch)
                }
            });
            if let Err(error) = restored {
                let _ = writeln!(
                    out,
                    "  PROBLEM snapshot {}: restore: {error}",
                    path.display()
                );
                return Ok(false);
            }
            Ok(true)
        }
        Err(error) => {
            let _ = writeln!(out, "  PROBLEM snapshot {}: {error}", path.display());
            Ok(false)
        }
    }
}

/// Where scanning starts: the previous checkpoint, or the latest one if the previous one's
/// segment is gone (as recovery does).
fn scan_start(superblock: &Superblock, segments: &[(u64, PathBuf)]) -> Checkpoint {
    let previous = superblock.checkpoint_previous;
    if previous == superblock.checkpoint || segments.iter().any(|(s, _)| *s == previous.segment) {
        previous
    } else {
        superblock.checkpoint
    }
}

/// Inspects `config.data_dir`; returns the report text and whether a problem was found.
pub fn run(config: &InspectConfig) -> Result<(String, bool), InspectError> {
    let mut out = String::new();
    let mut problem = false;
    match crate::format::describe(&config.data_dir) {
        Ok(Some(format)) => {
            let _ = writeln!(out, "format: {format}");
        }
        Ok(None) => {
            let _ = writeln!(
                out,
                "format: none (a node without peers; a replica refuses to start without one)"
            );
        }
        Err(error) => {
            let _ = writeln!(out, "format: PROBLEM: {error}");
            problem = true;
        }
    }
    if let Some(holder) = crate::format::in_use_by(&config.data_dir) {
        let _ = writeln!(
            out,
            "note: a running node holds this directory ({holder}): its journals may change \
             while they are read, so what follows may not be one consistent state"
        );
    } else {
        match crate::format::writes_landing(&config.data_dir) {
            Ok(None) => {}
            Ok(Some((path, files))) => {
                let _ = writeln!(
                    out,
                    "note: writes a killed node left in flight are still landing in {files} \
                     file(s) ({} among them): what follows may change under them; a node \
                     started now waits for them before it reads anything",
                    path.display()
                );
            }
            Err(error) => {
                let _ = writeln!(
                    out,
                    "note: could not tell whether writes are landing: {error}"
                );
            }
        }
    }
    let shards = shard_dirs(&config.data_dir)?;
    let shard_count = shards.len() as u32;
    let mut conservation = 0i128;
    let mut in_flight = 0u128;
    for (index, dir) in shards.iter().enumerate() {
        let _ = writeln!(out, "shard {index}: {}", dir.display());
        // A BFT replica's sessions refused replays as it applied (`docs/bft.md` §13): the
        // replay must refuse the same requests to reach the same state.
        let bft = crate::bft::certs_dir(dir, index).is_dir();
        let mut ledger = config.replay.map(|ledger| {
            let mut machine = Sessioned::new(
                Ledger::new(LedgerConfig {
                    shard_index: index as u32,
                    shard_count,
                    ..ledger
                }),
                config.session_clients_max,
                ledger.batch_entries_max,
            );
            if bft {
                machine.refuse_session_replays();
            }
            machine
        });
        let Some(superblock) = superblock_read(dir, &mut out)? else {
            problem = true;
            continue;
        };
        match config.replay {
            Some(ledger) if !bft => {
                problem |=
                    replay_settings_differ(config, &ledger, shard_count, &superblock, &mut out);
            }
            Some(_) => {
                let _ = writeln!(
                    out,
                    "  note: settings not compared with the journal's (a BFT digest also \
                     covers the node's batch cap, which inspect is not told)"
                );
            }
            None => {}
        }
        if !checkpoint_inspect(dir, &superblock, ledger.as_mut(), &mut out)? {
            problem = true;
            continue;
        }
        problem |= segments_inspect(config, dir, &superblock, ledger.as_mut(), &mut out, index)?;
        if let Some(ledger) = ledger.as_ref().map(Sessioned::inner) {
            conservation += ledger.conservation_sum();
            in_flight += ledger.in_flight();
            for account in ledger.accounts() {
                let balance = account.credits_posted as i128 - account.debits_posted as i128;
                let _ = writeln!(out, "balance {:#x} {balance}", account.id);
            }
        }
    }
    if config.replay.is_some() {
        let _ = writeln!(out, "in_flight {in_flight}");
        // Balances plus suspense over every shard; a credit leg between shards that was
        // debited but not yet credited is in `in_flight` (0 when no leg is pending).
        let _ = writeln!(out, "conservation {conservation}");
    }
    Ok((out, problem))
}

/// Lists the segments and scans those from the scan start, replaying the ops after the
/// checkpoint into `ledger`. Returns whether a problem was found.
fn segments_inspect(
    config: &InspectConfig,
    dir: &Path,
    superblock: &Superblock,
    mut ledger: Option<&mut Replayed>,
    out: &mut String,
    index: usize,
) -> Result<bool, InspectError> {
    let segments = segments(dir)?;
    let start = scan_start(superblock, &segments);
    let checkpoint_op = superblock.checkpoint.op;
    let (mut op_next, mut checksum_previous): (u64, JournalChecksum) =
        (start.op + 1, start.checksum);
    let mut checkpoint_seen = checkpoint_op == start.op;
    let last = segments.last().map(|(segment, _)| *segment);
    for (segment, path) in segments {
        if segment < start.segment {
            let _ = writeln!(
                out,
                "  segment {segment}: before the previous checkpoint (kept for a lagging peer or for reuse; not scanned)"
            );
            continue;
        }
        let base = if segment == start.segment {
            start.offset
        } else {
            0
        };
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let region = bytes.get(base as usize..).unwrap_or(&[]);
        let mut first_op = None;
        let mut checkpoint_mismatch = false;
        let outcome = journal::scan(
            region,
            base,
            op_next,
            checksum_previous,
            config.body_bytes_max,
            |entry, _| {
                first_op.get_or_insert(entry.meta.op);
                if entry.meta.op == checkpoint_op {
                    checkpoint_seen = true;
                    checkpoint_mismatch = entry.checksum != superblock.checkpoint.checksum;
                }
                if entry.meta.op > checkpoint_op
                    && let Some(ledger) = ledger.as_deref_mut()
                {
                    replay_into(ledger, entry);
                }
            },
        );
        let _ = writeln!(
            out,
            "  segment {segment}: {} entries, ops {}..={}, {} bytes used, last checksum {:032x}",
            outcome.entries,
            first_op.unwrap_or(op_next),
            outcome.op_last,
            outcome.end_offset,
            outcome.checksum_last
        );
        if checkpoint_mismatch {
            let _ = writeln!(
                out,
                "  PROBLEM shard {index} segment {segment}: entry of checkpoint op {checkpoint_op} does not have the checkpoint's checksum"
            );
            return Ok(true);
        }
        match outcome.tail {
            Tail::Clean => {}
            // Before the last segment: a reused segment's older entries after its new ones
            // (recovery reads the end as the boundary when the next segment carries on).
            Tail::Torn { offset } if Some(segment) != last => {
                let _ = writeln!(
                    out,
                    "  segment {segment}: ends at offset {offset} before older bytes (a reused segment)"
                );
            }
            Tail::Torn { offset } => {
                let _ = writeln!(
                    out,
                    "  segment {segment}: torn tail at offset {offset} (truncated at next start)"
                );
            }
            Tail::Corrupt {
                offset,
                op_expected,
                error,
            } => {
                let _ = writeln!(
                    out,
                    "  PROBLEM shard {index} segment {segment}: op {op_expected} at offset {offset} is corrupt: {error} \
                     (a replicated node cuts the journal here and repairs from its peers; without peers it refuses to start)"
                );
                return Ok(true);
            }
        }
        if outcome.entries > 0 {
            op_next = outcome.op_last + 1;
            checksum_previous = outcome.checksum_last;
        }
    }
    // The hash chain's head: the last entry's, or, in a journal that holds no entry after
    // where its scan starts (one a state sync started at a checkpoint), that checkpoint's.
    let _ = writeln!(
        out,
        "  head: op {}, checksum {checksum_previous:032x}",
        op_next - 1
    );
    if !checkpoint_seen {
        let _ = writeln!(
            out,
            "  PROBLEM shard {index}: the journal ends before the checkpoint op {checkpoint_op}"
        );
        return Ok(true);
    }
    if op_next <= superblock.op_durable {
        let _ = writeln!(
            out,
            "  PROBLEM shard {index}: the journal ends at op {} below the superblock's op_durable {} \
             (a replicated node recovers the rest from its peers; without peers it refuses to start)",
            op_next - 1,
            superblock.op_durable
        );
        return Ok(true);
    }
    Ok(false)
}

/// What `--replay` rebuilds: the node's state machine.
type Replayed = Sessioned<Ledger>;

fn replay_into(ledger: &mut Replayed, entry: &journal::DecodedEntry<'_>) {
    use percore_engine::record::{RecordResult, RecordSlot};
    let Ok(operation) = <Ledger as StateMachine>::Operation::try_from(entry.meta.operation) else {
        return;
    };
    let records: Vec<RecordSlot> = entry
        .records()
        .chunks_exact(128)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let mut results = vec![RecordResult { index: 0, code: 0 }; records.len()];
    let mut requests = vec![RequestDescriptor::default(); records.len()];
    let request_count = journal::request_descriptors(entry.requests(), &mut requests)
        .filter(|&count| descriptors_valid(&requests[..count], records.len()));
    let Some(request_count) = request_count else {
        return;
    };
    ledger.apply_requests(
        entry.meta.op,
        operation,
        &records,
        &requests[..request_count],
        &mut results,
    );
    while ledger.poll_outbound().is_some() {}
}
