//! # chartmesh-daemon
//!
//! `chartmeshd`, the practice's background daemon: the data directory layout (`datadir`),
//! the configuration (`config`) and the practice identity (`identity`) re-exported from
//! `chartmesh-datadir` (which the CLI shares), the node that wires the store to the operations users perform (`node`), and
//! the local JSON API and console page (`api`), and the workflows across practices
//! (`workflow`: referrals, the conflict inbox, corrections).
//!
//! Owns: process wiring, configuration, the local API on 127.0.0.1 and its token.
//! Must not touch: SQL (that is `chartmesh-store`) or chart rules (that is `chartmesh-core`).

pub mod api;
pub mod backups;
pub mod emergency;
pub mod guard;
pub mod lan;
pub mod metrics;
pub mod node;
pub mod patient_copy;
pub mod pending;
pub mod portmap;
pub mod sync;
pub mod workflow;

pub use chartmesh_datadir::{config, datadir, identity, now_ms, rfc3339};
