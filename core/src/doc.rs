//! One chart as one automerge document.
//!
//! The root map of the document holds the chart's JSON shape: objects become maps, arrays
//! become lists, strings stay scalar strings (not collaborative `Text`: notes are written
//! whole, and scalar strings build and load several times faster), numbers keep their integer
//! or decimal kind. Every change is committed with a [`ChangeMeta`]: the practice's actor id,
//! the time, and a message naming the author and the action, which is what `history` shows.

use automerge::hydrate;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::chart::{Chart, Entry};
use crate::error::CoreError;
use crate::ids::PracticeId;

/// Who made a change, where and when. Stored in every automerge change (actor + time +
/// message), so provenance travels with the document to every practice it is shared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeMeta {
    pub practice: PracticeId,
    pub author: String,
    pub action: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct Message<'a> {
    #[serde(rename = "p")]
    practice: std::borrow::Cow<'a, str>,
    #[serde(rename = "a")]
    author: std::borrow::Cow<'a, str>,
    #[serde(rename = "x")]
    action: std::borrow::Cow<'a, str>,
}

impl ChangeMeta {
    fn commit_options(&self) -> CommitOptions {
        let msg = Message {
            practice: self.practice.to_string().into(),
            author: self.author.as_str().into(),
            action: self.action.as_str().into(),
        };
        CommitOptions::default()
            .with_message(serde_json::to_string(&msg).expect("message serializes"))
            .with_time(self.time_ms)
    }
    fn actor(&self) -> ActorId {
        ActorId::from(&self.practice.actor_bytes()[..])
    }
}

/// One entry of a chart's history: one automerge change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub hash: String,
    /// Hex of the automerge actor; the first 16 bytes of the writing practice's id.
    pub actor: String,
    pub seq: u64,
    pub time_ms: i64,
    /// The practice as recorded in the change message (may be absent for foreign changes).
    pub practice: Option<String>,
    pub author: Option<String>,
    pub action: Option<String>,
}

pub struct ChartDoc {
    doc: AutoCommit,
    /// Set by [`ChartDoc::mark_saved`]: the heads of what is stored, which
    /// [`ChartDoc::save_incremental`] saves after (automerge's own cursor is empty after a
    /// load, so its first incremental save would encode the whole document again).
    saved: Option<Vec<ChangeHash>>,
}

/// A chart's id and search-index fields, read from its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartHeader {
    pub id: String,
    pub mrn: String,
    pub family: String,
    pub given: String,
    pub birth_date: String,
}

/// What merging a peer's changes added to a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Changes new to this document.
    pub added: usize,
    /// The actors (16 bytes each) that wrote them.
    pub actors: Vec<[u8; 16]>,
    /// Dependencies still missing: changes that cannot be applied yet (held in memory only).
    pub missing_deps: usize,
    /// When the merge joined concurrent edits (this document's heads before the merge are
    /// still heads after it): those heads, and the heads of the peer's side.
    pub concurrent: Option<Concurrent>,
}

/// The two sides of a merge of concurrent edits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrent {
    /// This document's heads before the merge.
    pub local: Vec<[u8; 32]>,
    /// The heads of the changes the peer sent.
    pub peer: Vec<[u8; 32]>,
}

impl ChartDoc {
    /// Builds the document for a new chart in one batch (one change).
    pub fn create(chart: &Chart, meta: &ChangeMeta) -> ChartDoc {
        Self::create_from_root(&typed_chart_to_hydrate(chart), meta)
    }

    /// Builds the document from a chart's JSON (which must be a valid chart).
    pub fn create_from_json(chart: &Value, meta: &ChangeMeta) -> ChartDoc {
        Self::create_from_root(&chart_to_hydrate(chart), meta)
    }

    fn create_from_root(root: &hydrate::Map, meta: &ChangeMeta) -> ChartDoc {
        let mut doc = AutoCommit::new().with_actor(meta.actor());
        doc.init_root_from_hydrate(root)
            .expect("init of an empty document");
        doc.commit_with(meta.commit_options());
        ChartDoc { doc, saved: None }
    }

    /// Loads a saved document followed by incremental saves (in order).
    pub fn load<'a>(
        base: &[u8],
        incrementals: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<ChartDoc, CoreError> {
        let mut doc =
            AutoCommit::load(base).map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        for inc in incrementals {
            doc.load_incremental(inc)
                .map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        }
        Ok(ChartDoc { doc, saved: None })
    }

    /// Full save, uncompressed columns. Documents are small (a few KB); skipping DEFLATE
    /// makes saving cheaper, and the sync layer compresses many documents at once better
    /// than DEFLATE does one at a time.
    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_nocompress();
        if self.saved.is_some() {
            self.saved = Some(self.doc.get_heads());
        }
        bytes
    }

    /// The changes made since the last save, incremental save or [`ChartDoc::mark_saved`].
    pub fn save_incremental(&mut self) -> Vec<u8> {
        match &self.saved {
            Some(heads) => {
                let heads = heads.clone();
                let bytes = self.doc.save_after(&heads);
                self.saved = Some(self.doc.get_heads());
                bytes
            }
            None => self.doc.save_incremental(),
        }
    }

    /// Marks the document as it is now as stored: the next incremental save holds only
    /// what changes after this (what a `save_incremental` whose bytes are dropped does, without
    /// encoding the whole loaded document).
    pub fn mark_saved(&mut self) {
        self.saved = Some(self.doc.get_heads());
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    pub fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    /// The chart as JSON, in the imported shape. A record section's entries are read from
    /// every list stored under its key (see [`ChartDoc::section`]).
    pub fn to_json(&self) -> Result<Value, CoreError> {
        let h = self
            .doc
            .hydrate(ROOT, None)
            .map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        let mut v = hydrate_to_json(&h);
        if let Value::Object(m) = &mut v {
            for key in RECORD_SECTIONS {
                if m.contains_key(*key) {
                    let mut items = Vec::new();
                    self.each_entry(key, None, |s| {
                        items.push(serde_json::from_str(s).map_err(|e| {
                            CoreError::CorruptDocument(format!(
                                "an entry of `{key}` is not JSON: {e}"
                            ))
                        })?);
                        Ok(())
                    })?;
                    m.insert(key.to_string(), Value::Array(items));
                }
            }
        }
        Ok(v)
    }

    /// The chart, typed. Entries are read straight from their stored text, so decimals keep
    /// the digits they were written with.
    pub fn to_chart(&self) -> Result<Chart, CoreError> {
        let h = self
            .doc
            .hydrate(ROOT, None)
            .map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        let mut v = hydrate_to_json(&h);
        let mut present = Vec::new();
        if let Value::Object(m) = &mut v {
            for key in RECORD_SECTIONS {
                if m.remove(*key).is_some() {
                    present.push(*key);
                }
            }
        }
        let mut c: Chart =
            serde_json::from_value(v).map_err(|e| CoreError::Shape(e.to_string()))?;
        for key in present {
            match key {
                "conditions" => c.conditions = self.section(key)?,
                "allergies" => c.allergies = self.section(key)?,
                "medications" => c.medications = self.section(key)?,
                "observations" => c.observations = self.section(key)?,
                "notes" => c.notes = self.section(key)?,
                "immunizations" => c.immunizations = self.section(key)?,
                "encounters" => c.encounters = self.section(key)?,
                "procedures" => c.procedures = self.section(key)?,
                _ => {}
            }
        }
        Ok(c)
    }

    /// The document's `schemaVersion` (0 when missing or not a number).
    pub fn schema_version(&self) -> i64 {
        match self.doc.get(ROOT, "schemaVersion").ok().flatten() {
            Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Int(i) => *i,
                ScalarValue::Uint(u) => *u as i64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Sets `schemaVersion` to at least `v` as part of the next change.
    fn raise_version(&mut self, v: u32) -> Result<(), CoreError> {
        if self.schema_version() < v as i64 {
            self.doc
                .put(ROOT, "schemaVersion", ScalarValue::Int(v as i64))
                .map_err(shape)?;
        }
        Ok(())
    }

    /// The list an entry of `key` is appended to (created when the chart has none yet).
    fn section_list(&mut self, key: &str) -> Result<automerge::ObjId, CoreError> {
        Ok(match self.doc.get(ROOT, key).map_err(shape)? {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            Some(_) => return Err(CoreError::Shape(format!("`{key}` is not a list"))),
            None => self
                .doc
                .put_object(ROOT, key, ObjType::List)
                .map_err(shape)?,
        })
    }

    /// Puts one entry at the end of its section (no commit); raises the chart to version 2
    /// when the entry uses a version 2 field.
    fn put_entry(&mut self, entry: &Entry) -> Result<(), CoreError> {
        if entry.v2_field().is_some() {
            self.raise_version(2)?;
        }
        let list = self.section_list(entry.section().key())?;
        let len = self.doc.length(&list);
        self.doc
            .insert(&list, len, entry.to_json_string())
            .map_err(shape)?;
        Ok(())
    }

    /// Sets demographic fields of the patient (camelCase keys, JSON values; `None` removes
    /// the field), as one change. Raises the chart to version 2 when a field needs it.
    pub fn set_patient_fields(
        &mut self,
        fields: &[(&str, Option<Value>)],
        version: u32,
        meta: &ChangeMeta,
    ) -> Result<(), CoreError> {
        self.doc.set_actor(meta.actor());
        let patient = match self.doc.get(ROOT, "patient").map_err(shape)? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            _ => return Err(CoreError::Shape("`patient` is not a map".into())),
        };
        self.raise_version(version)?;
        for (k, v) in fields {
            match v {
                Some(v) => put_json(&mut self.doc, &patient, k, v)?,
                None => self.doc.delete(&patient, *k).map_err(shape)?,
            }
        }
        self.doc.commit_with(meta.commit_options());
        Ok(())
    }

    /// Appends one entry at the end of its section, as one change.
    pub fn append(&mut self, entry: &Entry, meta: &ChangeMeta) -> Result<(), CoreError> {
        self.append_all(std::slice::from_ref(entry), meta)
    }

    /// Appends entries at the end of their sections, as one change.
    pub fn append_all(&mut self, entries: &[Entry], meta: &ChangeMeta) -> Result<(), CoreError> {
        self.doc.set_actor(meta.actor());
        for e in entries {
            self.put_entry(e)?;
        }
        self.doc.commit_with(meta.commit_options());
        Ok(())
    }

    /// Records a new referral (with its request event) as one change.
    pub fn add_referral(
        &mut self,
        referral: &crate::referral::Referral,
        meta: &ChangeMeta,
    ) -> Result<(), CoreError> {
        self.doc.set_actor(meta.actor());
        let map = match self.doc.get(ROOT, "referrals").map_err(shape)? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            Some(_) => return Err(CoreError::Shape("`referrals` is not a map".into())),
            None => self
                .doc
                .put_object(ROOT, "referrals", ObjType::Map)
                .map_err(shape)?,
        };
        if self
            .doc
            .get(&map, referral.id.as_str())
            .map_err(shape)?
            .is_some()
        {
            return Err(CoreError::Shape(format!(
                "referral {} already exists",
                referral.id
            )));
        }
        let v = serde_json::to_value(referral).expect("referrals serialize");
        put_json(&mut self.doc, &map, referral.id.as_str(), &v)?;
        self.doc.commit_with(meta.commit_options());
        Ok(())
    }

    /// Appends a step to a referral, with an optional entry (a consult note) in the same
    /// change, so the note and the step arrive together.
    pub fn add_referral_event(
        &mut self,
        referral_id: &str,
        event: &crate::referral::Event,
        entry: Option<&Entry>,
        meta: &ChangeMeta,
    ) -> Result<(), CoreError> {
        self.doc.set_actor(meta.actor());
        let missing = || CoreError::Shape(format!("the chart has no referral {referral_id}"));
        let map = match self.doc.get(ROOT, "referrals").map_err(shape)? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            _ => return Err(missing()),
        };
        let rec = match self.doc.get(&map, referral_id).map_err(shape)? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            _ => return Err(missing()),
        };
        let events = match self.doc.get(&rec, "events").map_err(shape)? {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            _ => self
                .doc
                .put_object(&rec, "events", ObjType::List)
                .map_err(shape)?,
        };
        let len = self.doc.length(&events);
        let obj = self
            .doc
            .insert_object(&events, len, ObjType::Map)
            .map_err(shape)?;
        if let Value::Object(fields) = serde_json::to_value(event).expect("events serialize") {
            for (k, v) in &fields {
                put_json(&mut self.doc, &obj, k, v)?;
            }
        }
        if let Some(e) = entry {
            // Put in the same change as the event, so both arrive together.
            self.put_entry(e)?;
        }
        self.doc.commit_with(meta.commit_options());
        Ok(())
    }

    /// The chart's referrals, read without converting the rest of the chart.
    pub fn referrals(&self) -> Result<crate::referral::Referrals, CoreError> {
        let map = match self.doc.get(ROOT, "referrals").map_err(shape)? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            None => return Ok(Default::default()),
            Some(_) => return Err(CoreError::Shape("`referrals` is not a map".into())),
        };
        let h = self
            .doc
            .hydrate(map, None)
            .map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        serde_json::from_value(hydrate_to_json(&h))
            .map_err(|e| CoreError::Shape(format!("a referral is not valid: {e}")))
    }

    /// The ids of the chart's referrals (cheap when it has none: one map lookup).
    pub fn referral_ids(&self) -> Vec<String> {
        match self.doc.get(ROOT, "referrals") {
            Ok(Some((automerge::Value::Object(ObjType::Map), id))) => self.doc.keys(&id).collect(),
            _ => Vec::new(),
        }
    }

    /// Sets a top-level scalar field (e.g. `updatedAt`) as part of the next change.
    pub fn put_root_str(&mut self, key: &str, value: &str) -> Result<(), CoreError> {
        self.doc.put(ROOT, key, value).map_err(shape)
    }

    /// The few fields needed to file a received chart (its id and the search index), read
    /// straight from the document without converting all of it. Errors name what is missing.
    pub fn header(&self) -> Result<ChartHeader, CoreError> {
        let d = &self.doc;
        let missing = |f: &str| CoreError::Shape(format!("the document has no valid `{f}`"));
        let scalar_str = |obj: &automerge::ObjId, key: &str| -> Option<String> {
            match d.get(obj, key).ok()?? {
                (automerge::Value::Scalar(s), _) => match s.as_ref() {
                    ScalarValue::Str(t) => Some(t.to_string()),
                    _ => None,
                },
                _ => None,
            }
        };
        let map = |obj: &automerge::ObjId, key: &str| -> Option<automerge::ObjId> {
            match d.get(obj, key).ok()?? {
                (automerge::Value::Object(ObjType::Map), id) => Some(id),
                _ => None,
            }
        };
        let id = scalar_str(&ROOT, "id").ok_or_else(|| missing("id"))?;
        if scalar_str(&ROOT, "type").as_deref() != Some("chart") {
            return Err(missing("type"));
        }
        let version = match d.get(ROOT, "schemaVersion").ok().flatten() {
            Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Int(i) => *i,
                ScalarValue::Uint(u) => *u as i64,
                _ => -1,
            },
            _ => -1,
        };
        if version < 1 || version > crate::chart::CURRENT_VERSION as i64 {
            return Err(CoreError::Shape(format!(
                "the document has schemaVersion {version}; this chartmesh reads 1 to {} (a newer chartmesh wrote it: upgrade this one)",
                crate::chart::CURRENT_VERSION
            )));
        }
        let patient = map(&ROOT, "patient").ok_or_else(|| missing("patient"))?;
        let name = map(&patient, "name").ok_or_else(|| missing("patient.name"))?;
        let given = match d.get(&name, "given").ok().flatten() {
            Some((automerge::Value::Object(ObjType::List), list)) => (0..d.length(&list))
                .filter_map(|i| match d.get(&list, i).ok()?? {
                    (automerge::Value::Scalar(s), _) => match s.as_ref() {
                        ScalarValue::Str(t) => Some(t.to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(" "),
            _ => return Err(missing("patient.name.given")),
        };
        Ok(ChartHeader {
            mrn: scalar_str(&patient, "mrn").ok_or_else(|| missing("patient.mrn"))?,
            family: scalar_str(&name, "family").ok_or_else(|| missing("patient.name.family"))?,
            birth_date: scalar_str(&patient, "birthDate")
                .ok_or_else(|| missing("patient.birthDate"))?,
            given,
            id,
        })
    }

    /// The entries of one record section (`conditions`, `observations`, ...), read straight
    /// from the document: each entry is one JSON scalar, so nothing else is converted.
    pub fn section<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Vec<T>, CoreError> {
        self.section_at(key, None)
    }

    /// [`ChartDoc::section`] as it was at `heads` (None: now).
    fn section_at<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        heads: Option<&[ChangeHash]>,
    ) -> Result<Vec<T>, CoreError> {
        let mut out = Vec::new();
        self.each_entry(key, heads, |t| {
            out.push(serde_json::from_str(t).map_err(|e| {
                CoreError::CorruptDocument(format!("an entry of `{key}` is not valid: {e}"))
            })?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The lists stored under a section's key: the one automerge shows first, then any
    /// other made concurrently. A section added to an older chart (encounters, procedures)
    /// is created by the first entry written to it; when two practices do that at the same
    /// time each makes its own list, and automerge keeps both under the key. Reading them
    /// all means neither practice's entries are lost; new entries go to the first.
    fn section_lists(
        &self,
        key: &str,
        heads: Option<&[ChangeHash]>,
    ) -> Result<Vec<automerge::ObjId>, CoreError> {
        let d = &self.doc;
        let first = match heads {
            None => d.get(ROOT, key),
            Some(h) => d.get_at(ROOT, key, h),
        }
        .map_err(shape)?;
        let first = match first {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            None => return Ok(Vec::new()),
            Some(_) => return Err(CoreError::Shape(format!("`{key}` is not a list"))),
        };
        let all = match heads {
            None => d.get_all(ROOT, key),
            Some(h) => d.get_all_at(ROOT, key, h),
        }
        .map_err(shape)?;
        let mut out = vec![first.clone()];
        for (v, id) in all {
            if matches!(v, automerge::Value::Object(ObjType::List)) && id != first {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Calls `f` with the stored text of each entry of a section (at `heads`, or now), in
    /// order, walking each list once (looking entries up by index costs a search each).
    fn each_entry(
        &self,
        key: &str,
        heads: Option<&[ChangeHash]>,
        mut f: impl FnMut(&str) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        let d = &self.doc;
        let not_a_record = || CoreError::Shape(format!("an entry of `{key}` is not a record"));
        for list in self.section_lists(key, heads)? {
            let items = match heads {
                None => d.list_range(&list, ..),
                Some(h) => d.list_range_at(&list, .., h),
            };
            for item in items {
                match &item.value {
                    automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(t)) => f(t)?,
                    _ => return Err(not_a_record()),
                }
            }
        }
        Ok(())
    }

    fn conflict_view(
        &self,
        heads: Option<&[ChangeHash]>,
    ) -> Result<crate::conflicts::View, CoreError> {
        Ok(crate::conflicts::View {
            medications: self.section_at("medications", heads)?,
            allergies: self.section_at("allergies", heads)?,
        })
    }

    /// The clinical conflicts a merge raised (see [`crate::conflicts`]); empty without
    /// reading anything when the merge was not of concurrent edits.
    pub fn review_merge(
        &self,
        merged: &Merged,
    ) -> Result<Vec<crate::conflicts::Conflict>, CoreError> {
        let Some(c) = &merged.concurrent else {
            return Ok(Vec::new());
        };
        let before: Vec<ChangeHash> = c.local.iter().map(|h| ChangeHash(*h)).collect();
        let peer: Vec<ChangeHash> = c.peer.iter().map(|h| ChangeHash(*h)).collect();
        Ok(crate::conflicts::review(
            &self.conflict_view(Some(&before))?,
            &self.conflict_view(Some(&peer))?,
            &self.conflict_view(None)?,
        ))
    }

    /// Replaces (or, with None, removes) the entry at `index` of a record section, as one change.
    pub fn replace_entry(
        &mut self,
        section: crate::chart::Section,
        index: usize,
        entry: Option<&Entry>,
        meta: &ChangeMeta,
    ) -> Result<(), CoreError> {
        self.doc.set_actor(meta.actor());
        let key = section.key();
        // `index` counts across every list of the section, as `section` reads them.
        let mut at = None;
        let mut skip = index;
        for list in self.section_lists(key, None)? {
            let n = self.doc.length(&list);
            if skip < n {
                at = Some(list);
                break;
            }
            skip -= n;
        }
        let Some(list) = at else {
            return Err(CoreError::Shape(format!("`{key}` has no entry {index}")));
        };
        let index = skip;
        if let Some(e) = entry
            && e.v2_field().is_some()
        {
            self.raise_version(2)?;
        }
        match entry {
            Some(e) => self
                .doc
                .put(&list, index, e.to_json_string())
                .map_err(shape)?,
            None => self.doc.delete(&list, index).map_err(shape)?,
        }
        self.doc.commit_with(meta.commit_options());
        Ok(())
    }

    /// The part of the chart that due lists and population counts read (patient, conditions,
    /// observations, immunizations), without converting notes or medications: about a third
    /// of the cost of [`ChartDoc::to_chart`] on the bench charts.
    pub fn due_view(&self) -> Result<Chart, CoreError> {
        let h = self.header()?;
        let (deceased, deceased_date) = self.deceased();
        let mut c = Chart::empty(
            h.id,
            crate::chart::Patient {
                mrn: h.mrn,
                name: crate::chart::HumanName {
                    given: h
                        .given
                        .split(' ')
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect(),
                    family: h.family,
                },
                birth_date: h.birth_date,
                deceased,
                deceased_date,
                ..Default::default()
            },
        );
        c.schema_version = self.schema_version().clamp(1, 2) as u32;
        c.conditions = self.section("conditions")?;
        c.observations = self.section("observations")?;
        c.immunizations = self.section("immunizations")?;
        Ok(c)
    }

    /// The patient's `deceased` flag and date, read without converting the chart.
    fn deceased(&self) -> (bool, Option<String>) {
        let d = &self.doc;
        let Ok(Some((automerge::Value::Object(ObjType::Map), p))) = d.get(ROOT, "patient") else {
            return (false, None);
        };
        let flag = matches!(
            d.get(&p, "deceased"),
            Ok(Some((automerge::Value::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        );
        let date = match d.get(&p, "deceasedDate") {
            Ok(Some((automerge::Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        };
        (flag, date)
    }

    /// The heads as raw 32-byte hashes, sorted.
    pub fn head_bytes(&mut self) -> Vec<[u8; 32]> {
        self.doc.get_heads().iter().map(|h| h.0).collect()
    }

    /// The changes this document has that a peer with heads `have` lacks, as concatenated
    /// change chunks (loadable with [`ChartDoc::merge`]). Hashes this document does not know
    /// (the peer's own newer changes) are ignored; with no known hash this is every change.
    pub fn changes_after(&mut self, have: &[[u8; 32]]) -> Vec<u8> {
        let known: Vec<ChangeHash> = have
            .iter()
            .map(|h| ChangeHash(*h))
            .filter(|h| self.doc.get_change_by_hash(h).is_some())
            .collect();
        self.doc.save_after(&known)
    }

    /// Merges changes received from a peer. Returns what the merge added; on an error the
    /// document must be discarded (it may hold part of the input).
    pub fn merge(&mut self, data: &[u8]) -> Result<Merged, CoreError> {
        let before = self.doc.get_heads();
        self.doc
            .load_incremental(data)
            .map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        let missing = self.doc.get_missing_deps(&[]);
        let added = self.doc.get_changes(&before);
        let mut actors: Vec<[u8; 16]> = Vec::new();
        for c in &added {
            let a = c.actor_id().to_bytes();
            let mut b = [0u8; 16];
            let n = a.len().min(16);
            b[..n].copy_from_slice(&a[..n]);
            if a.len() != 16 {
                // An actor that is not 16 bytes is not one of ours; make it match no practice.
                b = [0xff; 16];
            }
            if !actors.contains(&b) {
                actors.push(b);
            }
        }
        let after = self.doc.get_heads();
        let concurrent =
            (!added.is_empty() && after.iter().any(|h| before.contains(h))).then(|| {
                let deps: std::collections::HashSet<ChangeHash> = added
                    .iter()
                    .flat_map(|c| c.deps().iter().copied())
                    .collect();
                let tips = added
                    .iter()
                    .map(|c| c.hash())
                    .filter(|h| !deps.contains(h))
                    .map(|h| h.0)
                    .collect();
                Concurrent {
                    local: before.iter().map(|h| h.0).collect(),
                    peer: tips,
                }
            });
        Ok(Merged {
            added: added.len(),
            actors,
            missing_deps: missing.len(),
            concurrent,
        })
    }

    /// Whether any change of the document was written by `practice` (its automerge actor).
    pub fn has_changes_by(&mut self, practice: &crate::PracticeId) -> bool {
        let actor = ActorId::from(&practice.actor_bytes()[..]);
        self.doc
            .get_changes_meta(&[])
            .into_iter()
            .any(|m| *m.actor == actor)
    }

    /// Every change of the document, oldest first (in causal order).
    pub fn history(&mut self) -> Vec<HistoryEntry> {
        self.doc
            .get_changes_meta(&[])
            .into_iter()
            .map(|m| {
                let msg: Option<Message> = m
                    .message
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok());
                HistoryEntry {
                    hash: m.hash.to_string(),
                    actor: m.actor.to_hex_string(),
                    seq: m.seq,
                    time_ms: m.timestamp,
                    practice: msg.as_ref().map(|x| x.practice.to_string()),
                    author: msg.as_ref().map(|x| x.author.to_string()),
                    action: msg.as_ref().map(|x| x.action.to_string()),
                }
            })
            .collect()
    }
}

/// Writes a JSON value under `prop` of the map `obj` (maps and lists become objects).
fn put_json(
    doc: &mut AutoCommit,
    obj: &automerge::ObjId,
    prop: &str,
    v: &Value,
) -> Result<(), CoreError> {
    match v {
        Value::Object(m) => {
            let child = doc.put_object(obj, prop, ObjType::Map).map_err(shape)?;
            for (k, x) in m {
                put_json(doc, &child, k, x)?;
            }
        }
        Value::Array(items) => {
            let child = doc.put_object(obj, prop, ObjType::List).map_err(shape)?;
            for (i, x) in items.iter().enumerate() {
                match x {
                    Value::Object(m) => {
                        let o = doc.insert_object(&child, i, ObjType::Map).map_err(shape)?;
                        for (k, y) in m {
                            put_json(doc, &o, k, y)?;
                        }
                    }
                    other => doc.insert(&child, i, json_scalar(other)).map_err(shape)?,
                }
            }
        }
        other => doc.put(obj, prop, json_scalar(other)).map_err(shape)?,
    }
    Ok(())
}

fn json_scalar(v: &Value) -> ScalarValue {
    match json_to_hydrate(v) {
        hydrate::Value::Scalar(s) => s,
        _ => ScalarValue::Null,
    }
}

fn shape(e: automerge::AutomergeError) -> CoreError {
    CoreError::Shape(e.to_string())
}

/// The list sections of a chart. Each entry (a condition, an allergy, a medication order, a
/// measurement, a signed note, a vaccine, a visit, a procedure) is kept as one scalar holding its compact
/// JSON, not as a map of fields: an entry is a clinical unit that is appended, or replaced
/// whole by a correction, never merged field by field (a dose changed at one practice and the
/// order stopped at another should be reviewed, not blended). Concurrent replacements of the
/// same entry stay visible as automerge conflicts for the conflict inbox; concurrent appends
/// both survive. Measured, this cuts a chart's operations by about two thirds and with them
/// the cost of building, loading and syncing it (docs/PERFORMANCE.md). Demographics stay
/// maps, so concurrent edits of different patient fields both survive.
pub const RECORD_SECTIONS: &[&str] = &[
    "conditions",
    "allergies",
    "medications",
    "observations",
    "notes",
    "immunizations",
    "encounters",
    "procedures",
];

/// A chart's JSON → the hydrate map of its document root.
pub fn chart_to_hydrate(chart: &Value) -> hydrate::Map {
    let Value::Object(m) = chart else {
        return hydrate::Map::default();
    };
    m.iter()
        .map(|(k, v)| {
            let hv = match v {
                Value::Array(items) if RECORD_SECTIONS.contains(&k.as_str()) => {
                    hydrate::Value::List(
                        items
                            .iter()
                            .map(|x| {
                                hydrate::Value::Scalar(ScalarValue::Str(
                                    serde_json::to_string(x).expect("serializes").into(),
                                ))
                            })
                            .collect::<Vec<_>>()
                            .into(),
                    )
                }
                other => json_to_hydrate(other),
            };
            (k.clone(), hv)
        })
        .collect::<std::collections::HashMap<String, hydrate::Value>>()
        .into()
}

/// The typed chart → the hydrate map of its document root, without going through
/// `serde_json::Value` (the import hot path). Produces exactly what [`chart_to_hydrate`]
/// produces for the chart's JSON.
pub fn typed_chart_to_hydrate(c: &Chart) -> hydrate::Map {
    use std::collections::HashMap;
    fn s(v: &str) -> hydrate::Value {
        hydrate::Value::Scalar(ScalarValue::Str(v.into()))
    }
    fn opt(m: &mut HashMap<String, hydrate::Value>, k: &str, v: &Option<String>) {
        if let Some(v) = v {
            m.insert(k.to_string(), s(v));
        }
    }
    fn strings(v: &[String]) -> hydrate::Value {
        hydrate::Value::List(v.iter().map(|x| s(x)).collect::<Vec<_>>().into())
    }
    fn json<T: Serialize>(v: &T) -> hydrate::Value {
        json_to_hydrate(&serde_json::to_value(v).expect("chart parts serialize"))
    }
    fn entries<T: Serialize>(v: &[T]) -> hydrate::Value {
        hydrate::Value::List(
            v.iter()
                .map(|x| s(&serde_json::to_string(x).expect("entries serialize")))
                .collect::<Vec<_>>()
                .into(),
        )
    }
    fn map(m: HashMap<String, hydrate::Value>) -> hydrate::Value {
        hydrate::Value::Map(m.into())
    }
    let p = &c.patient;
    let mut name = HashMap::with_capacity(2);
    name.insert("given".to_string(), strings(&p.name.given));
    name.insert("family".to_string(), s(&p.name.family));
    let mut patient = HashMap::with_capacity(8);
    patient.insert("mrn".to_string(), s(&p.mrn));
    opt(&mut patient, "mrnSystem", &p.mrn_system);
    if !p.identifiers.is_empty() {
        patient.insert("identifiers".to_string(), json(&p.identifiers));
    }
    if p.deceased {
        patient.insert(
            "deceased".to_string(),
            hydrate::Value::Scalar(ScalarValue::Boolean(true)),
        );
    }
    opt(&mut patient, "deceasedDate", &p.deceased_date);
    if !p.telecom.is_empty() {
        patient.insert("telecom".to_string(), json(&p.telecom));
    }
    opt(&mut patient, "language", &p.language);
    patient.insert("name".to_string(), map(name));
    patient.insert("birthDate".to_string(), s(&p.birth_date));
    opt(&mut patient, "sex", &p.sex);
    opt(&mut patient, "phone", &p.phone);
    if let Some(a) = &p.address {
        let mut m = HashMap::with_capacity(4);
        m.insert("line".to_string(), strings(&a.line));
        opt(&mut m, "city", &a.city);
        opt(&mut m, "state", &a.state);
        opt(&mut m, "postalCode", &a.postal_code);
        opt(&mut m, "country", &a.country);
        patient.insert("address".to_string(), map(m));
    }
    if let Some(i) = &p.insurance {
        let mut m = HashMap::with_capacity(4);
        opt(&mut m, "provider", &i.provider);
        opt(&mut m, "memberId", &i.member_id);
        opt(&mut m, "group", &i.group);
        opt(&mut m, "validUntil", &i.valid_until);
        patient.insert("insurance".to_string(), map(m));
    }
    let mut root = HashMap::with_capacity(14);
    root.insert("id".to_string(), s(&c.id));
    root.insert("type".to_string(), s(&c.kind));
    root.insert(
        "schemaVersion".to_string(),
        hydrate::Value::Scalar(ScalarValue::Int(c.schema_version as i64)),
    );
    opt(&mut root, "practiceId", &c.practice_id);
    root.insert("patient".to_string(), map(patient));
    root.insert("conditions".to_string(), entries(&c.conditions));
    root.insert("allergies".to_string(), entries(&c.allergies));
    root.insert("medications".to_string(), entries(&c.medications));
    root.insert("observations".to_string(), entries(&c.observations));
    root.insert("notes".to_string(), entries(&c.notes));
    root.insert("immunizations".to_string(), entries(&c.immunizations));
    // Version 2 sections exist only once they have entries (a version 1 chart stays as it came).
    if !c.encounters.is_empty() {
        root.insert("encounters".to_string(), entries(&c.encounters));
    }
    if !c.procedures.is_empty() {
        root.insert("procedures".to_string(), entries(&c.procedures));
    }
    if let Some(r) = &c.referral {
        let mut m = HashMap::with_capacity(4);
        m.insert("to".to_string(), s(&r.to));
        opt(&mut m, "reason", &r.reason);
        opt(&mut m, "date", &r.date);
        opt(&mut m, "status", &r.status);
        root.insert("referral".to_string(), map(m));
    }
    if !c.referrals.is_empty() {
        root.insert(
            "referrals".to_string(),
            json_to_hydrate(&serde_json::to_value(&c.referrals).expect("referrals serialize")),
        );
    }
    root.insert("createdAt".to_string(), s(&c.created_at));
    root.insert("updatedAt".to_string(), s(&c.updated_at));
    root.into()
}

/// JSON → automerge's hydrate value (for batch creation).
pub fn json_to_hydrate(v: &Value) -> hydrate::Value {
    match v {
        Value::Null => hydrate::Value::Scalar(ScalarValue::Null),
        Value::Bool(b) => hydrate::Value::Scalar(ScalarValue::Boolean(*b)),
        Value::Number(n) => hydrate::Value::Scalar(if let Some(i) = n.as_i64() {
            ScalarValue::Int(i)
        } else if let Some(u) = n.as_u64() {
            ScalarValue::Uint(u)
        } else {
            ScalarValue::F64(n.as_f64().unwrap_or(0.0))
        }),
        Value::String(s) => hydrate::Value::Scalar(ScalarValue::Str(s.as_str().into())),
        Value::Array(a) => {
            hydrate::Value::List(a.iter().map(json_to_hydrate).collect::<Vec<_>>().into())
        }
        Value::Object(m) => hydrate::Value::Map(
            m.iter()
                .map(|(k, v)| (k.clone(), json_to_hydrate(v)))
                .collect::<std::collections::HashMap<String, hydrate::Value>>()
                .into(),
        ),
    }
}

/// automerge's hydrate value → JSON.
pub fn hydrate_to_json(v: &hydrate::Value) -> Value {
    match v {
        hydrate::Value::Scalar(s) => match s {
            ScalarValue::Null => Value::Null,
            ScalarValue::Boolean(b) => Value::Bool(*b),
            ScalarValue::Int(i) => Value::Number((*i).into()),
            ScalarValue::Uint(u) => Value::Number((*u).into()),
            ScalarValue::F64(f) => Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            ScalarValue::Str(s) => Value::String(s.to_string()),
            ScalarValue::Counter(c) => Value::Number(i64::from(c).into()),
            ScalarValue::Timestamp(t) => Value::Number((*t).into()),
            ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } => Value::Null,
        },
        hydrate::Value::Map(m) => {
            let mut out = Map::new();
            for (k, mv) in m.iter() {
                out.insert(k.clone(), hydrate_to_json(&mv.value));
            }
            Value::Object(out)
        }
        hydrate::Value::List(l) => {
            Value::Array(l.iter().map(|lv| hydrate_to_json(&lv.value)).collect())
        }
        hydrate::Value::Text(t) => Value::String(t.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::Note;

    pub(crate) fn sample() -> Chart {
        let s = r#"{"id":"chart-1","type":"chart","schemaVersion":1,"practiceId":"p","patient":{"mrn":"M1","name":{"given":["A"],"family":"B"},"birthDate":"2010-12-11","sex":"male"},"conditions":[],"allergies":[],"medications":[],"observations":[{"code":"8480-6","value":131,"date":"2023-05-01T09:12:00Z"},{"code":"x","value":36.6,"date":"2023-05-01T09:12:00Z"}],"notes":[],"immunizations":[],"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}"#;
        Chart::from_json_slice(s.as_bytes()).unwrap()
    }

    fn meta(p: &[u8], author: &str, t: i64) -> ChangeMeta {
        ChangeMeta {
            practice: PracticeId::from_certificate_der(p),
            author: author.into(),
            action: "test".into(),
            time_ms: t,
        }
    }

    #[test]
    fn create_save_load_round_trips_exactly() {
        let c = sample();
        let mut d = ChartDoc::create(&c, &meta(b"a", "import", 1));
        let bytes = d.save();
        let back = ChartDoc::load(&bytes, []).unwrap();
        assert_eq!(back.to_chart().unwrap(), c);
        assert_eq!(
            crate::canonical::to_canonical(&back.to_json().unwrap()),
            crate::canonical::to_canonical(&c.to_json_value())
        );
    }

    /// A section two practices create at the same time (the first encounter of a chart that
    /// had none, at each) is kept by automerge as two lists under one key: every reader sees
    /// both entries, and a read as of the heads before the merge sees the one it had.
    #[test]
    fn a_section_created_at_two_practices_at_once_is_read_whole() {
        use crate::chart::Encounter;
        let mut a = ChartDoc::create(&sample(), &meta(b"a", "import", 1));
        let base = a.save();
        let mut b = ChartDoc::load(&base, []).unwrap();
        let visit = |status: &str| {
            Entry::Encounter(Encounter {
                status: status.into(),
                start: Some("2025-01-01".into()),
                ..Default::default()
            })
        };
        a.append(&visit("finished"), &meta(b"a", "Dr A", 10))
            .unwrap();
        b.append(&visit("planned"), &meta(b"b", "Dr B", 11))
            .unwrap();
        let heads_a = a.automerge().get_heads();
        let inc_b = b.save_incremental();
        a.automerge().load_incremental(&inc_b).unwrap();
        assert_eq!(a.section_lists("encounters", None).unwrap().len(), 2);
        let statuses = |v: Vec<Encounter>| {
            let mut s: Vec<String> = v.into_iter().map(|e| e.status).collect();
            s.sort();
            s
        };
        assert_eq!(
            statuses(a.section("encounters").unwrap()),
            ["finished", "planned"]
        );
        assert_eq!(
            statuses(a.to_chart().unwrap().encounters),
            ["finished", "planned"]
        );
        let json = a.to_json().unwrap();
        assert_eq!(json["encounters"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            statuses(a.section_at("encounters", Some(&heads_a)).unwrap()),
            ["finished"]
        );
    }

    #[test]
    fn concurrent_appends_at_two_practices_both_survive_with_provenance() {
        let c = sample();
        let mut a = ChartDoc::create(&c, &meta(b"a", "import", 1));
        let base = a.save();
        let mut b = ChartDoc::load(&base, []).unwrap();
        let note = |id: &str, who: &str| {
            Entry::Note(Note {
                id: id.into(),
                author: who.into(),
                date: "2025-01-01T00:00:00Z".into(),
                text: "t".into(),
                ..Default::default()
            })
        };
        a.append(&note("n-a", "Dr A"), &meta(b"a", "Dr A", 10))
            .unwrap();
        b.append(&note("n-b", "Dr B"), &meta(b"b", "Dr B", 11))
            .unwrap();
        let inc_b = b.save_incremental();
        let _ = a.save_incremental();
        a.automerge().load_incremental(&inc_b).unwrap();
        let chart = a.to_chart().unwrap();
        let ids: Vec<_> = chart.notes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&"n-a") && ids.contains(&"n-b"));
        let h = a.history();
        assert_eq!(h.len(), 3);
        let authors: Vec<_> = h.iter().filter_map(|e| e.author.clone()).collect();
        assert!(authors.contains(&"Dr A".to_string()) && authors.contains(&"Dr B".to_string()));
        let pb = PracticeId::from_certificate_der(b"b").to_string();
        assert!(
            h.iter()
                .any(|e| e.practice.as_deref() == Some(pb.as_str()) && e.time_ms == 11)
        );
    }

    /// A stored document loaded and marked saved: its next incremental save holds exactly
    /// the changes made after the mark (as the dropped `save_incremental` did), and the
    /// stored base plus those bytes load to the same document; so does the next one.
    #[test]
    fn an_incremental_save_after_mark_saved_holds_only_the_new_changes() {
        let note = |id: &str| {
            Entry::Note(Note {
                id: id.into(),
                author: "Dr A".into(),
                date: "2025-01-01T00:00:00Z".into(),
                text: "t".into(),
                ..Default::default()
            })
        };
        let mut a = ChartDoc::create(&sample(), &meta(b"a", "import", 1));
        let base = a.save();
        let mut marked = ChartDoc::load(&base, []).unwrap();
        let mut old_way = ChartDoc::load(&base, []).unwrap();
        marked.mark_saved();
        let _ = old_way.save_incremental();
        let mut stored = vec![base.clone()];
        for (i, id) in ["n-1", "n-2"].into_iter().enumerate() {
            marked
                .append(&note(id), &meta(b"a", "Dr A", 10 + i as i64))
                .unwrap();
            old_way
                .append(&note(id), &meta(b"a", "Dr A", 10 + i as i64))
                .unwrap();
            let inc = marked.save_incremental();
            assert!(inc.len() < base.len(), "only the new change is saved");
            assert_eq!(inc.len(), old_way.save_incremental().len());
            stored.push(inc);
            let mut back =
                ChartDoc::load(&stored[0], stored[1..].iter().map(|v| v.as_slice())).unwrap();
            assert_eq!(back.heads(), marked.heads());
            assert_eq!(back.to_json().unwrap(), marked.to_json().unwrap());
        }
        assert!(marked.save_incremental().is_empty(), "nothing new");
        // A full save moves the mark too.
        marked
            .append(&note("n-3"), &meta(b"a", "Dr A", 20))
            .unwrap();
        let full = marked.save();
        assert!(marked.save_incremental().is_empty());
        assert_eq!(ChartDoc::load(&full, []).unwrap().heads(), marked.heads());
    }

    #[test]
    fn referral_steps_at_two_practices_merge_and_round_trip_through_json() {
        use crate::referral::{Event, Referral, Status, Step};
        let pa = PracticeId::from_certificate_der(b"a").to_string();
        let pb = PracticeId::from_certificate_der(b"b").to_string();
        let mut a = ChartDoc::create(&sample(), &meta(b"a", "import", 1));
        let ev = |step, at: &str, p: &str| Event {
            step,
            at: at.into(),
            by: "x".into(),
            practice: p.into(),
            note_id: None,
        };
        let r = Referral {
            id: "ref-1".into(),
            from: pa.clone(),
            to: pb.clone(),
            reason: "murmur".into(),
            specialty: Some("cardiology".into()),
            requested: "2026-01-01T00:00:00Z".into(),
            requested_by: "Dr A".into(),
            events: vec![ev(Step::Request, "2026-01-01T00:00:00Z", &pa)],
        };
        a.add_referral(&r, &meta(b"a", "Dr A", 2)).unwrap();
        assert!(a.add_referral(&r, &meta(b"a", "Dr A", 2)).is_err());
        assert_eq!(a.referral_ids(), vec!["ref-1".to_string()]);
        let mut b = ChartDoc::load(&a.save(), []).unwrap();
        let note = Entry::Note(Note {
            id: "n-consult".into(),
            author: "Dr B".into(),
            date: "2026-01-02T00:00:00Z".into(),
            text: "consult".into(),
            ..Default::default()
        });
        b.add_referral_event(
            "ref-1",
            &ev(Step::Accept, "2026-01-02T00:00:00Z", &pb),
            None,
            &meta(b"b", "Dr B", 3),
        )
        .unwrap();
        let mut e = ev(Step::ConsultNote, "2026-01-02T01:00:00Z", &pb);
        e.note_id = Some("n-consult".into());
        b.add_referral_event("ref-1", &e, Some(&note), &meta(b"b", "Dr B", 4))
            .unwrap();
        a.merge(&b.changes_after(&[])).unwrap();
        let got = a.referrals().unwrap();
        assert_eq!(got["ref-1"].status(), Status::Accepted);
        assert_eq!(got["ref-1"].consult_notes(), vec!["n-consult"]);
        let chart = a.to_chart().unwrap();
        assert_eq!(chart.referrals, got);
        assert!(chart.notes.iter().any(|n| n.id == "n-consult"));
        // A chart with referrals re-imports as the same chart (export → import elsewhere).
        let again = ChartDoc::create(&chart, &meta(b"c", "import", 5));
        assert_eq!(again.to_chart().unwrap(), chart);
    }

    #[test]
    fn a_merge_of_concurrent_risky_edits_is_reviewed_and_a_sequential_one_is_not() {
        let med = |dose: &str| Entry::Medication(crate::conflicts::tests::med("Metformin", dose));
        let mut a = ChartDoc::create(&sample(), &meta(b"a", "import", 1));
        let mut b = ChartDoc::load(&a.save(), []).unwrap();
        a.append(&med("500 mg"), &meta(b"a", "Dr A", 2)).unwrap();
        b.append(&med("1000 mg"), &meta(b"b", "Dr B", 3)).unwrap();
        let from_b = b.changes_after(&[]);
        let from_a = a.changes_after(&[]);
        let m = a.merge(&from_b).unwrap();
        assert!(m.concurrent.is_some());
        let got = a.review_merge(&m).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        let m = b.merge(&from_a).unwrap();
        assert_eq!(b.review_merge(&m).unwrap(), got);
        // A sequential edit: C takes A's merged document, adds a dose, A merges it back.
        let mut c = ChartDoc::load(&a.save(), []).unwrap();
        c.append(&med("850 mg"), &meta(b"c", "Dr C", 4)).unwrap();
        let m = a.merge(&c.changes_after(&[])).unwrap();
        assert!(m.concurrent.is_none());
        assert!(a.review_merge(&m).unwrap().is_empty());
    }
}
