//! Which replica leads a group in a view.
//!
//! Every node holds one replica of every group (shard `k` of each node is a replica of
//! group `k`), so where the groups' leaders sit decides how the leaders' work (client
//! connections, ordering, sending every entry to every follower) is spread over the nodes.
//!
//! - **View 0:** group `k` is led by replica `k mod N`, so a fresh cluster spreads its
//!   groups' leaders evenly over the nodes.
//! - **Later views:** group `k` steps through the replicas by a stride of its own,
//!   `leader(k, v) = (k + v × stride(k)) mod N`, with a stride coprime to `N`. So any `N`
//!   consecutive views of one group have `N` different leaders (every replica leads in turn,
//!   and in BFT mode any `f + 1` consecutive views include a correct leader), and the groups
//!   one node led do not all move to the same node when it fails: the strides of the groups
//!   a replica leads in view 0 take every value coprime to `N` in turn. With `N = 3` and
//!   every group one view past 0 (its view-0 leader failed), the groups of the failed node
//!   go half to each survivor, where one shared stride of 1 sent them all to the next node,
//!   which then led twice its share (two thirds of all groups).
//!
//! Every replica and client computes the same function of `(group, view, N)`: nothing is
//! configured or exchanged, and it must never change under a running cluster.

/// The strides coprime to `replica_count`, ascending (`1` alone for one or two replicas).
fn strides(replica_count: u8) -> impl Iterator<Item = u8> + Clone {
    let n = replica_count.max(2);
    (1..n).filter(move |&stride| gcd(stride, n) == 1)
}

fn gcd(mut a: u8, mut b: u8) -> u8 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The stride by which `group` moves through its replicas from one view to the next.
///
/// The groups led by one replica in view 0 are `k = r + N × j`; their stride index is
/// `(j + r) mod m` over the `m` strides coprime to `N`, so consecutive such groups take
/// every stride in turn (and group 1 of a 3-replica cluster already uses stride 2).
///
/// # Panics
/// If `replica_count` is 0.
pub fn leader_stride(group: u32, replica_count: u8) -> u8 {
    assert!(replica_count > 0, "a group has a replica");
    let n = u32::from(replica_count);
    // A group has at most `REPLICA_COUNT_MAX` (7) replicas: a handful of gcds per call.
    let count = strides(replica_count).count() as u32;
    let index = (group / n + group % n) % count;
    strides(replica_count)
        .nth(index as usize)
        .expect("index below the count")
}

/// The replica that leads `group` in `view`, among `replica_count` replicas.
pub fn leader_of(group: u32, view: u64, replica_count: u8) -> u8 {
    let n = u64::from(replica_count);
    let stride = u64::from(leader_stride(group, replica_count));
    ((u64::from(group) % n + (view % n) * stride) % n) as u8
}

/// The replica that leads `group` in the view after one that `leader` leads: where a
/// client or a follower looks next when `leader` stops answering.
pub fn leader_next(group: u32, leader: u8, replica_count: u8) -> u8 {
    let n = u32::from(replica_count);
    ((u32::from(leader) % n + u32::from(leader_stride(group, replica_count))) % n) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUPS: u32 = 256;
    const REPLICA_COUNT_PLACEMENT_MAX: usize = 8;

    fn stride_list(n: u8) -> Vec<u8> {
        strides(n).collect()
    }

    #[test]
    fn every_group_size_has_a_coprime_stride_for_every_group() {
        for n in 1..=u8::MAX {
            for group in 0..64 {
                let stride = leader_stride(group, n);
                assert!(stride_list(n).contains(&stride));
            }
        }
    }

    #[test]
    fn view_zero_spreads_groups_round_robin() {
        for n in 1..=REPLICA_COUNT_PLACEMENT_MAX as u8 {
            for group in 0..GROUPS {
                assert_eq!(u32::from(leader_of(group, 0, n)), group % u32::from(n));
            }
        }
    }

    #[test]
    fn any_n_consecutive_views_have_n_different_leaders() {
        for n in 1..=REPLICA_COUNT_PLACEMENT_MAX as u8 {
            for group in 0..GROUPS {
                for first in [0, 1, 5, 1_000_003, u64::MAX - 2 * u64::from(n)] {
                    let mut seen = [false; REPLICA_COUNT_PLACEMENT_MAX];
                    for view in first..first + u64::from(n) {
                        let leader = usize::from(leader_of(group, view, n));
                        assert!(leader < usize::from(n));
                        assert!(!seen[leader], "n {n} group {group} view {view}");
                        seen[leader] = true;
                    }
                }
            }
        }
    }

    #[test]
    fn the_next_leader_is_the_next_views() {
        for n in 1..=REPLICA_COUNT_PLACEMENT_MAX as u8 {
            for group in 0..GROUPS {
                for view in 0..3 * u64::from(n) {
                    assert_eq!(
                        leader_next(group, leader_of(group, view, n), n),
                        leader_of(group, view + 1, n)
                    );
                }
            }
        }
    }

    #[test]
    fn stride_is_coprime_and_stable() {
        assert_eq!(stride_list(1), [1]);
        assert_eq!(stride_list(2), [1]);
        assert_eq!(stride_list(3), [1, 2]);
        assert_eq!(stride_list(4), [1, 3]);
        assert_eq!(stride_list(6), [1, 5]);
        assert_eq!(stride_list(7), [1, 2, 3, 4, 5, 6]);
        // The placement is part of the cluster's contract: pin a few values.
        assert_eq!(
            (0..8).map(|g| leader_of(g, 1, 3)).collect::<Vec<_>>(),
            [1, 0, 0, 2, 2, 1, 1, 0]
        );
        assert_eq!(
            (0..8).map(|g| leader_of(g, 1, 4)).collect::<Vec<_>>(),
            [1, 0, 3, 2, 3, 2, 1, 0]
        );
    }

    /// The issue the strides solve: when one node fails, every group it led moves on one
    /// view; its groups must not all land on one survivor.
    #[test]
    fn a_failed_nodes_groups_spread_over_the_survivors() {
        for n in 3..=REPLICA_COUNT_PLACEMENT_MAX as u8 {
            let m = stride_list(n).len() as u32;
            // A whole number of stride cycles per replica.
            let groups = u32::from(n) * m * 4;
            for failed in 0..n {
                let mut led = [0u32; REPLICA_COUNT_PLACEMENT_MAX];
                for group in 0..groups {
                    let mut view = 0;
                    while leader_of(group, view, n) == failed {
                        view += 1;
                    }
                    led[usize::from(leader_of(group, view, n))] += 1;
                }
                let most = *led.iter().max().expect("replicas");
                let survivors = led[..usize::from(n)].iter().filter(|&&c| c > 0).count();
                assert_eq!(led[usize::from(failed)], 0);
                // The failed node's groups (groups / n) go to `m` different survivors.
                let share = groups / u32::from(n);
                assert_eq!(most, share + share / m, "n {n} failed {failed}: {led:?}");
                assert_eq!(survivors, usize::from(n) - 1);
            }
        }
        // Three replicas: the classic case. With one stride for all, the next node would
        // lead 4 of 6 groups; with the strides, each survivor leads 3.
        let mut led = [0; 3];
        for group in 0..6 {
            let view = u64::from(leader_of(group, 0, 3) == 0);
            led[usize::from(leader_of(group, view, 3))] += 1;
        }
        assert_eq!(led, [0, 3, 3]);
    }
}
