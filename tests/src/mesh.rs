//! The set-up most end-to-end tests share, written once: practices started as real daemons,
//! paired, charts imported and shared, and the mesh waited on until it is in sync.
//!
//! ```no_run
//! use chartmesh_tests::mesh::{Access, Mesh};
//! let mesh = Mesh::new(&["Valley Clinic", "Ridge Cardiology"])
//!     .charts(0, 20)
//!     .paired()
//!     .share(0, 1, &["chart-000001", "chart-000002"], Access::Read)
//!     .synced();
//! let (a, b) = (&mesh[0], &mesh[1]);
//! # let _ = (a, b);
//! ```
//!
//! Each step asserts that it worked (a failed `share` or a `sync wait` past its deadline
//! fails the test with the CLI's own message), so a test reads as its scenario. It is the
//! real-process counterpart of the simulated mesh in `testkit` and uses only the CLI and the
//! local API, as a practice would.

use crate::{Practice, pair};
use std::ops::{Index, IndexMut};

/// Access granted by a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

impl Access {
    fn arg(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::ReadWrite => "read-write",
        }
    }
}

/// Practices running as real daemons, in the order they were named.
pub struct Mesh {
    practices: Vec<Practice>,
    /// Paired practices, waited on by [`Mesh::synced`].
    pairs: Vec<(usize, usize)>,
    /// Seconds a `sync wait` may take.
    timeout_s: u32,
}

impl Mesh {
    /// One practice per name, each initialised and started in its own temporary directory.
    pub fn new(names: &[&str]) -> Mesh {
        Mesh {
            practices: names.iter().map(|n| Practice::new(n)).collect(),
            pairs: Vec::new(),
            timeout_s: 60,
        }
    }

    /// How long each `sync wait` of [`Mesh::synced`] may take (60 s unless set).
    pub fn timeout(mut self, seconds: u32) -> Mesh {
        self.timeout_s = seconds;
        self
    }

    /// Imports the first `n` bench charts into practice `i`.
    pub fn charts(self, i: usize, n: usize) -> Mesh {
        self.practices[i].import_first(n);
        self
    }

    /// Pairs every practice with every other (both ways, with their sync addresses).
    pub fn paired(mut self) -> Mesh {
        for i in 0..self.practices.len() {
            for j in i + 1..self.practices.len() {
                self = self.pair(i, j);
            }
        }
        self
    }

    /// Pairs practices `i` and `j` only.
    pub fn pair(mut self, i: usize, j: usize) -> Mesh {
        pair(&self.practices[i], &self.practices[j]);
        self.pairs.push((i, j));
        self
    }

    /// Practice `from` shares `charts` with practice `to` for continuity of care (the
    /// CLI's default purpose).
    pub fn share(self, from: usize, to: usize, charts: &[&str], access: Access) -> Mesh {
        self.share_for(from, to, charts, access, "continuity")
    }

    /// Practice `from` shares `charts` with practice `to` for `purpose`.
    pub fn share_for(
        self,
        from: usize,
        to: usize,
        charts: &[&str],
        access: Access,
        purpose: &str,
    ) -> Mesh {
        let to_id = self.practices[to].id();
        let mut args = vec!["share"];
        args.extend_from_slice(charts);
        args.extend([
            "--with",
            &to_id,
            "--access",
            access.arg(),
            "--purpose",
            purpose,
        ]);
        self.practices[from].cli_ok(&args);
        self
    }

    /// Practice `from` shares all its charts with practice `to` (purpose: replica).
    pub fn share_all(self, from: usize, to: usize) -> Mesh {
        let to_id = self.practices[to].id();
        self.practices[from].cli_ok(&["share", "--all", "--with", &to_id, "--purpose", "replica"]);
        self
    }

    /// Waits until every paired pair is connected and in sync both ways.
    pub fn synced(self) -> Mesh {
        for &(i, j) in &self.pairs {
            self.practices[j].sync_wait(&self.practices[i], self.timeout_s);
            self.practices[i].sync_wait(&self.practices[j], self.timeout_s);
        }
        self
    }

    /// The practices, to take them apart (e.g. `let [a, b] = mesh.into_array()`).
    pub fn into_vec(self) -> Vec<Practice> {
        self.practices
    }

    /// The practices as an array of a known size.
    pub fn into_array<const N: usize>(self) -> [Practice; N] {
        let n = self.practices.len();
        self.practices
            .try_into()
            .unwrap_or_else(|_| panic!("the mesh has {n} practices, not {N}"))
    }
}

impl Index<usize> for Mesh {
    type Output = Practice;
    fn index(&self, i: usize) -> &Practice {
        &self.practices[i]
    }
}

impl IndexMut<usize> for Mesh {
    fn index_mut(&mut self, i: usize) -> &mut Practice {
        &mut self.practices[i]
    }
}
