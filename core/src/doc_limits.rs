//! Limits on documents received from peers, checked before automerge loads them.
//!
//! Automerge's storage format is columnar and run-length encoded: a few hundred bytes can
//! describe millions of operations (a 571-byte document carrying 2M list insertions took
//! 1.3 GB and 3.8 s to load). [`scan`] walks the chunks of a saved document or of
//! concatenated change chunks and learns how many operations and changes they hold, and how
//! many bytes they decode to, by reading only chunk headers, column metadata and the
//! run-length headers of each column: it never materialises an operation and allocates
//! nothing proportional to what the runs describe (a DEFLATE-compressed column is inflated
//! into a buffer capped by the decoded-size limit). Cost: linear in the input's bytes.
//!
//! Counting follows the binary format (automerge.org, "Binary Document Format"): every
//! column of an operation or change table holds one value per row, so the longest column is
//! the row count. Group columns and the columns nested under them (predecessors,
//! successors, dependencies) are counted too, so the figure is an upper bound: it never
//! under-counts what automerge would build.
//!
//! Owns: the limit check. Must not touch: loading itself ([`crate::ChartDoc`] does that
//! once the check passed).

use std::io::Read;
use thiserror::Error;

/// How much a document received from a peer may hold. The defaults are far above a real
/// chart (a bench chart has ~60 operations in one change; years of daily edits stay in
/// the tens of thousands) and keep a load well under 100 MB of memory (automerge holds
/// roughly 0.5–0.7 KB per operation while loading).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadLimits {
    /// Operations in all chunks together.
    pub max_ops: u64,
    /// Changes in all chunks together.
    pub max_changes: u64,
    /// Bytes once every compressed chunk or column is inflated.
    pub max_decoded_bytes: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_ops: 100_000,
            max_changes: 20_000,
            max_decoded_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What a document holds, as counted by [`scan`] (upper bounds, see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DocCounts {
    pub ops: u64,
    pub changes: u64,
    pub decoded_bytes: u64,
    pub chunks: u64,
}

/// A document refused by [`scan`] or [`crate::ChartDoc::load_limited`].
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    #[error(
        "the document holds at least {found} operations, over the limit of {limit}: refused without loading it"
    )]
    TooManyOps { found: u64, limit: u64 },
    #[error(
        "the document holds at least {found} changes, over the limit of {limit}: refused without loading it"
    )]
    TooManyChanges { found: u64, limit: u64 },
    #[error("the document decodes to more than {limit} bytes: refused without loading it")]
    TooLarge { limit: u64 },
    #[error("the document is malformed: {0}")]
    Malformed(String),
    #[error("the document could not be loaded: {0}")]
    Load(String),
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

fn malformed(what: &str) -> LoadError {
    LoadError::Malformed(what.to_string())
}

/// A cursor over bytes that never reads past the end.
struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cur { b, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], LoadError> {
        let n = usize::try_from(n).map_err(|_| malformed(what))?;
        let end = self.pos.checked_add(n).ok_or_else(|| malformed(what))?;
        let s = self.b.get(self.pos..end).ok_or_else(|| {
            LoadError::Malformed(format!("{what}: ends after {} bytes", self.b.len()))
        })?;
        self.pos = end;
        Ok(s)
    }
    fn uleb(&mut self) -> Result<u64, LoadError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .b
                .get(self.pos)
                .ok_or_else(|| malformed("a number runs past the end"))?;
            self.pos += 1;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(malformed("a number overflows 64 bits"));
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("a number overflows 64 bits"))
    }
    fn sleb(&mut self) -> Result<i64, LoadError> {
        let mut v: i64 = 0;
        let mut shift = 0;
        loop {
            let byte = *self
                .b
                .get(self.pos)
                .ok_or_else(|| malformed("a number runs past the end"))?;
            self.pos += 1;
            if shift >= 64 {
                return Err(malformed("a number overflows 64 bits"));
            }
            v |= i64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return Ok(v);
            }
        }
    }
    /// A length-prefixed byte string.
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], LoadError> {
        let n = self.uleb()?;
        self.take(n, what)
    }
}

/// Running totals, checked against the limits as they grow.
struct Budget<'l> {
    limits: &'l LoadLimits,
    counts: DocCounts,
}

impl Budget<'_> {
    fn add_ops(&mut self, n: u64) -> Result<(), LoadError> {
        self.counts.ops = self.counts.ops.saturating_add(n);
        if self.counts.ops > self.limits.max_ops {
            return Err(LoadError::TooManyOps {
                found: self.counts.ops,
                limit: self.limits.max_ops,
            });
        }
        Ok(())
    }
    fn add_changes(&mut self, n: u64) -> Result<(), LoadError> {
        self.counts.changes = self.counts.changes.saturating_add(n);
        if self.counts.changes > self.limits.max_changes {
            return Err(LoadError::TooManyChanges {
                found: self.counts.changes,
                limit: self.limits.max_changes,
            });
        }
        Ok(())
    }
    fn add_bytes(&mut self, n: u64) -> Result<(), LoadError> {
        self.counts.decoded_bytes = self.counts.decoded_bytes.saturating_add(n);
        if self.counts.decoded_bytes > self.limits.max_decoded_bytes {
            return Err(LoadError::TooLarge {
                limit: self.limits.max_decoded_bytes,
            });
        }
        Ok(())
    }
    fn remaining_bytes(&self) -> u64 {
        self.limits
            .max_decoded_bytes
            .saturating_sub(self.counts.decoded_bytes)
    }
}

/// Inflates `data` (raw DEFLATE, as automerge writes it) into at most `cap` bytes.
fn inflate(data: &[u8], cap: u64, limit: u64) -> Result<Vec<u8>, LoadError> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(data)
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| LoadError::Malformed(format!("a compressed part does not inflate: {e}")))?;
    if out.len() as u64 > cap {
        return Err(LoadError::TooLarge { limit });
    }
    Ok(out)
}

/// The number of values a column holds, from its run-length headers alone.
fn column_len(col_type: u32, data: &[u8]) -> Result<u64, LoadError> {
    let mut c = Cur::new(data);
    let mut n: u64 = 0;
    match col_type {
        // Raw values: their count is given by the value-metadata column.
        7 => return Ok(0),
        // Booleans: alternating run lengths, starting with false.
        4 => {
            while !c.done() {
                n = n.saturating_add(c.uleb()?);
            }
        }
        // Run-length encoded: integers, actors, group counts, value metadata, deltas
        // (signed), strings (length-prefixed).
        _ => {
            let skip_value = |c: &mut Cur<'_>| -> Result<(), LoadError> {
                match col_type {
                    5 => c.bytes("a string in a column").map(|_| ()),
                    3 => c.sleb().map(|_| ()),
                    _ => c.uleb().map(|_| ()),
                }
            };
            while !c.done() {
                let count = c.sleb()?;
                if count > 0 {
                    skip_value(&mut c)?;
                    n = n.saturating_add(count as u64);
                } else if count < 0 {
                    let lits = count.unsigned_abs();
                    for _ in 0..lits {
                        skip_value(&mut c)?;
                    }
                    n = n.saturating_add(lits);
                } else {
                    n = n.saturating_add(c.uleb()?);
                }
            }
        }
    }
    Ok(n)
}

/// Column metadata: (spec, length) pairs.
fn column_meta(c: &mut Cur<'_>) -> Result<Vec<(u32, u64)>, LoadError> {
    let count = c.uleb()?;
    // Each column takes at least two bytes of metadata: a count beyond the input is a lie.
    if count > c.b.len() as u64 {
        return Err(malformed("more columns than bytes"));
    }
    let mut cols = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let spec = u32::try_from(c.uleb()?).map_err(|_| malformed("a column id overflows"))?;
        let len = c.uleb()?;
        cols.push((spec, len));
    }
    Ok(cols)
}

/// Walks the columns described by `meta` in `c`, returning the longest column's length.
fn table_rows(
    c: &mut Cur<'_>,
    meta: &[(u32, u64)],
    budget: &mut Budget<'_>,
) -> Result<u64, LoadError> {
    let mut rows = 0u64;
    for &(spec, len) in meta {
        let raw = c.take(len, "a column")?;
        let col_type = spec & 7;
        let deflated = spec & 8 != 0;
        let len = if deflated {
            // The chunk's own bytes are already counted; an inflated column adds its size.
            let data = inflate(
                raw,
                budget.remaining_bytes(),
                budget.limits.max_decoded_bytes,
            )?;
            budget.add_bytes(data.len() as u64)?;
            column_len(col_type, &data)?
        } else {
            column_len(col_type, raw)?
        };
        rows = rows.max(len);
    }
    Ok(rows)
}

/// A change chunk's body (after the chunk header).
fn scan_change(data: &[u8], budget: &mut Budget<'_>) -> Result<(), LoadError> {
    let mut c = Cur::new(data);
    let deps = c.uleb()?;
    c.take(deps.saturating_mul(32), "the change's dependencies")?;
    c.bytes("the change's actor")?;
    c.uleb()?; // seq
    c.uleb()?; // start op
    c.sleb()?; // time
    c.bytes("the change's message")?;
    let others = c.uleb()?;
    if others > data.len() as u64 {
        return Err(malformed("more actors than bytes"));
    }
    for _ in 0..others {
        c.bytes("an actor")?;
    }
    let meta = column_meta(&mut c)?;
    let ops = table_rows(&mut c, &meta, budget)?;
    budget.add_changes(1)?;
    budget.add_ops(ops)
}

/// A document chunk's body (after the chunk header).
fn scan_document(data: &[u8], budget: &mut Budget<'_>) -> Result<(), LoadError> {
    let mut c = Cur::new(data);
    let actors = c.uleb()?;
    if actors > data.len() as u64 {
        return Err(malformed("more actors than bytes"));
    }
    for _ in 0..actors {
        c.bytes("an actor")?;
    }
    let heads = c.uleb()?;
    c.take(heads.saturating_mul(32), "the document's heads")?;
    let change_meta = column_meta(&mut c)?;
    let op_meta = column_meta(&mut c)?;
    let changes = table_rows(&mut c, &change_meta, budget)?;
    budget.add_changes(changes)?;
    let ops = table_rows(&mut c, &op_meta, budget)?;
    budget.add_ops(ops)
}

/// Counts what `bytes` (a saved document, change chunks, or both concatenated) holds, and
/// refuses it as soon as a count passes `limits`. Never loads the document.
pub fn scan(bytes: &[u8], limits: &LoadLimits) -> Result<DocCounts, LoadError> {
    let mut budget = Budget {
        limits,
        counts: DocCounts::default(),
    };
    let mut c = Cur::new(bytes);
    if c.done() {
        return Err(malformed("the document is empty"));
    }
    while !c.done() {
        let magic = c.take(4, "a chunk header")?;
        if magic != MAGIC {
            return Err(malformed(
                "not an automerge document (a chunk does not start with automerge's magic bytes)",
            ));
        }
        c.take(4, "a chunk checksum")?;
        let kind = c.take(1, "a chunk type")?[0];
        let len = c.uleb()?;
        let body = c.take(len, "a chunk")?;
        budget.counts.chunks += 1;
        match kind {
            0 => {
                budget.add_bytes(body.len() as u64)?;
                scan_document(body, &mut budget)?
            }
            1 => {
                budget.add_bytes(body.len() as u64)?;
                scan_change(body, &mut budget)?
            }
            2 => {
                let cap = budget.remaining_bytes();
                let inflated = inflate(body, cap, limits.max_decoded_bytes)?;
                budget.add_bytes(inflated.len() as u64)?;
                scan_change(&inflated, &mut budget)?
            }
            other => {
                return Err(LoadError::Malformed(format!(
                    "chunk type {other} is not one chartmesh sends (document or change)"
                )));
            }
        }
    }
    Ok(budget.counts)
}

impl crate::ChartDoc {
    /// Loads a document received from a peer (a full save and/or change chunks), refusing it
    /// before automerge sees it if it holds more than `limits` allow ([`scan`]).
    pub fn load_limited(bytes: &[u8], limits: &LoadLimits) -> Result<crate::ChartDoc, LoadError> {
        scan(bytes, limits)?;
        crate::ChartDoc::load(bytes, []).map_err(|e| LoadError::Load(e.to_string()))
    }

    /// Merges changes received from a peer ([`crate::ChartDoc::merge`]) only if this document
    /// with them stays within `limits` (what it holds already counts). On an error from the
    /// merge itself the document must be discarded, as with `merge`.
    pub fn merge_limited(
        &mut self,
        data: &[u8],
        limits: &LoadLimits,
    ) -> Result<crate::Merged, LoadError> {
        use automerge::ReadDoc;
        let have = self.automerge().stats();
        let left = LoadLimits {
            max_ops: limits.max_ops.saturating_sub(have.num_ops),
            max_changes: limits.max_changes.saturating_sub(have.num_changes),
            max_decoded_bytes: limits.max_decoded_bytes,
        };
        scan(data, &left).map_err(|e| match e {
            LoadError::TooManyOps { found, .. } => LoadError::TooManyOps {
                found: found + have.num_ops,
                limit: limits.max_ops,
            },
            LoadError::TooManyChanges { found, .. } => LoadError::TooManyChanges {
                found: found + have.num_changes,
                limit: limits.max_changes,
            },
            other => other,
        })?;
        self.merge(data).map_err(|e| LoadError::Load(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChangeMeta, Chart, ChartDoc, PracticeId};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT, ReadDoc, ScalarValue};

    fn meta(t: i64) -> ChangeMeta {
        ChangeMeta {
            practice: PracticeId::from_certificate_der(b"limits"),
            author: "Dr A".into(),
            action: "test".into(),
            time_ms: t,
        }
    }

    fn chart() -> Chart {
        Chart::from_json_slice(br#"{"id":"c1","type":"chart","schemaVersion":1,"patient":{"mrn":"M1","name":{"given":["Ana"],"family":"Lim"},"birthDate":"1980-02-03"},"notes":[{"id":"n1","author":"Dr A","date":"2026-01-01T00:00:00Z","text":"well"}],"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}"#).unwrap()
    }

    /// A list of `n` nulls in one change: a few hundred bytes however large `n` is.
    pub(crate) fn hostile(n: usize) -> Vec<u8> {
        let mut d = AutoCommit::new();
        let list = d.put_object(ROOT, "notes", ObjType::List).unwrap();
        d.splice(&list, 0, 0, std::iter::repeat_n(ScalarValue::Null, n))
            .unwrap();
        d.save()
    }

    /// The counts agree with automerge's own for real documents: a full save (compressed or
    /// not), change chunks, and both concatenated.
    #[test]
    fn counts_match_automerge_for_real_documents() {
        let mut doc = ChartDoc::create(&chart(), &meta(1));
        let base = doc.save();
        let _ = doc.save_incremental();
        for i in 0..5 {
            doc.put_root_str("updatedAt", &format!("2026-01-0{}T00:00:00Z", i + 1))
                .unwrap();
            doc.automerge().commit();
        }
        let inc = doc.save_incremental();
        let stats = doc.automerge().stats();
        let all = [base.clone(), inc.clone()].concat();
        let limits = LoadLimits::default();
        let c = scan(&all, &limits).unwrap();
        assert_eq!(c.changes, stats.num_changes, "{c:?}");
        assert!(c.ops >= stats.num_ops, "{c:?} vs {stats:?}");
        let c = scan(&doc.automerge().save(), &limits).unwrap();
        assert!(
            c.ops >= stats.num_ops && c.changes == stats.num_changes,
            "{c:?}"
        );
        let changes = doc.changes_after(&[]);
        let c = scan(&changes, &limits).unwrap();
        assert_eq!(c.changes, stats.num_changes);
        assert!(c.ops >= stats.num_ops, "{c:?}");
        let loaded = ChartDoc::load_limited(&all, &limits).unwrap();
        assert_eq!(loaded.to_chart().unwrap(), doc.to_chart().unwrap());
        // The hostile shape, small enough to build: counted exactly.
        let h = hostile(5000);
        let c = scan(&h, &limits).unwrap();
        assert!(c.ops >= 5000 && c.ops < 5010, "{c:?}");
    }

    #[test]
    fn over_the_limits_is_refused_and_merge_counts_what_is_held() {
        let mut doc = ChartDoc::create(&chart(), &meta(1));
        let held = doc.automerge().stats().num_ops;
        let tight = LoadLimits {
            max_ops: held + 3,
            ..LoadLimits::default()
        };
        let mut other = ChartDoc::load(&doc.save(), []).unwrap();
        let _ = other.save_incremental();
        for i in 0..10 {
            other
                .put_root_str("updatedAt", &format!("2026-01-{:02}T00:00:00Z", i + 1))
                .unwrap();
            other.automerge().commit();
        }
        let inc = other.save_incremental();
        let e = doc.merge_limited(&inc, &tight).unwrap_err();
        assert!(
            matches!(e, LoadError::TooManyOps { limit, .. } if limit == held + 3),
            "{e}"
        );
        assert!(
            ChartDoc::load_limited(&hostile(5000), &tight)
                .err()
                .unwrap()
                .to_string()
                .contains("operations, over the limit"),
        );
        let few = LoadLimits {
            max_changes: 2,
            ..LoadLimits::default()
        };
        assert!(matches!(
            ChartDoc::load_limited(&other.automerge().save(), &few),
            Err(LoadError::TooManyChanges { .. })
        ));
        // A merge within the limits works as `merge` does.
        let m = doc.merge_limited(&inc, &LoadLimits::default()).unwrap();
        assert_eq!(m.added, 10);
    }

    #[test]
    fn a_compression_bomb_is_refused_within_the_decoded_size_limit() {
        // A document whose columns are DEFLATE-compressed (automerge's default save).
        let mut d = AutoCommit::new();
        let list = d.put_object(ROOT, "notes", ObjType::List).unwrap();
        let big = "x".repeat(300_000);
        d.insert(&list, 0, big.as_str()).unwrap();
        let saved = d.save();
        assert!(saved.len() < 10_000, "{}", saved.len());
        let small = LoadLimits {
            max_decoded_bytes: 100_000,
            ..LoadLimits::default()
        };
        assert_eq!(
            scan(&saved, &small).unwrap_err(),
            LoadError::TooLarge { limit: 100_000 }
        );
        assert!(scan(&saved, &LoadLimits::default()).is_ok());
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let limits = LoadLimits::default();
        for bad in [
            &b""[..],
            b"not automerge",
            &[
                0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f,
            ],
            &[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 9, 0],
        ] {
            assert!(
                matches!(scan(bad, &limits), Err(LoadError::Malformed(_))),
                "{bad:?}"
            );
        }
        let mut doc = ChartDoc::create(&chart(), &meta(1));
        let saved = doc.save();
        for cut in [1, 10, saved.len() / 2, saved.len() - 1] {
            assert!(ChartDoc::load_limited(&saved[..cut], &limits).is_err());
        }
    }
}
