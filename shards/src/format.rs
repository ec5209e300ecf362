//! `percore format`: a replica's data directory is created once, on purpose, and never again
//! by accident (`docs/protocol.md` 2 and 8).
//!
//! A replica that acknowledged ops and then lost its disk must not come back as a new, empty
//! replica: its acknowledgements counted towards quorums, so an empty log voting in a view
//! change (crash mode) could drop a committed op, and an empty vote guard (BFT mode) could
//! sign a second statement for a slot it already voted on. An empty directory and a wiped
//! one look the same, so the first start is made explicit: `percore format` writes the
//! format file `percore.format` at the top of the data directory, naming the cluster, the
//! fault model, the replica, the replica count and the shard count. A replicated node
//! (crash or BFT) starts only on a formatted directory of its own identity, creates its
//! shards' journals only at its first start, and from then on refuses a shard whose journal
//! is missing instead of creating an empty one. A node without peers keeps creating its
//! journals on demand (it has no quorum to mislead).
//!
//! A replica that did lose its disk comes back through `percore format --replace`
//! (crash-fault mode): its first start creates every journal marked replacing
//! (`Superblock::replacing`), and each shard rebuilds from its peers before it acknowledges
//! or votes (`docs/protocol.md` 8).
//!
//! The file is text, ends with a checksum line, and is replaced atomically (temporary file,
//! `fsync`, `rename`, directory `fsync`).
//!
//! One process per data directory: a node (any node with a journal, replica or not) and
//! `percore format` hold an exclusive lock on `percore.lock` at its top ([`lock`]) for as
//! long as they run. Two nodes on one directory would append to the same journals and
//! corrupt them; the second is refused before it reads anything there. The lock is
//! `flock`'s, so the kernel drops it when the holder exits, however it exits: a crash
//! leaves nothing to clean up. Writes a killed holder left in flight outlive its lock; the
//! next holder waits them out before it reads anything ([`crate::io_fence`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::bft::FaultModel;

/// The format file's name, directly under the data directory.
pub const FORMAT_FILE_NAME: &str = "percore.format";
/// The temporary name it is written under before the rename.
const FORMAT_FILE_TEMPORARY_NAME: &str = "percore.format.tmp";
/// The first line: what the file is and its version.
const FORMAT_HEADER: &str = "percore data directory format 1";
/// Largest format file read (bytes); a real one is about 200.
const FORMAT_FILE_BYTES_MAX: u64 = 4096;

/// What a data directory was formatted for; a node of another identity refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The cluster (`--cluster-id`).
    pub cluster_id: u128,
    /// Crash or Byzantine faults.
    pub fault_model: FaultModel,
    /// This replica's index in the peer list.
    pub replica: u8,
    /// Replicas per group.
    pub replica_count: u8,
    /// Shards (replication groups) of the node.
    pub shard_count: u32,
}

/// Whether this start may create the shards' journals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalCreate {
    /// The first start after `percore format`: missing journals are created.
    FirstStart,
    /// The first start after `percore format --replace`: missing journals are created
    /// marked replacing, and every shard rebuilds from its peers (`docs/protocol.md` 8).
    FirstStartReplacing,
    /// A restart: a missing journal is an error, never an empty one.
    Never,
}

/// The file [`lock`] holds locked at the top of a data directory; it holds the holder's
/// process id, for the message of the process it refuses.
pub const LOCK_FILE_NAME: &str = "percore.lock";

/// How long [`lock`] tries a held lock before it refuses (ms).
const LOCK_WAIT_MS: u64 = 200;
/// Between those tries (ms).
const LOCK_RETRY_MS: u64 = 10;

/// A data directory this process holds ([`lock`]); dropping it lets another one take it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes `data_dir` for this process (creating the directory if it is absent): an exclusive
/// `flock` on [`LOCK_FILE_NAME`], held until the returned value is dropped or the process
/// exits. A directory another process holds is refused with [`FormatError::InUse`].
///
/// Then waits until the writes an earlier holder left in flight have landed
/// ([`crate::io_fence::settle`], up to [`crate::io_fence::SETTLE_WAIT_MS`]): the lock is free
/// the moment a killed process's descriptors close, its io_uring writes are not.
pub fn lock(data_dir: &Path) -> Result<DataDirLock, FormatError> {
    lock_within(
        data_dir,
        std::time::Duration::from_millis(crate::io_fence::SETTLE_WAIT_MS),
    )
}

/// [`lock`], waiting at most `settle_wait` for in-flight writes.
fn lock_within(
    data_dir: &Path,
    settle_wait: std::time::Duration,
) -> Result<DataDirLock, FormatError> {
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let path = data_dir.join(LOCK_FILE_NAME);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    // A moment's wait: `percore inspect` takes the lock shared for an instant to see
    // whether a node holds it ([`in_use_by`]); a holder is one that keeps it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(LOCK_WAIT_MS);
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_MS));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(FormatError::InUse {
                    path: data_dir.to_path_buf(),
                    holder: holder_of(&path),
                });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(io(&path)(error)),
        }
    }
    // Ours now. Before anything is written here (on ext4 even the lock file's truncation
    // can wait for a journal commit behind them), the earlier holder's writes land.
    let settled = crate::io_fence::settle(data_dir, &path, settle_wait)?;
    if settled.files_waited > 0 {
        tracing::warn!(
            data_dir = %data_dir.display(),
            files = settled.files_waited,
            waited_ms = settled.waited.as_millis() as u64,
            "waited for writes an earlier process left in flight to land"
        );
    }
    // Say who holds it.
    file.set_len(0)
        .and_then(|()| file.write_all(format!("pid {}\n", std::process::id()).as_bytes()))
        .map_err(io(&path))?;
    Ok(DataDirLock { _file: file })
}

/// Which process holds `data_dir` ([`lock`]), if one does; `None` also when no lock file
/// exists (a directory no node ran on, or a copy of one). Creates and changes nothing.
pub fn in_use_by(data_dir: &Path) -> Option<String> {
    let path = data_dir.join(LOCK_FILE_NAME);
    let file = std::fs::File::open(&path).ok()?;
    match file.try_lock_shared() {
        Err(std::fs::TryLockError::WouldBlock) => Some(holder_of(&path)),
        _ => None,
    }
}

/// Whether writes a process left in flight when it was killed are still landing in
/// `data_dir` ([`crate::io_fence`]), with no node holding it: `Some((a file, how many))`.
/// `None` also when a node holds the directory (its own writes are in flight by design;
/// [`in_use_by`] says who) or no node ever ran on it (no lock file). For `percore inspect`,
/// which reads files such writes still change.
///
/// Probes each file's lock exclusively, as a starting node's settle does, while holding the
/// directory's lock, so that a node starting meanwhile waits for the probe (its
/// [`lock`] gives a holder a moment) instead of meeting it at its own files.
pub fn writes_landing(data_dir: &Path) -> Result<Option<(PathBuf, usize)>, FormatError> {
    let path = data_dir.join(LOCK_FILE_NAME);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io(&path)(error)),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(error)) => return Err(io(&path)(error)),
    }
    match crate::io_fence::settle(data_dir, &path, std::time::Duration::ZERO) {
        Ok(_) => Ok(None),
        Err(crate::io_fence::FenceError::InFlight { path, files, .. }) => Ok(Some((path, files))),
        Err(error) => Err(FormatError::Fence(error)),
    }
}

/// What the lock file at `path` says of its holder. The pid is written once the holder has
/// settled ([`lock_within`]), so while a new holder waits for its predecessor's writes the
/// file still names the predecessor: a pid that is gone is said to be gone.
fn holder_of(path: &Path) -> String {
    let Some(text) = std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
    else {
        return "a process that has not said which".to_string();
    };
    match text
        .strip_prefix("pid ")
        .and_then(|pid| pid.parse::<u32>().ok())
    {
        Some(pid) if !Path::new(&format!("/proc/{pid}")).exists() => format!(
            "pid {pid} has exited; the process that holds it now is waiting for the writes \
             pid {pid} left in flight to land, and names itself when they have"
        ),
        _ => text,
    }
}

/// Why a data directory cannot be formatted or started.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// Another process holds the directory ([`lock`]).
    #[error(
        "{path} is in use by another percore process ({holder}): one node per data directory \
         (two would write the same journals)"
    )]
    InUse {
        /// The data directory.
        path: PathBuf,
        /// What the lock file says of its holder (`pid N`).
        holder: String,
    },
    /// Writes of an earlier holder still in flight ([`lock`]).
    #[error(transparent)]
    Fence(#[from] crate::io_fence::FenceError),
    /// `percore format` on a directory that already holds a format file or journals.
    #[error(
        "{path} is not empty ({entry}): a replica is formatted once; to start it again, run \
         `percore node` with the same arguments"
    )]
    NotEmpty {
        /// The data directory.
        path: PathBuf,
        /// The first entry found.
        entry: String,
    },
    /// A replicated node on a directory without a format file.
    #[error(
        "{path} has no {FORMAT_FILE_NAME}: a replica's data directory is created once with \
         `percore format` (the same arguments as `percore node`). If this replica ran before \
         and lost its disk, do not format it as new: its acknowledgements counted towards \
         quorums (docs/operations.md, \"A replica lost its disk\")"
    )]
    NotFormatted {
        /// The data directory.
        path: PathBuf,
    },
    /// `--replace` in BFT mode: a replica that lost its vote guard may already have signed
    /// statements it no longer knows of, and nothing it could learn from peers tells them.
    #[error(
        "{path}: --replace is for crash-fault mode; a BFT replica that lost its disk cannot \
         be rebuilt (docs/operations.md, \"A replica lost its disk\")"
    )]
    ReplaceBft {
        /// The data directory.
        path: PathBuf,
    },
    /// The format file does not parse or its checksum does not match.
    #[error("{path}: not a valid format file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The node's arguments name another identity than the one formatted.
    #[error(
        "{path} was formatted with {field} {formatted}, this node has {given}: wrong \
         --data-dir, or wrong arguments for this replica"
    )]
    Mismatch {
        /// The format file.
        path: PathBuf,
        /// Which field differs.
        field: &'static str,
        /// The formatted value.
        formatted: String,
        /// This node's value.
        given: String,
    },
}

/// The format file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FormatFile {
    identity: Identity,
    /// Whether the first start created the journals, and how.
    started: Started,
}

/// The format file's `started` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Started {
    /// `false`: formatted as a new replica, not started yet.
    No,
    /// `replace`: formatted to replace a replica that lost its disk, not started yet.
    /// (A binary from before `--replace` refuses this value instead of starting as new.)
    Replacing,
    /// `true`: the first start created the journals.
    Yes,
}

impl Started {
    fn name(self) -> &'static str {
        match self {
            Started::No => "false",
            Started::Replacing => "replace",
            Started::Yes => "true",
        }
    }
}

/// How `percore format` prepares a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatKind {
    /// A replica that never ran.
    New,
    /// A replica that ran and lost its disk (`--replace`): it rebuilds from its peers and
    /// votes only once it holds a log at least as new as any it may have voted on.
    Replace,
}

/// Formats `data_dir` for `identity`: creates the directory if absent, refuses one that
/// holds anything, and writes the format file durably.
pub fn format(data_dir: &Path, identity: Identity, kind: FormatKind) -> Result<(), FormatError> {
    if kind == FormatKind::Replace && identity.fault_model == FaultModel::Bft {
        return Err(FormatError::ReplaceBft {
            path: data_dir.to_path_buf(),
        });
    }
    let _lock = lock(data_dir)?;
    for entry in std::fs::read_dir(data_dir).map_err(io(data_dir))? {
        let name = entry.map_err(io(data_dir))?.file_name();
        if name != LOCK_FILE_NAME {
            return Err(FormatError::NotEmpty {
                path: data_dir.to_path_buf(),
                entry: name.to_string_lossy().into_owned(),
            });
        }
    }
    if let Some(parent) = data_dir
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        sync_directory(parent)?;
    }
    write(
        data_dir,
        FormatFile {
            identity,
            started: match kind {
                FormatKind::New => Started::No,
                FormatKind::Replace => Started::Replacing,
            },
        },
    )
}

/// Checks, at a replicated node's start, that `data_dir` was formatted for `identity`, and
/// says whether this start may create journals. The first start is recorded before the
/// node serves anyone ([`mark_started`]).
pub fn check(data_dir: &Path, identity: Identity) -> Result<JournalCreate, FormatError> {
    let path = data_dir.join(FORMAT_FILE_NAME);
    let text = match read(&path) {
        Ok(text) => text,
        Err(FormatError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(FormatError::NotFormatted {
                path: data_dir.to_path_buf(),
            });
        }
        Err(error) => return Err(error),
    };
    let formatted = decode(&text).map_err(|reason| FormatError::Corrupt {
        path: path.clone(),
        reason,
    })?;
    let mismatch = |field, formatted: String, given: String| FormatError::Mismatch {
        path: path.clone(),
        field,
        formatted,
        given,
    };
    let (was, is) = (formatted.identity, identity);
    if was.cluster_id != is.cluster_id {
        return Err(mismatch(
            "cluster id",
            format!("{:x}", was.cluster_id),
            format!("{:x}", is.cluster_id),
        ));
    }
    if was.fault_model != is.fault_model {
        return Err(mismatch(
            "fault model",
            fault_model_name(was.fault_model).into(),
            fault_model_name(is.fault_model).into(),
        ));
    }
    if was.replica != is.replica {
        return Err(mismatch(
            "replica",
            was.replica.to_string(),
            is.replica.to_string(),
        ));
    }
    if was.replica_count != is.replica_count {
        return Err(mismatch(
            "replica count",
            was.replica_count.to_string(),
            is.replica_count.to_string(),
        ));
    }
    if was.shard_count != is.shard_count {
        return Err(mismatch(
            "shard count",
            was.shard_count.to_string(),
            is.shard_count.to_string(),
        ));
    }
    // `format` never writes `replace` for BFT, and the fault model matched above.
    Ok(match formatted.started {
        Started::No => JournalCreate::FirstStart,
        Started::Replacing => JournalCreate::FirstStartReplacing,
        Started::Yes => JournalCreate::Never,
    })
}

/// What `data_dir`'s format file says, in one line (`percore inspect`); `None` if it has
/// none (a node without peers, or a replica's directory that was never formatted).
pub fn describe(data_dir: &Path) -> Result<Option<String>, FormatError> {
    let path = data_dir.join(FORMAT_FILE_NAME);
    let text = match read(&path) {
        Ok(text) => text,
        Err(FormatError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    let file = decode(&text).map_err(|reason| FormatError::Corrupt { path, reason })?;
    let identity = file.identity;
    Ok(Some(format!(
        "cluster {:x}, {} faults, replica {} of {}, {} shard(s), {}",
        identity.cluster_id,
        fault_model_name(identity.fault_model),
        identity.replica,
        identity.replica_count,
        identity.shard_count,
        match file.started {
            Started::Yes => "started (a missing journal is refused)",
            Started::No => "not started yet",
            Started::Replacing =>
                "formatted to replace a replica that lost its disk, not started yet",
        }
    )))
}

/// Reads a format file, at most `FORMAT_FILE_BYTES_MAX + 1` bytes of it.
fn read(path: &Path) -> Result<String, FormatError> {
    let io = |error| FormatError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, FORMAT_FILE_BYTES_MAX + 1),
        &mut text,
    )
    .map_err(io)?;
    Ok(text)
}

/// Records that the first start created every shard's journal: from now on a missing
/// journal is refused.
pub fn mark_started(data_dir: &Path, identity: Identity) -> Result<(), FormatError> {
    write(
        data_dir,
        FormatFile {
            identity,
            started: Started::Yes,
        },
    )
}

fn write(data_dir: &Path, contents: FormatFile) -> Result<(), FormatError> {
    let temporary = data_dir.join(FORMAT_FILE_TEMPORARY_NAME);
    let path = data_dir.join(FORMAT_FILE_NAME);
    let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
    file.write_all(encode(contents).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&temporary))?;
    drop(file);
    std::fs::rename(&temporary, &path).map_err(io(&path))?;
    sync_directory(data_dir)
}

/// Maps an I/O error on `path` to [`FormatError::Io`].
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FormatError {
    let path = path.to_path_buf();
    move |error| FormatError::Io { path, error }
}

fn sync_directory(dir: &Path) -> Result<(), FormatError> {
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| FormatError::Io {
            path: dir.to_path_buf(),
            error,
        })
}

fn fault_model_name(model: FaultModel) -> &'static str {
    match model {
        FaultModel::Crash => "crash",
        FaultModel::Bft => "bft",
    }
}

fn body(contents: FormatFile) -> String {
    let identity = contents.identity;
    format!(
        "{FORMAT_HEADER}\ncluster_id {:x}\nfault_model {}\nreplica {}\nreplica_count {}\n\
         shard_count {}\nstarted {}\n",
        identity.cluster_id,
        fault_model_name(identity.fault_model),
        identity.replica,
        identity.replica_count,
        identity.shard_count,
        contents.started.name(),
    )
}

fn checksum_hex(body: &str) -> String {
    percore_engine::checksum::digest256(body.as_bytes())[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn encode(contents: FormatFile) -> String {
    let body = body(contents);
    let checksum = checksum_hex(&body);
    format!("{body}checksum {checksum}\n")
}

fn decode(text: &str) -> Result<FormatFile, String> {
    if text.len() as u64 > FORMAT_FILE_BYTES_MAX {
        return Err(format!("longer than {FORMAT_FILE_BYTES_MAX} bytes"));
    }
    let (body, checksum_line) = text
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .ok_or("no checksum line")?;
    let body = format!("{body}\n");
    let checksum = checksum_line
        .strip_prefix("checksum ")
        .ok_or("the last line is not `checksum <hex>`")?;
    if checksum != checksum_hex(&body) {
        return Err("checksum mismatch (the file was changed or torn)".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(FORMAT_HEADER) {
        return Err(format!("the first line is not `{FORMAT_HEADER}`"));
    }
    let mut field = |name: &str| -> Result<&str, String> {
        lines
            .next()
            .and_then(|line| line.strip_prefix(name))
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or_else(|| format!("expected the line `{name} <value>`"))
    };
    let bad = |name: &str, value: &str| format!("{name}: `{value}` is not valid");
    let cluster_id = field("cluster_id")?;
    let cluster_id =
        u128::from_str_radix(cluster_id, 16).map_err(|_| bad("cluster_id", cluster_id))?;
    let fault_model = match field("fault_model")? {
        "crash" => FaultModel::Crash,
        "bft" => FaultModel::Bft,
        other => return Err(bad("fault_model", other)),
    };
    let replica = field("replica")?;
    let replica = replica.parse().map_err(|_| bad("replica", replica))?;
    let replica_count = field("replica_count")?;
    let replica_count = replica_count
        .parse()
        .map_err(|_| bad("replica_count", replica_count))?;
    let shard_count = field("shard_count")?;
    let shard_count = shard_count
        .parse()
        .map_err(|_| bad("shard_count", shard_count))?;
    let started = match field("started")? {
        "false" => Started::No,
        "replace" => Started::Replacing,
        "true" => Started::Yes,
        other => return Err(bad("started", other)),
    };
    if lines.next().is_some() {
        return Err("unexpected lines after `started`".into());
    }
    Ok(FormatFile {
        identity: Identity {
            cluster_id,
            fault_model,
            replica,
            replica_count,
            shard_count,
        },
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: Identity = Identity {
        cluster_id: 0xC0FFEE,
        fault_model: FaultModel::Crash,
        replica: 1,
        replica_count: 3,
        shard_count: 2,
    };

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("percore-format-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn format_then_first_start_then_restarts_never_create() {
        let dir = TempDir::new("cycle");
        assert!(matches!(
            check(&dir.0, IDENTITY),
            Err(FormatError::NotFormatted { .. })
        ));
        format(&dir.0, IDENTITY, FormatKind::New).unwrap();
        assert_eq!(check(&dir.0, IDENTITY).unwrap(), JournalCreate::FirstStart);
        // Not started yet: a crash before the shards were ready creates again.
        assert_eq!(check(&dir.0, IDENTITY).unwrap(), JournalCreate::FirstStart);
        mark_started(&dir.0, IDENTITY).unwrap();
        assert_eq!(check(&dir.0, IDENTITY).unwrap(), JournalCreate::Never);
        assert!(!dir.0.join(FORMAT_FILE_TEMPORARY_NAME).exists());
        // A formatted directory is never formatted again.
        assert!(matches!(
            format(&dir.0, IDENTITY, FormatKind::New),
            Err(FormatError::NotEmpty { .. })
        ));
    }

    #[test]
    fn one_holder_per_data_directory() {
        let dir = TempDir::new("lock");
        assert_eq!(in_use_by(&dir.0), None, "no lock file: nobody");
        let held = lock(&dir.0).expect("a free directory is taken (and created)");
        let holder = format!("pid {}", std::process::id());
        assert_eq!(in_use_by(&dir.0).as_deref(), Some(holder.as_str()));
        // A second holder (another open of the file: flock locks conflict across open file
        // descriptions, in one process too) is refused, named.
        match lock(&dir.0) {
            Err(error @ FormatError::InUse { .. }) => {
                assert!(error.to_string().contains(&holder), "{error}");
            }
            other => panic!("taken twice: {other:?}"),
        }
        // So is `percore format`; the lock file alone does not make a directory non-empty.
        assert!(matches!(
            format(&dir.0, IDENTITY, FormatKind::New),
            Err(FormatError::InUse { .. })
        ));
        drop(held);
        assert_eq!(in_use_by(&dir.0), None, "released");
        format(&dir.0, IDENTITY, FormatKind::New).expect("only the lock file in it");
        let _held = lock(&dir.0).expect("taken again");
    }

    /// A segment file in `dir`, and a description of it held as a killed node's io_uring
    /// write in flight holds its own.
    fn segment_in_flight(dir: &Path) -> (PathBuf, std::fs::File) {
        let segment = dir.join("shard-0").join("segment");
        std::fs::create_dir_all(segment.parent().unwrap()).unwrap();
        std::fs::write(&segment, b"x").unwrap();
        let in_flight = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        crate::io_fence::hold(&in_flight).unwrap();
        (segment, in_flight)
    }

    #[test]
    fn a_file_still_written_by_an_earlier_description_holds_the_lock_back() {
        let dir = TempDir::new("fence");
        let (segment, in_flight) = segment_in_flight(&dir.0);
        match lock_within(&dir.0, std::time::Duration::from_millis(30)) {
            Err(FormatError::Fence(crate::io_fence::FenceError::InFlight { path, .. })) => {
                assert_eq!(path, segment);
            }
            other => panic!("taken with a write in flight: {other:?}"),
        }
        // The refused start neither holds the directory nor wrote its pid.
        assert_eq!(in_use_by(&dir.0), None);
        drop(in_flight);
        let _held = lock_within(&dir.0, std::time::Duration::ZERO).expect("landed");
        let holder = format!("pid {}", std::process::id());
        assert_eq!(in_use_by(&dir.0).as_deref(), Some(holder.as_str()));
    }

    #[test]
    fn writes_still_landing_are_seen_only_while_nobody_holds_the_directory() {
        let dir = TempDir::new("landing");
        let (segment, in_flight) = segment_in_flight(&dir.0);
        // No node ever ran here: nothing to say.
        assert_eq!(writes_landing(&dir.0).unwrap(), None);
        std::fs::write(dir.0.join(LOCK_FILE_NAME), b"pid 1\n").unwrap();
        // A node ran and is gone; its write (the held description) is still in flight.
        assert_eq!(writes_landing(&dir.0).unwrap(), Some((segment.clone(), 1)));
        // The probe left the directory and the file as they were.
        assert_eq!(in_use_by(&dir.0), None);
        assert_eq!(writes_landing(&dir.0).unwrap(), Some((segment.clone(), 1)));
        drop(in_flight);
        assert_eq!(writes_landing(&dir.0).unwrap(), None, "landed");
        // A running node's own writes are not an earlier process's.
        let _held = lock(&dir.0).unwrap();
        let own = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        crate::io_fence::hold(&own).unwrap();
        assert_eq!(writes_landing(&dir.0).unwrap(), None);
    }

    #[test]
    fn a_holder_that_has_not_named_itself_yet_is_not_the_exited_one() {
        let dir = TempDir::new("stale");
        let _held = lock(&dir.0).unwrap();
        // As while `lock_within` settles: the file still names the earlier, exited holder.
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let pid = exited.id();
        exited.wait().unwrap();
        std::fs::write(dir.0.join(LOCK_FILE_NAME), format!("pid {pid}\n")).unwrap();
        let holder = in_use_by(&dir.0).expect("held");
        assert!(
            holder.starts_with(&format!("pid {pid} has exited")),
            "{holder}"
        );
        match lock(&dir.0) {
            Err(error @ FormatError::InUse { .. }) => {
                assert!(
                    error.to_string().contains("waiting for the writes"),
                    "{error}"
                );
            }
            other => panic!("taken twice: {other:?}"),
        }
    }

    #[test]
    fn a_replacement_creates_its_journals_replacing_once() {
        let dir = TempDir::new("replace");
        format(&dir.0, IDENTITY, FormatKind::Replace).unwrap();
        assert_eq!(
            check(&dir.0, IDENTITY).unwrap(),
            JournalCreate::FirstStartReplacing
        );
        let text = std::fs::read_to_string(dir.0.join(FORMAT_FILE_NAME)).unwrap();
        assert!(text.contains("\nstarted replace\n"), "{text}");
        assert!(describe(&dir.0).unwrap().unwrap().contains("to replace"));
        mark_started(&dir.0, IDENTITY).unwrap();
        assert_eq!(check(&dir.0, IDENTITY).unwrap(), JournalCreate::Never);
        assert!(matches!(
            format(&dir.0, IDENTITY, FormatKind::Replace),
            Err(FormatError::NotEmpty { .. })
        ));
        let bft = Identity {
            fault_model: FaultModel::Bft,
            ..IDENTITY
        };
        let other = TempDir::new("replace-bft");
        assert!(matches!(
            format(&other.0, bft, FormatKind::Replace),
            Err(FormatError::ReplaceBft { .. })
        ));
    }

    #[test]
    fn describe_names_the_identity_and_the_first_start() {
        let dir = TempDir::new("describe");
        std::fs::create_dir_all(&dir.0).unwrap();
        assert_eq!(describe(&dir.0).unwrap(), None);
        format(&dir.0, IDENTITY, FormatKind::New).unwrap();
        let text = describe(&dir.0).unwrap().unwrap();
        assert!(
            text.contains("replica 1 of 3") && text.contains("not started"),
            "{text}"
        );
        mark_started(&dir.0, IDENTITY).unwrap();
        assert!(
            describe(&dir.0)
                .unwrap()
                .unwrap()
                .contains("started (a missing")
        );
        std::fs::write(dir.0.join(FORMAT_FILE_NAME), "garbage").unwrap();
        assert!(matches!(describe(&dir.0), Err(FormatError::Corrupt { .. })));
    }

    #[test]
    fn a_directory_holding_anything_is_not_formatted() {
        let dir = TempDir::new("nonempty");
        std::fs::create_dir_all(dir.0.join("shard-0")).unwrap();
        let error = format(&dir.0, IDENTITY, FormatKind::New).unwrap_err();
        assert!(error.to_string().contains("shard-0"), "{error}");
        assert!(!dir.0.join(FORMAT_FILE_NAME).exists());
    }

    #[test]
    fn every_identity_field_is_checked() {
        let dir = TempDir::new("identity");
        format(&dir.0, IDENTITY, FormatKind::New).unwrap();
        let others = [
            (
                "cluster id",
                Identity {
                    cluster_id: 1,
                    ..IDENTITY
                },
            ),
            (
                "fault model",
                Identity {
                    fault_model: FaultModel::Bft,
                    ..IDENTITY
                },
            ),
            (
                "replica",
                Identity {
                    replica: 2,
                    ..IDENTITY
                },
            ),
            (
                "replica count",
                Identity {
                    replica_count: 5,
                    ..IDENTITY
                },
            ),
            (
                "shard count",
                Identity {
                    shard_count: 4,
                    ..IDENTITY
                },
            ),
        ];
        for (name, other) in others {
            match check(&dir.0, other) {
                Err(FormatError::Mismatch { field, .. }) => assert_eq!(field, name),
                outcome => panic!("{name}: {outcome:?}"),
            }
        }
    }

    #[test]
    fn a_changed_or_torn_file_is_refused() {
        let dir = TempDir::new("corrupt");
        format(&dir.0, IDENTITY, FormatKind::New).unwrap();
        let path = dir.0.join(FORMAT_FILE_NAME);
        let text = std::fs::read_to_string(&path).unwrap();
        for bad in [
            text.replace("replica 1", "replica 2"),
            text.replace("started false", "started true"),
            text[..text.len() / 2].to_string(),
            String::new(),
            "x".repeat(FORMAT_FILE_BYTES_MAX as usize + 10),
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(
                matches!(check(&dir.0, IDENTITY), Err(FormatError::Corrupt { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_identity_round_trips() {
        for fault_model in [FaultModel::Crash, FaultModel::Bft] {
            for started in [Started::No, Started::Replacing, Started::Yes] {
                let contents = FormatFile {
                    identity: Identity {
                        cluster_id: u128::MAX,
                        fault_model,
                        replica: 6,
                        replica_count: 7,
                        shard_count: u32::MAX,
                    },
                    started,
                };
                assert_eq!(decode(&encode(contents)).unwrap(), contents);
            }
        }
    }
}
