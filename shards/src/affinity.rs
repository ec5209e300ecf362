//! Where a node's threads run: shards on their own cores, everything else off them.
//!
//! A shard's executor is pinned to its core (`glommio::Placement::Fixed`). A thread the
//! shard spawns inherits that single-core mask (Linux copies the creating thread's
//! affinity), so without more a shard's checkpoint follower, which re-applies every op and
//! captures a snapshot of the whole state, would always run on the shard's own core and
//! take its time from the shard, however many cores sit idle. The node therefore confines
//! its *helper* threads (the checkpoint followers) to [`helper_cores`]: the cores this
//! process may run on that none of its shards uses. On a machine where the shards use
//! every allowed core (a small box, shared cores) that set is empty and the helpers may run
//! on any allowed core, at a lower priority than the shards (`checkpoint::FOLLOWER_NICE`).
//!
//! Operators choose the set with the process's affinity (`taskset`, systemd
//! `CPUAffinity=`, cpusets): give the node its shard cores plus the cores its helpers may
//! use. The local cluster benchmark does the same for each replica (`cluster`), and keeps
//! its client threads on the cores no replica's shards use.

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// The cores this process may run on (its main thread's affinity, as in
/// `/proc/self/status`); empty if unknown.
pub fn allowed() -> Vec<usize> {
    crate::config::cpus_allowed()
        .map(|(_, cpus)| cpus)
        .unwrap_or_default()
}

/// The cores of `allowed` that are not in `used`.
pub fn spare(allowed: &[usize], used: &[usize]) -> Vec<usize> {
    allowed
        .iter()
        .copied()
        .filter(|core| !used.contains(core))
        .collect()
}

/// Cores for the helper threads of a node whose shards run on `shard_cores`, out of
/// `allowed`: the spare ones, or all of `allowed` when the shards use every one.
pub fn helper_cores_of(allowed: &[usize], shard_cores: &[usize]) -> Vec<usize> {
    let spare = spare(allowed, shard_cores);
    if spare.is_empty() {
        allowed.to_vec()
    } else {
        spare
    }
}

/// [`helper_cores_of`] this process's [`allowed`] cores.
pub fn helper_cores(shard_cores: &[usize]) -> Vec<usize> {
    helper_cores_of(&allowed(), shard_cores)
}

/// The calling thread's affinity.
pub fn current() -> std::io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// Confines the calling thread to `cores` (threads it spawns afterwards, and processes it
/// starts, inherit them). Empty `cores` changes nothing.
pub fn confine_current(cores: &[usize]) -> std::io::Result<()> {
    if cores.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &core in cores {
        if core >= CpuSet::MAX_CPU {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "core {core} is beyond the largest CPU set ({})",
                    CpuSet::MAX_CPU
                ),
            ));
        }
        set.set(core);
    }
    sched_setaffinity(None, &set)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_take_the_cores_the_shards_leave_or_all_of_them() {
        assert_eq!(helper_cores_of(&[0, 1, 2, 3], &[0, 1]), vec![2, 3]);
        assert_eq!(helper_cores_of(&[0, 1, 2, 3], &[3, 1]), vec![0, 2]);
        // Every allowed core has a shard (or shards share them): helpers may use any.
        assert_eq!(helper_cores_of(&[0, 1], &[0, 1]), vec![0, 1]);
        assert_eq!(helper_cores_of(&[0, 1], &[0, 0, 1]), vec![0, 1]);
        assert_eq!(spare(&[4, 5, 6], &[5]), vec![4, 6]);
    }

    #[test]
    fn a_confined_thread_runs_only_on_its_cores() {
        let allowed = current().expect("affinity");
        assert!(!allowed.is_empty());
        let last = *allowed.last().expect("a core");
        let seen = std::thread::spawn(move || {
            confine_current(&[last]).expect("confine");
            (current().expect("affinity"), rustix::thread::sched_getcpu())
        })
        .join()
        .expect("thread");
        assert_eq!(seen, (vec![last], last));
        assert!(confine_current(&[CpuSet::MAX_CPU]).is_err());
    }
}
