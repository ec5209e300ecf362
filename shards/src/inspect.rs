//! `percore inspect`: read a node's data directory offline and say what is there.
//!
//! For every shard directory it prints the superblock, each segment's entries (ops, bytes,
//! the last checksum) and the first problem found: a torn tail (which the node would
//! truncate at start) or corruption (which the node refuses to start on). With `--replay` it
//! also replays each shard's journal into a reference ledger and prints every account's
//! balance and the conservation sum. It uses plain blocking reads: it is a tool, not a shard.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use percore_engine::journal::{self, JournalChecksum, Tail};
use percore_engine::ledger::{Ledger, LedgerConfig};
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

/// Inspects `config.data_dir`; returns the report text and whether a problem was found.
pub fn run(config: &InspectConfig) -> Result<(String, bool), InspectError> {
    let mut out = String::new();
    let mut problem = false;
    let shards = shard_dirs(&config.data_dir)?;
    let shard_count = shards.len() as u32;
    let mut conservation = 0i128;
    let mut in_flight = 0u128;
    for (index, dir) in shards.iter().enumerate() {
        let _ = writeln!(out, "shard {index}: {}", dir.display());
        let mut ledger = config.replay.map(|ledger| {
            Ledger::new(LedgerConfig {
                shard_index: index as u32,
                shard_count,
                ..ledger
            })
        });
        let (mut op_next, mut checksum_previous): (u64, JournalChecksum) = (1, 0);
        for (segment, path) in segments(dir)? {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let mut first_op = None;
            let outcome = journal::scan(
                &bytes,
                0,
                op_next,
                checksum_previous,
                config.body_bytes_max,
                |entry, _| {
                    first_op.get_or_insert(entry.meta.op);
                    if let Some(ledger) = ledger.as_mut() {
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
            match outcome.tail {
                Tail::Clean => {}
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
                    problem = true;
                    let _ = writeln!(
                        out,
                        "  PROBLEM shard {index} segment {segment}: op {op_expected} at offset {offset} is corrupt: {error}"
                    );
                    break;
                }
            }
            if outcome.entries > 0 {
                op_next = outcome.op_last + 1;
                checksum_previous = outcome.checksum_last;
            }
        }
        if let Some(ledger) = ledger {
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

fn replay_into(ledger: &mut Ledger, entry: &journal::DecodedEntry<'_>) {
    use percore_engine::record::{RecordResult, RecordSlot};
    let Ok(operation) = <Ledger as StateMachine>::Operation::try_from(entry.meta.operation) else {
        return;
    };
    let records: Vec<RecordSlot> = entry
        .body
        .chunks_exact(128)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let mut results = vec![RecordResult { index: 0, code: 0 }; records.len()];
    ledger.apply(entry.meta.op, operation, &records, &mut results);
    while ledger.poll_outbound().is_some() {}
}
