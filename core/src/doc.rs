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
        ChartDoc { doc }
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
        Ok(ChartDoc { doc })
    }

    /// Full save, uncompressed columns. Documents are small (a few KB); skipping DEFLATE
    /// makes saving cheaper, and the sync layer compresses many documents at once better
    /// than DEFLATE does one at a time.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save_nocompress()
    }

    /// The changes made since the last save or incremental save.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        self.doc.save_incremental()
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    pub fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    /// The chart as JSON, in the imported shape.
    pub fn to_json(&self) -> Result<Value, CoreError> {
        let h = self
            .doc
            .hydrate(ROOT, None)
            .map_err(|e| CoreError::CorruptDocument(e.to_string()))?;
        let mut v = hydrate_to_json(&h);
        if let Value::Object(m) = &mut v {
            for key in RECORD_SECTIONS {
                if let Some(Value::Array(items)) = m.get_mut(*key) {
                    for item in items.iter_mut() {
                        if let Value::String(s) = item {
                            *item = serde_json::from_str(s).map_err(|e| {
                                CoreError::CorruptDocument(format!(
                                    "an entry of `{key}` is not JSON: {e}"
                                ))
                            })?;
                        }
                    }
                }
            }
        }
        Ok(v)
    }

    pub fn to_chart(&self) -> Result<Chart, CoreError> {
        serde_json::from_value(self.to_json()?).map_err(|e| CoreError::Shape(e.to_string()))
    }

    /// Appends one entry at the end of its section, as one change.
    pub fn append(&mut self, entry: &Entry, meta: &ChangeMeta) -> Result<(), CoreError> {
        self.doc.set_actor(meta.actor());
        let key = entry.section().key();
        let list = match self.doc.get(ROOT, key).map_err(shape)? {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            Some(_) => return Err(CoreError::Shape(format!("`{key}` is not a list"))),
            None => self
                .doc
                .put_object(ROOT, key, ObjType::List)
                .map_err(shape)?,
        };
        let len = self.doc.length(&list);
        let value = entry.to_json();
        self.doc
            .insert(
                &list,
                len,
                serde_json::to_string(&value).expect("entries serialize"),
            )
            .map_err(shape)?;
        self.doc.commit_with(meta.commit_options());
        Ok(())
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
        if version != 1 {
            return Err(missing("schemaVersion"));
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
        let d = &self.doc;
        let list = match d.get(ROOT, key).map_err(shape)? {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            None => return Ok(Vec::new()),
            Some(_) => return Err(CoreError::Shape(format!("`{key}` is not a list"))),
        };
        (0..d.length(&list))
            .map(|i| match d.get(&list, i).map_err(shape)? {
                Some((automerge::Value::Scalar(sv), _)) => match sv.as_ref() {
                    ScalarValue::Str(t) => serde_json::from_str(t).map_err(|e| {
                        CoreError::CorruptDocument(format!("an entry of `{key}` is not valid: {e}"))
                    }),
                    _ => Err(CoreError::Shape(format!(
                        "an entry of `{key}` is not a record"
                    ))),
                },
                _ => Err(CoreError::Shape(format!(
                    "an entry of `{key}` is not a record"
                ))),
            })
            .collect()
    }

    /// The part of the chart that due lists and population counts read (patient, conditions,
    /// observations, immunizations), without converting notes or medications: about a third
    /// of the cost of [`ChartDoc::to_chart`] on the bench charts.
    pub fn due_view(&self) -> Result<Chart, CoreError> {
        let h = self.header()?;
        Ok(Chart {
            id: h.id,
            kind: "chart".into(),
            schema_version: 1,
            practice_id: None,
            patient: crate::chart::Patient {
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
                sex: None,
                address: None,
                phone: None,
                insurance: None,
            },
            conditions: self.section("conditions")?,
            allergies: Vec::new(),
            medications: Vec::new(),
            observations: self.section("observations")?,
            notes: Vec::new(),
            immunizations: self.section("immunizations")?,
            referral: None,
            created_at: String::new(),
            updated_at: String::new(),
        })
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
        Ok(Merged {
            added: added.len(),
            actors,
            missing_deps: missing.len(),
        })
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

fn shape(e: automerge::AutomergeError) -> CoreError {
    CoreError::Shape(e.to_string())
}

/// The list sections of a chart. Each entry (a condition, an allergy, a medication order, a
/// measurement, a signed note, a given vaccine) is kept as one scalar holding its compact
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
    let mut patient = HashMap::with_capacity(7);
    patient.insert("mrn".to_string(), s(&p.mrn));
    patient.insert("name".to_string(), map(name));
    patient.insert("birthDate".to_string(), s(&p.birth_date));
    opt(&mut patient, "sex", &p.sex);
    opt(&mut patient, "phone", &p.phone);
    if let Some(a) = &p.address {
        let mut m = HashMap::with_capacity(4);
        m.insert("line".to_string(), strings(&a.line));
        opt(&mut m, "city", &a.city);
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
    if let Some(r) = &c.referral {
        let mut m = HashMap::with_capacity(4);
        m.insert("to".to_string(), s(&r.to));
        opt(&mut m, "reason", &r.reason);
        opt(&mut m, "date", &r.date);
        opt(&mut m, "status", &r.status);
        root.insert("referral".to_string(), map(m));
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
}
