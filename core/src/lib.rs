//! # chartmesh-core
//!
//! The part of chartmesh that does no I/O: the chart model and its validation, the canonical
//! JSON form and checksums, the mapping of a chart onto one automerge document, and the
//! identifiers of charts and practices.
//!
//! Owns: what a chart *is* and how it becomes a CRDT document and back.
//! Must not touch: files, sockets, clocks or randomness. Time and identity are passed in by
//! the caller, so everything here is deterministic and fast to test.

pub mod alerts;
pub mod audit;
pub mod canonical;
pub mod chart;
pub mod conflicts;
pub mod consent;
pub mod doc;
pub mod doc_limits;
pub mod due;
pub mod emergency;
pub mod error;
pub mod fhir;
pub mod ids;
pub mod loinc;
pub mod patient_copy;
pub mod referral;
pub mod sync;

pub use chart::Chart;
pub use doc::{ChangeMeta, ChartDoc, ChartHeader, HistoryEntry, Merged};
pub use doc_limits::{LoadError, LoadLimits};
pub use error::{CoreError, ValidationError};
pub use ids::{ChartId, PeerRefError, PracticeId};

/// The largest chart we accept as one JSON record (bytes). Bench charts are 3–6 KB; a long
/// history of notes fits easily. Anything larger is almost certainly not a chart.
pub const MAX_CHART_JSON_BYTES: usize = 1024 * 1024;
