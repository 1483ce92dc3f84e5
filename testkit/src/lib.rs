//! # chartmesh-testkit
//!
//! A simulated mesh of practices for testing the sync engine as a whole, deterministically:
//! each practice runs the real `chartmesh_core::sync::PeerSession` per peer over a real
//! store (`chartmesh_store::Store`, an SQLite file in a temporary directory, written through
//! the same calls the daemon makes), joined by a seeded network in virtual time that delays,
//! reorders, drops and duplicates control messages, breaks connections, partitions and heals,
//! and crashes and restarts practices keeping only what was durable.
//!
//! Owns: the simulated network, clock and driver ([`mesh`]), the scenarios and the
//! invariants checked after every step and at quiescence ([`scenario`]).
//! Must not touch: the product. Nothing here is linked into chartmeshd.
//!
//! The driver in [`mesh`] does for each session what `daemon::sync` does with quinn and
//! tokio: every output of the session becomes an event on the simulated network or a call
//! of the store, and every event goes back to the session. A failing scenario prints its
//! seed and its operations; `CHARTMESH_SIM_SEED=<seed>` replays it exactly.

pub mod mesh;
pub mod scenario;
