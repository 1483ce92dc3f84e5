//! Scenarios: what people and the network do to a mesh, step by step, and the run that
//! checks the invariants. The invariants checked after every step (inside [`crate::mesh`]):
//!
//! - nothing is sent without consent, decided as the message leaves: a chart of the sender's
//!   only under an active grant to the receiver, a copy only back to its custodian while
//!   held read-write; a canary (a chart never shared) never leaves. Because the decision is
//!   taken as the message leaves, a revocation or expiry takes effect from the next message
//!   after it is recorded;
//! - a checkpoint never moves past what is durable: when a practice records that it holds a
//!   peer's changes up to a sequence number, every chart of the peer's shared with it and
//!   changed by then is stored here with all its changes.
//!
//! And at quiescence (everything restarted and healed, the clock run on):
//!
//! - every chart with an active grant has the same heads at its custodian and its holder;
//! - a copy whose grant was revoked or has expired is marked so (or, after emergency access,
//!   removed);
//! - no acknowledged write is missing, whatever crashed when.

use crate::mesh::{Faults, Mesh, Stats};
use chartmesh_core::ids::copy_key;

/// One thing that happens. Practices and charts are indices, taken modulo what exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new chart; a canary is never shared.
    Create {
        at: usize,
        canary: bool,
    },
    /// A note added to one of the practice's own charts.
    Edit {
        at: usize,
        chart: usize,
    },
    /// A note added to a copy the practice holds (only if it may: read-write, active).
    EditCopy {
        at: usize,
        chart: usize,
    },
    /// A grant of one chart (or all, `chart` None) to a peer.
    Share {
        chart: Option<usize>,
        to: usize,
        rw: bool,
        expires_in_ms: Option<u64>,
    },
    Revoke {
        chart: Option<usize>,
        to: usize,
    },
    /// Break-glass: `at` asks the custodian of `chart` for it by MRN.
    Emergency {
        at: usize,
        chart: usize,
    },
    Crash {
        at: usize,
    },
    Restart {
        at: usize,
    },
    Partition {
        a: usize,
        b: usize,
    },
    Heal {
        a: usize,
        b: usize,
    },
    /// The live connection between two practices breaks.
    Flap {
        a: usize,
        b: usize,
    },
    Wait {
        ms: u64,
    },
}

/// Practices in a scenario.
pub const PRACTICES: usize = 5;

/// Runs `ops` on a mesh of `n` practices with network seed `seed`; Ok with what was counted,
/// or Err with the violations, the seed, the operations and the last events.
pub fn run(seed: u64, n: usize, ops: &[Op]) -> Result<Stats, String> {
    let timing = std::env::var_os("CHARTMESH_SIM_TIMING").is_some();
    let t0 = std::time::Instant::now();
    let mut m = Mesh::new(seed, n, Faults::default());
    let t_new = t0.elapsed();
    // Everyone has a few charts; everyone connects.
    for i in 0..n {
        m.create_chart(i, false);
    }
    m.settle(2_000);
    let t_start = t0.elapsed();
    for op in ops {
        apply(&mut m, n, op);
        let gap = 50 + (seed ^ m.now).wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1_500;
        m.settle(gap);
        if !m.stats.violations.is_empty() {
            break;
        }
    }
    let t_ops = t0.elapsed();
    if m.stats.violations.is_empty() {
        // Quiescence: everything back up and connected, long enough for the longest back-off.
        m.recover_all();
        m.settle(90_000);
        m.check_quiescent();
    }
    if timing {
        eprintln!(
            "seed {seed}: new {t_new:?} start {t_start:?} ops {t_ops:?} end {:?} ({} ops)",
            t0.elapsed(),
            ops.len()
        );
    }
    if m.stats.violations.is_empty() {
        Ok(m.stats.clone())
    } else {
        Err(format!(
            "seed {seed}: {} violation(s): {:?}\nops: {ops:?}\nreplay: CHARTMESH_SIM_SEED={seed} cargo test -p chartmesh-testkit --test mesh replay -- --nocapture\nlast events:\n{}",
            m.stats.violations.len(),
            m.stats.violations,
            m.trace()
        ))
    }
}

fn apply(m: &mut Mesh, n: usize, op: &Op) {
    let chart = |m: &Mesh, i: usize| -> Option<(usize, String)> {
        if m.charts.is_empty() {
            None
        } else {
            Some(m.charts[i % m.charts.len()].clone())
        }
    };
    match *op {
        Op::Create { at, canary } => {
            m.create_chart(at % n, canary);
        }
        Op::Edit { at: _, chart: c } => {
            if let Some((owner, id)) = chart(m, c)
                && m.is_up(owner)
            {
                m.edit(owner, &id);
            }
        }
        Op::EditCopy { at, chart: c } => {
            let at = at % n;
            if let Some((owner, id)) = chart(m, c)
                && owner != at
                && m.is_up(at)
            {
                let key = copy_key(&id, &m.nodes[owner].key);
                m.edit(at, &key);
            }
        }
        Op::Share {
            chart: c,
            to,
            rw,
            expires_in_ms,
        } => {
            let Some((owner, id)) = chart(m, c.unwrap_or(0)) else {
                return;
            };
            let to = to % n;
            if to != owner {
                let which = c.map(|_| id);
                m.share(owner, which.as_deref(), to, rw, expires_in_ms);
            }
        }
        Op::Revoke { chart: c, to } => {
            let Some((owner, id)) = chart(m, c.unwrap_or(0)) else {
                return;
            };
            let to = to % n;
            if to != owner {
                let which = c.map(|_| id);
                m.revoke(owner, which.as_deref(), to);
            }
        }
        Op::Emergency { at, chart: c } => {
            let at = at % n;
            if let Some((owner, id)) = chart(m, c)
                && owner != at
            {
                let index: usize = id[1..].parse().unwrap();
                let canary = m.canaries.contains(&(owner, id.clone()));
                if !canary {
                    m.emergency(at, owner, &format!("M{index}"));
                }
            }
        }
        Op::Crash { at } => m.crash(at % n),
        Op::Restart { at } => m.restart(at % n),
        Op::Partition { a, b } => {
            let (a, b) = (a % n, b % n);
            if a != b {
                m.partition(a, b);
            }
        }
        Op::Heal { a, b } => m.heal(a % n, b % n),
        Op::Flap { a, b } => {
            let (a, b) = (a % n, b % n);
            if a != b {
                m.break_link(a, b, "link flapped");
            }
        }
        Op::Wait { ms } => m.settle(ms),
    }
}

/// A proptest strategy for scenarios.
pub fn ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let p = 0..PRACTICES;
    let c = 0..64usize;
    let op = prop_oneof![
        3 => (p.clone(), proptest::bool::weighted(0.2)).prop_map(|(at, canary)| Op::Create { at, canary }),
        6 => (p.clone(), c.clone()).prop_map(|(at, chart)| Op::Edit { at, chart }),
        4 => (p.clone(), c.clone()).prop_map(|(at, chart)| Op::EditCopy { at, chart }),
        6 => (proptest::option::weighted(0.85, c.clone()), p.clone(), any::<bool>(),
              proptest::option::weighted(0.3, 500u64..20_000))
            .prop_map(|(chart, to, rw, expires_in_ms)| Op::Share { chart, to, rw, expires_in_ms }),
        2 => (proptest::option::weighted(0.85, c.clone()), p.clone())
            .prop_map(|(chart, to)| Op::Revoke { chart, to }),
        1 => (p.clone(), c.clone()).prop_map(|(at, chart)| Op::Emergency { at, chart }),
        1 => p.clone().prop_map(|at| Op::Crash { at }),
        1 => p.clone().prop_map(|at| Op::Restart { at }),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Partition { a, b }),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Heal { a, b }),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Flap { a, b }),
        1 => (100u64..5_000).prop_map(|ms| Op::Wait { ms }),
    ];
    proptest::collection::vec(op, 5..30)
}

/// The scenario a seed stands for (for replaying a failure by its seed alone).
pub fn ops_of_seed(seed: u64) -> Vec<Op> {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    ops().new_tree(&mut runner).unwrap().current()
}
