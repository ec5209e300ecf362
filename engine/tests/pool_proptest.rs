//! Property test: random borrow / release / clear sequences against a model pool (a list
//! of live handles plus a list of dead ones) keep `in_use`, `high_water`, handle validity
//! and slot contents consistent.

use percore_engine::pool::{Handle, Pool, PoolError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Borrow,
    /// Release the live handle at this position (modulo the live count).
    Release(usize),
    /// Release a dead handle again (double release / use after clear).
    ReleaseDead(usize),
    /// Release a handle whose index lies outside the pool.
    ReleaseForeign(u32),
    /// Overwrite the value of a live handle.
    Write(usize, u64),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => Just(Op::Borrow),
        6 => any::<usize>().prop_map(Op::Release),
        2 => any::<usize>().prop_map(Op::ReleaseDead),
        1 => any::<u32>().prop_map(Op::ReleaseForeign),
        3 => (any::<usize>(), any::<u64>()).prop_map(|(at, value)| Op::Write(at, value)),
        1 => Just(Op::Clear),
    ]
}

#[derive(Default)]
struct Model {
    /// Live handles with the value last written through each.
    live: Vec<(Handle, u64)>,
    dead: Vec<Handle>,
    high_water: usize,
    borrows: u64,
    borrow_failures: u64,
    release_failures: u64,
    next_value: u64,
}

fn apply(pool: &mut Pool<u64>, model: &mut Model, op: Op) {
    let capacity = pool.capacity();
    match op {
        Op::Borrow => match pool.borrow() {
            Ok(handle) => {
                assert!(
                    model.live.len() < capacity,
                    "borrow succeeded on a full pool"
                );
                model.next_value += 1;
                *pool.get_mut(handle) = model.next_value;
                model.live.push((handle, model.next_value));
                model.borrows += 1;
                model.high_water = model.high_water.max(model.live.len());
            }
            Err(error) => {
                assert_eq!(
                    model.live.len(),
                    capacity,
                    "borrow failed on a non-full pool"
                );
                assert_eq!(
                    error,
                    PoolError::Exhausted {
                        pool: "model",
                        capacity
                    }
                );
                model.borrow_failures += 1;
            }
        },
        Op::Release(at) if !model.live.is_empty() => {
            let (handle, _) = model.live.swap_remove(at % model.live.len());
            assert_eq!(pool.release(handle), Ok(()));
            model.dead.push(handle);
        }
        Op::Release(_) => {}
        Op::ReleaseDead(at) if !model.dead.is_empty() => {
            let handle = model.dead[at % model.dead.len()];
            assert_eq!(
                pool.release(handle),
                Err(PoolError::StaleHandle {
                    pool: "model",
                    handle
                })
            );
            model.release_failures += 1;
        }
        Op::ReleaseDead(_) => {}
        Op::ReleaseForeign(offset) => {
            let index = (capacity as u32).saturating_add(offset);
            let handle: Handle = bytemuck::cast([index, 1u32]);
            assert!(matches!(
                pool.release(handle),
                Err(PoolError::ForeignHandle { .. })
            ));
            model.release_failures += 1;
        }
        Op::Write(at, value) if !model.live.is_empty() => {
            let at = at % model.live.len();
            *pool.get_mut(model.live[at].0) = value;
            model.live[at].1 = value;
        }
        Op::Write(..) => {}
        Op::Clear => {
            pool.clear();
            model
                .dead
                .extend(model.live.drain(..).map(|(handle, _)| handle));
        }
    }
}

fn check(pool: &Pool<u64>, model: &Model) {
    let stats = pool.stats();
    assert_eq!(stats.in_use, model.live.len());
    assert_eq!(pool.available(), pool.capacity() - model.live.len());
    assert_eq!(stats.high_water, model.high_water);
    assert_eq!(stats.borrows, model.borrows);
    assert_eq!(stats.borrow_failures, model.borrow_failures);
    assert_eq!(stats.release_failures, model.release_failures);
    // Live handles are valid, distinct slots, and each sees only its own writes.
    let mut indices: Vec<u32> = model
        .live
        .iter()
        .map(|(handle, _)| handle.index())
        .collect();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(
        indices.len(),
        model.live.len(),
        "two live handles share a slot"
    );
    for &(handle, value) in &model.live {
        assert!(pool.is_live(handle));
        assert_eq!(pool.try_get(handle), Ok(&value));
    }
    for &handle in &model.dead {
        assert!(!pool.is_live(handle));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn pool_matches_model(capacity in 1usize..48, ops in proptest::collection::vec(op(), 0..400)) {
        let mut pool = Pool::new("model", capacity, |_| 0u64).unwrap();
        let mut model = Model::default();
        for op in ops {
            apply(&mut pool, &mut model, op);
            check(&pool, &model);
        }
        // Whatever happened, the pool still lends exactly its free slots, then refuses.
        let free = capacity - model.live.len();
        for _ in 0..free {
            prop_assert!(pool.borrow().is_ok());
        }
        prop_assert!(
            matches!(pool.borrow(), Err(PoolError::Exhausted { .. })),
            "pool lent more than its capacity"
        );
    }
}
