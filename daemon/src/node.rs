//! The node: one practice's running state (identity, config, store) and the operations users
//! perform on it. The API calls these; they enforce validation and write the audit trail.
//!
//! CPU-heavy work (parsing charts, building automerge documents) runs on a small rayon pool
//! sized to the machine, never on the async runtime's threads.

use chartmesh_core::PracticeId;
use chartmesh_core::audit::AuditEvent;
use chartmesh_core::chart::{
    Allergy, Condition, Entry, Immunization, Medication, Note, Observation,
};
use chartmesh_core::consent::{self, Access, Grant, Purpose};
use chartmesh_core::{
    ChangeMeta, Chart, ChartDoc, CoreError, HistoryEntry, ValidationError, canonical,
};
use chartmesh_store::{
    ChartSummary, IndexFields, InsertOutcome, NewChart, Peer, Store, StoreError,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::identity::Identity;
use crate::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("chart {0} not found")]
    NotFound(String),
    /// Something other than a chart was not found (an entry of a chart, a peer): the message
    /// says what (HTTP 404, exit code 4 in the CLI).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// Refused by consent or policy (exit code 5 in the CLI).
    #[error("{0}")]
    Refused(String),
    /// A medication was not added because it raised alerts; adding it needs an override
    /// reason (exit code 5 in the CLI).
    #[error("{} alert(s) for this medication: {}; to add it anyway give an override reason", .0.len(), .0.iter().map(|a| a.message.as_str()).collect::<Vec<_>>().join("; "))]
    Alerts(Vec<chartmesh_core::alerts::Alert>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ValidationError> for NodeError {
    fn from(e: ValidationError) -> Self {
        NodeError::Invalid(e.to_string())
    }
}

impl From<CoreError> for NodeError {
    fn from(e: CoreError) -> Self {
        NodeError::Invalid(e.to_string())
    }
}

/// One record of an import that was not kept, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RecordError {
    /// Position of the record in the request (0-based, counting non-blank lines).
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub field: String,
    pub message: String,
    /// For a duplicate id: the position of the earlier record with the same id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub imported: usize,
    /// Already in the store with exactly the same content.
    pub unchanged: usize,
    pub failed: usize,
    pub errors: Vec<RecordError>,
}

pub struct Node {
    pub store: Store,
    pub identity: Identity,
    pub config: Config,
    pub data_dir: PathBuf,
    pool: rayon::ThreadPool,
    /// Signalled when peers are paired or unpaired (the sync service re-reads them).
    pub peers_changed: tokio::sync::Notify,
    /// The running sync service, once started.
    pub sync: std::sync::OnceLock<Arc<crate::sync::SyncService>>,
    /// Rate limits of emergency requests (`crate::emergency`).
    pub(crate) emergency_limits: crate::emergency::Limits,
    /// Unpaired practices that tried to connect (the console's pairing prompt).
    pub pending_peers: crate::pending::PendingPeers,
}

impl Node {
    pub fn new(store: Store, identity: Identity, config: Config, data_dir: PathBuf) -> Arc<Node> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("chart-cpu-{i}"))
            .build()
            .expect("cpu pool starts");
        Arc::new(Node {
            store,
            identity,
            config,
            data_dir,
            pool,
            peers_changed: tokio::sync::Notify::new(),
            sync: std::sync::OnceLock::new(),
            emergency_limits: Default::default(),
            pending_peers: Default::default(),
        })
    }

    /// The local key of a chart as a person names it (see `Store::resolve_chart`): an own
    /// chart by its id, a copy by its id when it is the only copy of that id, or by
    /// `CHART@PRACTICE` (a prefix of the practice id is enough).
    pub async fn resolve(&self, typed: &str) -> Result<String, NodeError> {
        let t = typed.to_string();
        self.read(move |s| match s.resolve_chart(&t) {
            Ok(Some(k)) => Ok(k),
            Ok(None) => Err(NodeError::NotFound(t)),
            Err(StoreError::Ambiguous(a, b)) => {
                Err(NodeError::Invalid(StoreError::Ambiguous(a, b).to_string()))
            }
            Err(e) => Err(e.into()),
        })
        .await
    }

    pub fn practice_id(&self) -> String {
        self.identity.id.to_string()
    }

    pub(crate) fn meta(&self, author: &str, action: &str) -> ChangeMeta {
        ChangeMeta {
            practice: self.identity.id,
            author: author.to_string(),
            action: action.to_string(),
            time_ms: now_ms(),
        }
    }

    /// Runs store reads off the async workers (a slow disk must never stall the QUIC
    /// endpoint or the API): every read on an async path goes through here.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| NodeError::Store(StoreError::Closed))?
    }

    /// Runs CPU-heavy work on the node's pool.
    pub async fn on_cpu<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.on_pool(f).await
    }

    async fn on_pool<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            let _ = tx.send(f());
        });
        rx.await.expect("cpu pool task finished")
    }

    /// Imports newline-separated chart records. Every good record is kept; each bad one is
    /// reported with its position and reason. Returns once the kept charts are durable.
    pub async fn import_jsonl(
        self: &Arc<Self>,
        body: bytes::Bytes,
        author: &str,
    ) -> Result<ImportReport, NodeError> {
        let meta = self.meta(author, "import");
        // Byte ranges of the non-blank records.
        let spans: Arc<Vec<(usize, usize)>> = {
            let mut v = Vec::new();
            let mut start = 0;
            for (i, b) in body.iter().enumerate() {
                if *b == b'\n' {
                    v.push((start, i));
                    start = i + 1;
                }
            }
            v.push((start, body.len()));
            Arc::new(
                v.into_iter()
                    .filter(|(s, e)| !body[*s..*e].iter().all(|b| b.is_ascii_whitespace()))
                    .collect(),
            )
        };
        let built = {
            let (body, spans) = (body.clone(), spans.clone());
            let pool_meta = meta.clone();
            self.on_pool(move || {
                use rayon::prelude::*;
                spans
                    .par_iter()
                    .enumerate()
                    .map(|(i, (s, e))| {
                        let rec = &body[*s..*e];
                        let chart = Chart::from_json_slice(rec).map_err(|e| (i, peek_id(rec), e))?;
                        let mut doc = ChartDoc::create(&chart, &pool_meta);
                        let index = IndexFields {
                            mrn: chart.patient.mrn.clone(),
                            family: chart.patient.name.family.clone(),
                            given: chart.patient.name.given.join(" "),
                            birth_date: chart.patient.birth_date.clone(),
                        };
                        let due_facts = facts_json(&chart);
                        Ok((i, NewChart { id: chart.id, doc: doc.save(), index, origin: None, time_ms: pool_meta.time_ms, heads: doc.head_bytes(), referrals: doc.referral_ids(), due_facts }))
                    })
                    .collect::<Vec<Result<(usize, NewChart), (usize, Option<String>, ValidationError)>>>()
            })
            .await
        };
        let mut report = ImportReport::default();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        let mut to_insert = Vec::with_capacity(built.len());
        let mut positions = Vec::with_capacity(built.len());
        for r in built {
            match r {
                Ok((i, nc)) => {
                    if let Some(first) = first_seen.get(&nc.id) {
                        report.errors.push(RecordError {
                            index: i,
                            id: Some(nc.id.clone()),
                            field: "id".into(),
                            message: format!("duplicate id {:?}: an earlier record of this import has the same id", nc.id),
                            duplicate_of: Some(*first),
                        });
                        continue;
                    }
                    first_seen.insert(nc.id.clone(), i);
                    positions.push(i);
                    to_insert.push(nc);
                }
                Err((i, id, e)) => report.errors.push(RecordError {
                    index: i,
                    id,
                    field: e.field,
                    message: e.message,
                    duplicate_of: None,
                }),
            }
        }
        let ids: Vec<String> = to_insert.iter().map(|c| c.id.clone()).collect();
        let outcomes = if to_insert.is_empty() {
            Vec::new()
        } else {
            self.store
                .insert_charts(to_insert, author.to_string())?
                .await
                .map_err(|_| StoreError::Closed)??
        };
        let mut existing = Vec::new();
        for ((id, outcome), i) in ids.into_iter().zip(outcomes).zip(positions) {
            match outcome {
                InsertOutcome::Inserted => report.imported += 1,
                InsertOutcome::AlreadyExists => existing.push((i, id)),
            }
        }
        if !existing.is_empty() {
            // Already stored: unchanged if identical, otherwise refused (never overwritten).
            let store = self.store.clone();
            let compared = self
                .on_pool(move || {
                    use rayon::prelude::*;
                    existing
                        .into_par_iter()
                        .map(|(i, id)| {
                            let (s, e) = spans[i];
                            let same = same_as_stored(&store, &id, &body[s..e]);
                            (i, id, same)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
            for (i, id, same) in compared {
                match same? {
                    true => report.unchanged += 1,
                    false => report.errors.push(RecordError {
                        index: i,
                        id: Some(id.clone()),
                        field: "id".into(),
                        message: format!(
                            "a chart with id {id:?} is already in the store with different content; it was left as it is (edit it with `chartmesh note add` etc., or use a new id)"
                        ),
                        duplicate_of: None,
                    }),
                }
            }
        }
        report.failed = report.errors.len();
        report.errors.sort_by_key(|e| e.index);
        Ok(report)
    }

    /// Creates a chart from a (possibly partial) chart: missing id, type, schema version,
    /// practice, lists and timestamps are filled in.
    pub async fn create_chart(&self, mut partial: Value, author: &str) -> Result<Value, NodeError> {
        let obj = partial
            .as_object_mut()
            .ok_or_else(|| NodeError::Invalid("a chart must be a JSON object".into()))?;
        let now = crate::rfc3339(now_ms());
        obj.entry("id").or_insert_with(|| {
            Value::String(format!("chart-{}", hex::encode(rand::random::<[u8; 6]>())))
        });
        obj.entry("type").or_insert_with(|| "chart".into());
        obj.entry("schemaVersion").or_insert_with(|| 1.into());
        obj.entry("practiceId")
            .or_insert_with(|| self.practice_id().into());
        // The version 1 sections (encounters and procedures exist once they have entries).
        for list in &chartmesh_core::doc::RECORD_SECTIONS[..6] {
            obj.entry(*list).or_insert_with(|| Value::Array(vec![]));
        }
        obj.entry("createdAt").or_insert_with(|| now.clone().into());
        obj.entry("updatedAt").or_insert_with(|| now.into());
        let chart = Chart::from_json_slice(&serde_json::to_vec(&partial).expect("json"))?;
        let meta = self.meta(author, "create");
        let mut doc = ChartDoc::create(&chart, &meta);
        let json = chart.to_json_value();
        let nc = NewChart {
            id: chart.id.clone(),
            doc: doc.save(),
            index: IndexFields::from_chart_json(&json),
            origin: None,
            time_ms: meta.time_ms,
            heads: doc.head_bytes(),
            referrals: doc.referral_ids(),
            due_facts: facts_json(&chart),
        };
        let out = self
            .store
            .insert_charts(vec![nc], author.to_string())?
            .await
            .map_err(|_| StoreError::Closed)??;
        if out.first() == Some(&InsertOutcome::AlreadyExists) {
            return Err(NodeError::Conflict(format!(
                "a chart with id {:?} already exists",
                chart.id
            )));
        }
        Ok(json)
    }

    /// Reads one chart (audited).
    pub async fn read_chart(&self, id: &str, actor: &str) -> Result<Value, NodeError> {
        let key = id.to_string();
        let json = self
            .read(move |store| match store.get(&key)? {
                Some(rec) => Ok(rec.doc.to_json()?),
                None => Err(NodeError::NotFound(key)),
            })
            .await?;
        self.audit(vec![AuditEvent::new(now_ms(), actor, "read").chart(id)])
            .await?;
        Ok(json)
    }

    /// Where a chart came from and under what grant it is held (no chart content).
    pub fn custody(&self, id: &str) -> Result<Value, NodeError> {
        let held = self.store.sync_charts(&[id])?;
        let Some(c) = held.get(id) else {
            return Err(NodeError::NotFound(id.to_string()));
        };
        let now = now_ms();
        let status = match (&c.origin, c.revoked_ms, c.expires_ms) {
            (None, _, _) => "own",
            (Some(_), Some(_), _) => "revoked",
            (Some(_), None, Some(e)) if e <= now => "expired",
            (Some(_), None, _) => "shared-with-us",
        };
        Ok(serde_json::json!({
            "chart": id,
            "custodian": c.origin,
            "status": status,
            "access": c.access,
            "expiresMs": c.expires_ms,
            "revokedMs": c.revoked_ms,
        }))
    }

    pub async fn history(&self, id: &str, actor: &str) -> Result<Vec<HistoryEntry>, NodeError> {
        let key = id.to_string();
        let h = self
            .read(move |store| match store.get(&key)? {
                Some(mut rec) => Ok(rec.doc.history()),
                None => Err(NodeError::NotFound(key)),
            })
            .await?;
        self.audit(vec![
            AuditEvent::new(now_ms(), actor, "read")
                .chart(id)
                .detail("history"),
        ])
        .await?;
        Ok(h)
    }

    /// Searches the index. Audited with each chart the answer disclosed (not the query,
    /// which may itself be a patient's name).
    pub async fn search(
        &self,
        q: &str,
        limit: usize,
        actor: &str,
    ) -> Result<Vec<ChartSummary>, NodeError> {
        let query = q.to_string();
        let res = self
            .read(move |store| Ok(store.search(&query, limit)?))
            .await?;
        let mut audit = vec![
            AuditEvent::new(now_ms(), actor, "search").detail(format!("results={}", res.len())),
        ];
        audit.extend(crate::guard::disclosed(
            actor,
            "read",
            "listed in search results",
            res.iter().map(|c| c.id.as_str()),
        ));
        self.audit(audit).await?;
        Ok(res)
    }

    /// Writes a consistent, still encrypted copy of the store to `path` while the daemon runs.
    pub async fn backup(&self, path: std::path::PathBuf, actor: &str) -> Result<u64, NodeError> {
        if let Err(why) = crate::datadir::check_backup_target(&self.data_dir, &path) {
            self.audit(vec![
                AuditEvent::new(now_ms(), actor, "refuse").detail(format!("backup: {why}")),
            ])
            .await?;
            return Err(NodeError::Invalid(why));
        }
        // Recorded before the copy is taken, so the backup's own log shows it.
        self.audit(vec![AuditEvent::new(now_ms(), actor, "backup")])
            .await?;
        let store = self.store.clone();
        let dir = self.data_dir.clone();
        let written = path.clone();
        let bytes = tokio::task::spawn_blocking(move || store.backup_to(&written))
            .await
            .map_err(|_| StoreError::Closed)??;
        // Every backup is read back before it counts: pages, charts, audit chain. One that
        // does not verify is renamed aside (never mistaken for a good one) and reported.
        let checked = path.clone();
        let check = tokio::task::spawn_blocking(move || {
            crate::datadir::verify_backup(&dir, &checked).map(|c| (c, dir))
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        match check {
            Ok((_, dir)) => {
                let rec = crate::datadir::LastBackup {
                    time_ms: now_ms(),
                    path: path.display().to_string(),
                    bytes,
                };
                if let Err(e) = crate::datadir::record_backup(&dir, &rec) {
                    tracing::warn!(error = %e, "could not record the last backup");
                }
                Ok(bytes)
            }
            Err(e) => {
                let aside = path.with_extension("db.failed-verify");
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(error = %e, "a backup did not verify");
                Err(NodeError::Store(StoreError::Corrupt(format!(
                    "the backup was written but does not verify ({e}); it was renamed to {} — check the disk, then back up again",
                    aside.display()
                ))))
            }
        }
    }

    pub async fn audit(&self, events: Vec<AuditEvent>) -> Result<(), NodeError> {
        self.store
            .audit(events)?
            .await
            .map_err(|_| StoreError::Closed)??;
        Ok(())
    }

    /// Appends an entry to a chart section. `entry` may leave out what can be defaulted
    /// (a note's id, date and author; an observation's date; a medication's status).
    pub async fn append(
        &self,
        id: &str,
        section: &str,
        mut entry: Value,
        author: &str,
        override_reason: Option<&str>,
    ) -> Result<Value, NodeError> {
        let obj = entry
            .as_object_mut()
            .ok_or_else(|| NodeError::Invalid("the entry must be a JSON object".into()))?;
        let now = now_ms();
        let today = crate::rfc3339(now)[..10].to_string();
        let parse = |section: &str, v: Value| -> Result<Entry, NodeError> {
            let bad = |e: serde_json::Error| NodeError::Invalid(format!("{section}: {e}"));
            Ok(match section {
                "notes" => Entry::Note(serde_json::from_value::<Note>(v).map_err(bad)?),
                "medications" => {
                    Entry::Medication(serde_json::from_value::<Medication>(v).map_err(bad)?)
                }
                "allergies" => Entry::Allergy(serde_json::from_value::<Allergy>(v).map_err(bad)?),
                "observations" => {
                    Entry::Observation(serde_json::from_value::<Observation>(v).map_err(bad)?)
                }
                "conditions" => {
                    Entry::Condition(serde_json::from_value::<Condition>(v).map_err(bad)?)
                }
                "immunizations" => {
                    Entry::Immunization(serde_json::from_value::<Immunization>(v).map_err(bad)?)
                }
                "encounters" => Entry::Encounter(serde_json::from_value(v).map_err(bad)?),
                "procedures" => Entry::Procedure(serde_json::from_value(v).map_err(bad)?),
                other => {
                    return Err(NodeError::Invalid(format!(
                        "unknown section {other:?}: use notes, medications, allergies, observations, conditions, immunizations, encounters or procedures"
                    )));
                }
            })
        };
        match section {
            "notes" => {
                obj.entry("id").or_insert_with(|| {
                    format!("{id}-n{}", hex::encode(rand::random::<[u8; 4]>())).into()
                });
                obj.entry("author").or_insert_with(|| author.into());
                obj.entry("date")
                    .or_insert_with(|| crate::rfc3339(now).into());
            }
            "observations" => {
                obj.entry("date")
                    .or_insert_with(|| crate::rfc3339(now).into());
                obj.entry("system").or_insert_with(|| "LOINC".into());
            }
            "medications" => {
                obj.entry("status").or_insert_with(|| "active".into());
                obj.entry("start").or_insert_with(|| today.clone().into());
            }
            "allergies" => {
                obj.entry("recorded")
                    .or_insert_with(|| today.clone().into());
            }
            _ => {}
        }
        let e = parse(section, entry)?;
        e.validate(section)?;
        self.check_writable(id, author).await?;
        let meta = self.meta(author, &format!("add {}", singular(section)));
        let mut audit = vec![
            AuditEvent::new(meta.time_ms, author, "update")
                .chart(id)
                .detail(format!("section={section}")),
        ];
        // Decision support: a medication is checked against the chart's allergies and active
        // medications; with alerts it is added only with an override reason, and the
        // acknowledgement is recorded in the chart as a note (it travels with the chart).
        let mut ack = None;
        if let Entry::Medication(m) = &e {
            let key = id.to_string();
            let chart = self
                .read(move |store| match store.get(&key)? {
                    Some(rec) => Ok(rec.doc.to_chart()?),
                    None => Err(NodeError::NotFound(key)),
                })
                .await?;
            let alerts = chartmesh_core::alerts::check_new_medication(&chart, m);
            if !alerts.is_empty() {
                let reason = override_reason.map(str::trim).filter(|r| !r.is_empty());
                let Some(reason) = reason else {
                    self.audit(vec![
                        AuditEvent::new(meta.time_ms, author, "refuse")
                            .chart(id)
                            .detail(format!("medication not added: {} alert(s)", alerts.len())),
                    ])
                    .await?;
                    return Err(NodeError::Alerts(alerts));
                };
                let text = alerts
                    .iter()
                    .map(|a| format!("[{:?}] {}", a.severity, a.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                ack = Some(Entry::Note(Note {
                    id: format!("{id}-ack{}", hex::encode(rand::random::<[u8; 4]>())),
                    author: author.to_string(),
                    date: crate::rfc3339(now),
                    text: format!(
                        "Medication alert acknowledged when adding {}: {text}. Override reason: {reason}",
                        m.name
                    ),
                    ..Default::default()
                }));
                audit.push(
                    AuditEvent::new(meta.time_ms, author, "alert-override")
                        .chart(id)
                        .detail(format!("{} alert(s) overridden", alerts.len())),
                );
            }
        }
        let added = e.to_json();
        let unchecked_before_write = override_reason.is_none();
        let out = self
            .store
            .edit(
                id.to_string(),
                Box::new(move |doc| {
                    // Checked again against the chart as the writer holds it: another
                    // medication added meanwhile (here or by sync) must not slip past.
                    if let Entry::Medication(m) = &e
                        && unchecked_before_write
                        && !chartmesh_core::alerts::check_new_medication(&doc.to_chart()?, m)
                            .is_empty()
                    {
                        return Err(CoreError::NotAllowed(
                            "medication not added: the chart changed while it was being added (another medication arrived) and it now raises alerts; run the command again to see them, and give --override REASON to add it anyway".into(),
                        ));
                    }
                    doc.append(&e, &meta)?;
                    if let Some(n) = &ack {
                        doc.append(n, &meta)?;
                    }
                    Ok(())
                }),
                audit,
            )?
            .await
            .map_err(|_| StoreError::Closed)?;
        match out {
            Ok(_) => Ok(added),
            Err(StoreError::NotFound(id)) => Err(NodeError::NotFound(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Due and overdue items of every own and held chart as of `today`, looking `within_days`
    /// ahead, with population counts (charts by active condition, patients by due rule).
    /// Charts are read and evaluated on all cores. Audited as one read.
    pub async fn due(
        &self,
        today: time::Date,
        within_days: u32,
        list_patients: bool,
        actor: &str,
    ) -> Result<DueReport, NodeError> {
        use chartmesh_core::due;
        let store = self.store.clone();
        let horizon = today + time::Duration::days(within_days as i64);
        let t0 = std::time::Instant::now();
        let results = self
            .on_pool(move || -> Result<Vec<DueRow>, NodeError> {
                use rayon::prelude::*;
                // The facts kept beside each chart; a chart without them (written before
                // they existed, or unreadable as records) is read from its document.
                let rows = store.due_facts()?;
                rows.par_chunks(256)
                    .map(|chunk| {
                        let mut out = Vec::with_capacity(chunk.len());
                        for (id, facts) in chunk {
                            let from_facts = facts
                                .as_deref()
                                .and_then(|f| serde_json::from_str::<Chart>(f).ok());
                            let chart = match from_facts {
                                Some(c) => c,
                                None => {
                                    let Some(rec) = store.get(id)? else { continue };
                                    if !consent::serves_as_current(rec.revoked_ms) {
                                        continue;
                                    }
                                    rec.doc.due_view()?
                                }
                            };
                            let items = due::due_items(&chart, today, horizon);
                            // Each patient counted once per condition, however often it is listed.
                            let mut conditions: Vec<String> = chart
                                .conditions
                                .iter()
                                .filter(|c| c.is_active())
                                .map(|c| {
                                    format!("{} {}", c.code, c.display.clone().unwrap_or_default())
                                })
                                .collect();
                            conditions.sort();
                            conditions.dedup();
                            let name = format!(
                                "{}, {}",
                                chart.patient.name.family,
                                chart.patient.name.given.join(" ")
                            );
                            out.push((id.clone(), name, items, conditions));
                        }
                        Ok(out)
                    })
                    .collect::<Result<Vec<_>, NodeError>>()
                    .map(|v| v.into_iter().flatten().collect())
            })
            .await?;
        let t_eval = t0.elapsed();
        let mut by_rule: std::collections::BTreeMap<&str, (usize, usize)> =
            due::RULES.iter().map(|r| (r.id, (0, 0))).collect();
        let mut by_condition: std::collections::BTreeMap<String, usize> = Default::default();
        let mut patients = Vec::new();
        let charts = results.len();
        for (id, name, items, conditions) in results {
            for c in conditions {
                *by_condition.entry(c).or_default() += 1;
            }
            for i in &items {
                let e = by_rule.entry(i.rule).or_default();
                e.0 += 1;
                if i.overdue {
                    e.1 += 1;
                }
            }
            if !items.is_empty() && list_patients {
                patients.push(DuePatient {
                    chart: id,
                    patient: name,
                    items,
                });
            }
        }
        // The counts disclose no one; each patient listed is audited by chart.
        let mut audit = vec![AuditEvent::new(now_ms(), actor, "read").detail(format!(
            "due list charts={charts} patients listed={}",
            patients.len()
        ))];
        audit.extend(crate::guard::disclosed(
            actor,
            "read",
            "listed in the due list",
            patients.iter().map(|p| p.chart.as_str()),
        ));
        self.audit(audit).await?;
        let rules = due::RULES
            .iter()
            .map(|r| {
                let (due, overdue) = by_rule[r.id];
                DueRule {
                    rule: r.id,
                    title: r.title,
                    due,
                    overdue,
                }
            })
            .collect();
        tracing::debug!(
            charts,
            eval_ms = t_eval.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "due list"
        );
        // Serialised straight from these structs: no JSON value tree for thousands of patients.
        Ok(DueReport {
            today: today.to_string(),
            within_days,
            charts,
            rules,
            conditions: by_condition,
            patients,
        })
    }

    /// Standing alerts: every active medication against the allergies and the other active
    /// medications, for one chart or for all. Audited as a read.
    pub fn alerts(&self, chart: Option<&str>, actor: &str) -> Result<Vec<Value>, NodeError> {
        let ids: Option<Vec<String>> = chart.map(|c| vec![c.to_string()]);
        let mut out = Vec::new();
        let mut seen = 0usize;
        self.store.for_each_chart(ids.as_deref(), &mut |rec| {
            seen += 1;
            let chart = rec.doc.to_chart()?;
            let alerts = chartmesh_core::alerts::chart_alerts(&chart);
            if !alerts.is_empty() {
                out.push(serde_json::json!({
                    "chart": rec.id,
                    "patient": format!("{}, {}", chart.patient.name.family, chart.patient.name.given.join(" ")),
                    "alerts": alerts,
                }));
            }
            Ok(())
        })?;
        if let Some(c) = chart
            && seen == 0
        {
            return Err(NodeError::NotFound(c.to_string()));
        }
        let mut ev =
            AuditEvent::new(now_ms(), actor, "read").detail(format!("alerts charts={seen}"));
        if let Some(c) = chart {
            ev = ev.chart(c);
        }
        let mut events = vec![ev];
        if chart.is_none() {
            // Every patient listed with alerts is disclosed: audited by chart.
            events.extend(crate::guard::disclosed(
                actor,
                "read",
                "listed with medication alerts",
                out.iter().filter_map(|c| c["chart"].as_str()),
            ));
        }
        match self.store.audit(events) {
            Ok(rx) => {
                if let Ok(Err(e)) = rx.blocking_recv() {
                    return Err(e.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// A chart received from another practice may be changed here only under a read-write
    /// grant that is still active; the refusal is audited.
    pub(crate) async fn check_writable(&self, id: &str, author: &str) -> Result<(), NodeError> {
        let key = id.to_string();
        let held = self
            .read(move |store| Ok(store.sync_charts(&[key.as_str()])?))
            .await?;
        let Some(c) = held.get(id) else {
            return Err(NodeError::NotFound(id.to_string()));
        };
        let Some(held) = c.held() else {
            return Ok(());
        };
        let origin = held.custodian.to_string();
        let now = now_ms();
        let why = match consent::may_edit_held(&held, now) {
            Ok(()) => None,
            Err(consent::Refusal::Revoked) => {
                Some("its custodian stopped sharing it; the copy here is read-only")
            }
            Err(consent::Refusal::Expired) => {
                Some("the grant it was shared under has expired; the copy here is read-only")
            }
            Err(_) => Some("it was shared with this practice for reading only"),
        };
        match why {
            None => Ok(()),
            Some(why) => {
                self.audit(vec![
                    AuditEvent::new(now, author, "refuse")
                        .chart(id)
                        .peer(origin.clone())
                        .detail(format!("change refused: {why}")),
                ])
                .await?;
                Err(NodeError::Refused(format!(
                    "chart {id} cannot be changed here: {why} (custodian: practice {origin})"
                )))
            }
        }
    }

    /// Streams charts as JSONL lines into `sink` (one chart in memory at a time). Audited
    /// before the first line leaves: one durable entry naming every chart to export (an
    /// export the audit cannot record does not start; one cut short by the reader is
    /// recorded whole). With `fhir`, each line is `{"chartId": ..., "bundle": <FHIR R4 Bundle>}`.
    pub fn export_jsonl(
        &self,
        ids: Option<&[String]>,
        actor: &str,
        fhir: bool,
        sink: &mut dyn FnMut(String) -> bool,
    ) -> Result<usize, NodeError> {
        let keys: Vec<String> = match ids {
            Some(ids) => {
                for id in ids {
                    if self.store.chart_origin(id)?.is_none() {
                        return Err(NodeError::NotFound(id.clone()));
                    }
                }
                ids.to_vec()
            }
            None => self.store.chart_ids()?,
        };
        if keys.is_empty() {
            return Ok(0);
        }
        let detail = if fhir { "format=fhir" } else { "format=jsonl" };
        let event = match keys.as_slice() {
            [one] => AuditEvent::new(now_ms(), actor, "export").chart(one),
            many => {
                AuditEvent::new(now_ms(), actor, "export").charts(many.iter().map(String::as_str))
            }
        };
        // Runs on a blocking thread: wait until the export is durably audited.
        self.store
            .audit(vec![event.detail(detail)])?
            .blocking_recv()
            .map_err(|_| StoreError::Closed)??;
        let mut n = 0;
        for key in &keys {
            let Some(mut rec) = self.store.get(key)? else {
                // Named by the user: an error; listed a moment ago and gone since (an
                // expired emergency copy): skipped.
                if ids.is_some() {
                    return Err(NodeError::NotFound(key.clone()));
                }
                continue;
            };
            let mut line = if fhir {
                let chart = rec.doc.to_chart().map_err(|e| {
                    StoreError::Corrupt(format!("chart {} does not read as a chart: {e}", rec.id))
                })?;
                let history = rec.doc.history();
                let bundle = chartmesh_core::fhir::chart_to_bundle(&chart, &history);
                // Decimals as recorded (fhir::json writes them).
                chartmesh_core::fhir::json::to_string(
                    &serde_json::json!({ "chartId": rec.id, "bundle": bundle }),
                )
            } else {
                canonical::to_canonical(&rec.doc.to_json()?)
            };
            line.push('\n');
            n += 1;
            if !sink(line) {
                break;
            }
        }
        Ok(n)
    }
}

/// The most skipped or failed resources listed one by one in an import's report; the rest
/// are counted (`resourcesOmitted`) and every one is in the per-type summary.
pub const MAX_REPORTED_RESOURCES: usize = 1000;

/// The account of a FHIR import: what became of every chart and every resource.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FhirImportReport {
    /// New charts created.
    pub created: usize,
    /// Stored charts that gained entries from this input.
    pub updated: usize,
    /// Stored charts that already held everything in this input.
    pub unchanged: usize,
    /// Patients not merged with a stored chart they may be: each got a chart of its own and
    /// is listed for review (`GET /api/v1/import/review`).
    pub review: Vec<ReviewItem>,
    /// What became of each patient of the input, in order.
    pub patients: Vec<PatientOutcome>,
    /// Charts that could not be stored, with the reason.
    pub chart_errors: Vec<Value>,
    /// Per resource type: mapped, skipped, errors.
    pub summary: std::collections::BTreeMap<String, chartmesh_core::fhir::TypeCounts>,
    /// Every resource that was skipped or in error (the first [`MAX_REPORTED_RESOURCES`]),
    /// with its place in the input and the reason.
    pub resources: Vec<chartmesh_core::fhir::ResourceReport>,
    /// How many more skipped or failed resources there were than are listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub resources_omitted: usize,
    /// Set when the input as a whole could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fatal: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One patient of an import and the chart it went to.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PatientOutcome {
    /// The Patient's id in the input, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub chart: String,
    /// created, updated, unchanged, review (a new chart, held for review) or error.
    pub outcome: &'static str,
}

/// A patient held for review: imported into a chart of its own, not merged, because it may be
/// the same person as `candidates` without agreeing on identity evidence.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewItem {
    pub chart: String,
    pub candidates: Vec<String>,
    pub reason: String,
    pub detected_ms: i64,
    pub by: String,
}

/// Where the review list is kept (store metadata, a JSON list).
const REVIEW_KEY: &str = "fhir-import-review";
/// Serializes read-modify-write of the review list.
static REVIEW_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Node {
    /// Imports FHIR R4: a Bundle, a single resource, or NDJSON. Patients become charts or are
    /// matched to this practice's own charts by [`chartmesh_core::fhir::matching`] (never
    /// merged without agreeing identity evidence; held for review otherwise); a resource
    /// whose patient is not in the input is added to the stored chart its subject names. A
    /// matched chart gains only what it does not already hold, so importing the same input
    /// twice changes nothing. `context`: how many leading resources are context only
    /// ([`chartmesh_core::fhir::import_with_context`]).
    pub async fn import_fhir(
        self: &Arc<Self>,
        body: bytes::Bytes,
        author: &str,
        context: usize,
    ) -> Result<FhirImportReport, NodeError> {
        let now = crate::rfc3339(now_ms());
        let mut parsed = self
            .on_pool(move || chartmesh_core::fhir::import_with_context(&body, &now, context))
            .await;
        let meta = self.meta(author, "import");
        // Matching reads the store (and whole charts): done off the async workers, in one go.
        let charts = std::mem::take(&mut parsed.charts);
        let sources = std::mem::take(&mut parsed.sources);
        let orphans = std::mem::take(&mut parsed.orphans);
        let (plans, orphan_plans) = self
            .read(move |store| {
                let mut taken = std::collections::HashSet::new();
                let plans = charts
                    .into_iter()
                    .zip(sources)
                    .map(|(c, s)| plan_fhir_chart(store, c, &s, &mut taken))
                    .collect::<Result<Vec<_>, NodeError>>()?;
                let orphans = plan_orphans(store, orphans)?;
                Ok((plans, orphans))
            })
            .await?;
        let mut report = FhirImportReport {
            fatal: parsed.fatal.clone(),
            ..Default::default()
        };
        // Entries for stored charts, by chart: from matched patients and from orphans.
        let mut additions: Vec<Addition> = Vec::new();
        let mut to_insert = Vec::new();
        let mut new_review = Vec::new();
        for plan in plans {
            match plan {
                FhirPlan::Invalid {
                    chart,
                    source,
                    error,
                } => {
                    report.patients.push(PatientOutcome {
                        source,
                        chart: chart.clone(),
                        outcome: "error",
                    });
                    report
                        .chart_errors
                        .push(serde_json::json!({ "chart": chart, "error": error }));
                }
                FhirPlan::Unchanged { id, source } => {
                    report.unchanged += 1;
                    report.patients.push(PatientOutcome {
                        source,
                        chart: id,
                        outcome: "unchanged",
                    });
                }
                FhirPlan::New {
                    chart,
                    source,
                    review,
                } => {
                    report.patients.push(PatientOutcome {
                        source,
                        chart: chart.id.clone(),
                        outcome: if review.is_some() {
                            "review"
                        } else {
                            "created"
                        },
                    });
                    if let Some((candidates, reason)) = review {
                        new_review.push(ReviewItem {
                            chart: chart.id.clone(),
                            candidates,
                            reason,
                            detected_ms: meta.time_ms,
                            by: author.to_string(),
                        });
                    }
                    let mut doc = ChartDoc::create(&chart, &meta);
                    to_insert.push(NewChart {
                        id: chart.id.clone(),
                        doc: doc.save(),
                        index: IndexFields {
                            mrn: chart.patient.mrn.clone(),
                            family: chart.patient.name.family.clone(),
                            given: chart.patient.name.given.join(" "),
                            birth_date: chart.patient.birth_date.clone(),
                        },
                        origin: None,
                        time_ms: meta.time_ms,
                        heads: doc.head_bytes(),
                        referrals: doc.referral_ids(),
                        due_facts: facts_json(&chart),
                    });
                }
                FhirPlan::Add {
                    id,
                    source,
                    missing,
                    patient,
                    version,
                } => {
                    report.patients.push(PatientOutcome {
                        source,
                        chart: id.clone(),
                        outcome: "updated",
                    });
                    additions.push((id, missing, patient, version));
                }
            }
        }
        for o in orphan_plans {
            match o {
                Ok((id, entries, _)) if entries.is_empty() => {
                    let _ = id;
                }
                Ok((id, entries, _)) => match additions.iter_mut().find(|a| a.0 == id) {
                    Some(a) => {
                        for e in entries {
                            if !a.1.contains(&e) {
                                a.1.push(e);
                            }
                        }
                    }
                    None => additions.push((id, entries, Vec::new(), 1)),
                },
                Err((report_at, reason)) => {
                    if let Some(r) = parsed.resources.get_mut(report_at) {
                        r.outcome = chartmesh_core::fhir::Outcome::Error;
                        r.reason = Some(reason);
                    }
                }
            }
        }
        // Every write is queued first and awaited after, so they share commits.
        let mut pending = Vec::new();
        for (id, missing, patient, version) in additions {
            let n = missing.len();
            let m = meta.clone();
            let audit = vec![
                AuditEvent::new(meta.time_ms, author, "update")
                    .chart(&id)
                    .detail(format!(
                        "fhir-import entries={n} patient-fields={}",
                        patient.len()
                    )),
            ];
            let rx = self.store.edit(
                id.clone(),
                Box::new(move |doc| {
                    if !patient.is_empty() {
                        let fields: Vec<(&str, Option<Value>)> =
                            patient.iter().map(|(k, v)| (*k, v.clone())).collect();
                        doc.set_patient_fields(&fields, version, &m)?;
                    }
                    if !missing.is_empty() {
                        doc.append_all(&missing, &m)?;
                    }
                    Ok(())
                }),
                audit,
            )?;
            pending.push((id, rx));
        }
        let inserted = if to_insert.is_empty() {
            None
        } else {
            let ids: Vec<String> = to_insert.iter().map(|c| c.id.clone()).collect();
            Some((
                ids,
                self.store.insert_charts(to_insert, author.to_string())?,
            ))
        };
        for (id, rx) in pending {
            match rx.await.map_err(|_| StoreError::Closed)? {
                Ok(_) => {
                    // A patient matched, or a chart named by a lone resource.
                    if !report
                        .patients
                        .iter()
                        .any(|p| p.chart == id && p.outcome == "updated")
                    {
                        report.patients.push(PatientOutcome {
                            source: None,
                            chart: id.clone(),
                            outcome: "updated",
                        });
                    }
                    report.updated += 1;
                }
                Err(e) => report
                    .chart_errors
                    .push(serde_json::json!({ "chart": id, "error": e.to_string() })),
            }
        }
        if let Some((ids, rx)) = inserted {
            let outcomes = rx.await.map_err(|_| StoreError::Closed)??;
            for (id, o) in ids.into_iter().zip(outcomes) {
                match o {
                    InsertOutcome::Inserted => report.created += 1,
                    InsertOutcome::AlreadyExists => {
                        new_review.retain(|r| r.chart != id);
                        report.chart_errors.push(serde_json::json!({
                            "chart": id,
                            "error": "a chart with this id appeared during the import; import the file again to add to it"
                        }))
                    }
                }
            }
        }
        if !new_review.is_empty() {
            self.add_review(&new_review, author).await?;
            report.review = new_review;
        }
        report.summary = parsed.summary();
        let mut listed: Vec<_> = parsed
            .resources
            .into_iter()
            .filter(|r| r.outcome != chartmesh_core::fhir::Outcome::Mapped)
            .collect();
        if listed.len() > MAX_REPORTED_RESOURCES {
            report.resources_omitted = listed.len() - MAX_REPORTED_RESOURCES;
            listed.truncate(MAX_REPORTED_RESOURCES);
        }
        report.resources = listed;
        Ok(report)
    }

    /// The patients held for review by FHIR imports (audited as a read).
    pub async fn import_review(&self, actor: &str) -> Result<Vec<ReviewItem>, NodeError> {
        let list = self.read(read_review).await?;
        self.audit(vec![
            AuditEvent::new(now_ms(), actor, "read")
                .detail(format!("import review items={}", list.len())),
        ])
        .await?;
        Ok(list)
    }

    async fn add_review(&self, items: &[ReviewItem], actor: &str) -> Result<(), NodeError> {
        let _guard = REVIEW_LOCK.lock().await;
        let mut list = self.read(read_review).await?;
        list.extend(items.iter().cloned());
        let value = serde_json::to_string(&list).expect("review list serializes");
        self.store
            .put_meta(REVIEW_KEY, &value)?
            .await
            .map_err(|_| StoreError::Closed)??;
        let events = items
            .iter()
            .map(|i| {
                AuditEvent::new(i.detected_ms, actor, "import-review")
                    .chart(&i.chart)
                    .detail(format!(
                        "held for review: may be {}",
                        i.candidates.join(", ")
                    ))
            })
            .collect();
        self.audit(events).await
    }
}

fn read_review(store: &Store) -> Result<Vec<ReviewItem>, NodeError> {
    Ok(match store.get_meta(REVIEW_KEY)? {
        Some(s) => serde_json::from_str(&s).unwrap_or_default(),
        None => Vec::new(),
    })
}

/// Additions to a stored chart: (chart, entries, patient fields, schema version they need).
type Addition = (String, Vec<Entry>, Vec<(&'static str, Option<Value>)>, u32);

/// One chart's due evaluation: (chart id, patient name, due items, active conditions).
type DueRow = (
    String,
    String,
    Vec<chartmesh_core::due::DueItem>,
    Vec<String>,
);

/// What a FHIR import does with one patient it parsed.
enum FhirPlan {
    Invalid {
        chart: String,
        source: Option<String>,
        error: String,
    },
    /// A new chart; with `review`, held for review (candidates, reason).
    New {
        chart: Box<Chart>,
        source: Option<String>,
        review: Option<(Vec<String>, String)>,
    },
    /// A stored chart (the same patient) gains these entries and patient fields.
    Add {
        id: String,
        source: Option<String>,
        missing: Vec<Entry>,
        patient: Vec<(&'static str, Option<Value>)>,
        version: u32,
    },
    Unchanged {
        id: String,
        source: Option<String>,
    },
}

/// This practice's own chart `id` (never a copy received from another practice), read whole.
fn own_chart(store: &Store, id: &str) -> Result<Option<Chart>, NodeError> {
    match store.get(id)? {
        Some(rec) if rec.origin.is_none() => Ok(Some(rec.doc.to_chart()?)),
        _ => Ok(None),
    }
}

/// This practice's own charts whose MRN is one of the patient's identifier values.
fn identifier_candidates(
    store: &Store,
    p: &chartmesh_core::chart::Patient,
) -> Result<Vec<(String, chartmesh_core::chart::Patient)>, NodeError> {
    let mut out: Vec<(String, chartmesh_core::chart::Patient)> = Vec::new();
    for (_, value) in p.all_identifiers() {
        for h in store.search(value, 50)? {
            if h.mrn == value
                && h.origin.is_none()
                && !out.iter().any(|(id, _)| *id == h.id)
                && let Some(c) = own_chart(store, &h.id)?
            {
                out.push((h.id, c.patient));
            }
        }
    }
    Ok(out)
}

fn plan_fhir_chart(
    store: &Store,
    mut chart: Chart,
    source: &chartmesh_core::fhir::PatientSource,
    taken: &mut std::collections::HashSet<String>,
) -> Result<FhirPlan, NodeError> {
    use chartmesh_core::fhir::matching::{self, Decision};
    let src = source.resource_id.as_ref().map(|i| format!("Patient/{i}"));
    if let Err(e) = chart.validate() {
        return Ok(FhirPlan::Invalid {
            chart: chart.id,
            source: src,
            error: e.to_string(),
        });
    }
    let mut candidates = identifier_candidates(store, &chart.patient)?;
    // A chart this import made before from the same patient (its id comes from the input):
    // the same identity evidence is the same chart, so an import done twice changes nothing.
    let base = chart.id.clone();
    let mut decision = None;
    if !source.chartmesh_id {
        for n in 1..10 {
            let id = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if let Some(c) = own_chart(store, &id)?
                && matching::same_evidence(&c.patient, &chart.patient)
            {
                decision = Some(Decision::Same(id));
                break;
            }
        }
    } else if !candidates.iter().any(|(id, _)| *id == chart.id)
        && let Some(c) = own_chart(store, &chart.id)?
    {
        candidates.push((chart.id.clone(), c.patient));
    }
    let decision = decision.unwrap_or_else(|| {
        matching::decide(
            &chart.patient,
            source.chartmesh_id.then_some(chart.id.as_str()),
            &candidates,
        )
    });
    match decision {
        Decision::Same(id) => {
            let stored = own_chart(store, &id)?.ok_or_else(|| NodeError::NotFound(id.clone()))?;
            let missing = missing_entries(&stored, &chart);
            let patient = matching::patient_updates(&stored.patient, &chart.patient);
            if missing.is_empty() && patient.is_empty() {
                return Ok(FhirPlan::Unchanged { id, source: src });
            }
            let v2 = |(k, v): &(&str, Option<Value>)| {
                matches!(
                    *k,
                    "mrnSystem"
                        | "identifiers"
                        | "deceased"
                        | "deceasedDate"
                        | "telecom"
                        | "language"
                ) || (*k == "address" && v.as_ref().is_some_and(|a| !a["state"].is_null()))
            };
            let version = if patient.iter().any(v2) { 2 } else { 1 };
            Ok(FhirPlan::Add {
                id,
                source: src,
                missing,
                patient,
                version,
            })
        }
        d => {
            // A new chart, under an id no chart here has.
            let mut id = base.clone();
            let mut n = 1;
            while taken.contains(&id) || store.get(&id)?.is_some() {
                n += 1;
                id = format!("{base}-{n}");
            }
            taken.insert(id.clone());
            if id != chart.id {
                for note in &mut chart.notes {
                    if let Some(rest) = note.id.strip_prefix(&format!("{}-", chart.id)) {
                        note.id = format!("{id}-{rest}");
                    }
                }
                chart.id = id;
            }
            let review = match d {
                Decision::Review { candidates, reason } => Some((candidates, reason)),
                _ => None,
            };
            Ok(FhirPlan::New {
                chart: Box::new(chart),
                source: src,
                review,
            })
        }
    }
}

/// Resolves each resource whose patient was not in the input to one of this practice's own
/// charts: `Ok((chart, entries it lacks, report))`, or `Err((report, why not))`.
#[allow(clippy::type_complexity)]
fn plan_orphans(
    store: &Store,
    orphans: Vec<chartmesh_core::fhir::Orphan>,
) -> Result<Vec<Result<(String, Vec<Entry>, usize), (usize, String)>>, NodeError> {
    use chartmesh_core::fhir::PatientRef;
    let mut cache: HashMap<String, Option<Chart>> = HashMap::new();
    let mut out = Vec::with_capacity(orphans.len());
    for o in orphans {
        let found: Result<String, String> = match &o.target {
            PatientRef::Reference(r) => {
                let id = r.strip_prefix("Patient/").unwrap_or(r);
                let candidates = [id.to_string(), format!("fhir-{id}")];
                let mut hit = None;
                for c in candidates {
                    if store.chart_origin(&c)?.is_some_and(|o| o.is_none()) {
                        hit = Some(c);
                        break;
                    }
                }
                hit.ok_or_else(|| {
                    format!("refers to {r}, which is neither in this input nor a chart of this practice; import the Patient first")
                })
            }
            PatientRef::Identifier { system, value } => {
                let probe = chartmesh_core::chart::Patient {
                    mrn: value.clone(),
                    mrn_system: system.clone(),
                    ..Default::default()
                };
                let hits: Vec<String> = identifier_candidates(store, &probe)?
                    .into_iter()
                    .filter(|(_, p)| {
                        p.all_identifiers().any(|(s, v)| {
                            v == value
                                && (s == system.as_deref() || (system.is_none() && s.is_none()))
                        })
                    })
                    .map(|(id, _)| id)
                    .collect();
                match hits.len() {
                    1 => Ok(hits[0].clone()),
                    0 => Err(format!(
                        "refers to the patient with identifier {}|{value}, and no chart of this practice has it",
                        system.as_deref().unwrap_or("")
                    )),
                    n => Err(format!(
                        "refers to the patient with identifier {}|{value}, which {n} charts have; it was not filed",
                        system.as_deref().unwrap_or("")
                    )),
                }
            }
        };
        match found {
            Err(why) => out.push(Err((o.report, why))),
            Ok(id) => {
                if !cache.contains_key(&id) {
                    cache.insert(id.clone(), own_chart(store, &id)?);
                }
                let Some(stored) = cache.get(&id).cloned().flatten() else {
                    out.push(Err((o.report, format!("chart {id} could not be read"))));
                    continue;
                };
                let entries: Vec<Entry> = o
                    .entries
                    .into_iter()
                    .map(|e| match e {
                        Entry::Note(mut n) => {
                            if let Some(rest) = n.id.strip_prefix("orphan-") {
                                n.id = format!("{id}-{rest}");
                            }
                            Entry::Note(n)
                        }
                        e => e,
                    })
                    .collect();
                let mut incoming = stored.clone();
                incoming.conditions.clear();
                incoming.allergies.clear();
                incoming.medications.clear();
                incoming.observations.clear();
                incoming.notes.clear();
                incoming.immunizations.clear();
                incoming.encounters.clear();
                incoming.procedures.clear();
                for e in entries {
                    match e {
                        Entry::Condition(x) => incoming.conditions.push(x),
                        Entry::Allergy(x) => incoming.allergies.push(x),
                        Entry::Medication(x) => incoming.medications.push(x),
                        Entry::Observation(x) => incoming.observations.push(x),
                        Entry::Note(x) => incoming.notes.push(x),
                        Entry::Immunization(x) => incoming.immunizations.push(x),
                        Entry::Encounter(x) => incoming.encounters.push(x),
                        Entry::Procedure(x) => incoming.procedures.push(x),
                    }
                }
                out.push(Ok((id, missing_entries(&stored, &incoming), o.report)));
            }
        }
    }
    Ok(out)
}

/// Entries of `incoming` that `stored` does not hold yet, section by section. Counted: an
/// entry the input holds twice is missing once when the chart holds it once.
fn missing_entries(stored: &Chart, incoming: &Chart) -> Vec<Entry> {
    fn add<T: Serialize + Clone>(
        have: &[T],
        new: &[T],
        wrap: fn(T) -> Entry,
        out: &mut Vec<Entry>,
    ) {
        let key = |x: &T| serde_json::to_string(x).expect("entries serialize");
        let mut count: HashMap<String, usize> = HashMap::new();
        for x in have {
            *count.entry(key(x)).or_default() += 1;
        }
        for x in new {
            match count.get_mut(&key(x)) {
                Some(n) if *n > 0 => *n -= 1,
                _ => out.push(wrap(x.clone())),
            }
        }
    }
    let mut out = Vec::new();
    add(
        &stored.conditions,
        &incoming.conditions,
        Entry::Condition,
        &mut out,
    );
    add(
        &stored.allergies,
        &incoming.allergies,
        Entry::Allergy,
        &mut out,
    );
    add(
        &stored.medications,
        &incoming.medications,
        Entry::Medication,
        &mut out,
    );
    add(
        &stored.observations,
        &incoming.observations,
        Entry::Observation,
        &mut out,
    );
    add(&stored.notes, &incoming.notes, Entry::Note, &mut out);
    add(
        &stored.immunizations,
        &incoming.immunizations,
        Entry::Immunization,
        &mut out,
    );
    add(
        &stored.encounters,
        &incoming.encounters,
        Entry::Encounter,
        &mut out,
    );
    add(
        &stored.procedures,
        &incoming.procedures,
        Entry::Procedure,
        &mut out,
    );
    out
}

/// The due list and population counts (`GET /api/v1/due`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DueReport {
    pub today: String,
    pub within_days: u32,
    pub charts: usize,
    pub rules: Vec<DueRule>,
    /// "CODE display" → patients with it active.
    pub conditions: std::collections::BTreeMap<String, usize>,
    pub patients: Vec<DuePatient>,
}

#[derive(Debug, Serialize)]
pub struct DueRule {
    pub rule: &'static str,
    pub title: &'static str,
    pub due: usize,
    pub overdue: usize,
}

#[derive(Debug, Serialize)]
pub struct DuePatient {
    pub chart: String,
    pub patient: String,
    pub items: Vec<chartmesh_core::due::DueItem>,
}

/// What to share or revoke: listed charts, or every chart (a type of the local API).
pub use chartmesh_api::ShareRequest;

pub(crate) fn parse_peer(s: &str) -> Result<PracticeId, NodeError> {
    s.parse()
        .map_err(|e: ValidationError| NodeError::Invalid(e.message))
}

impl Node {
    /// The paired practice `reference` names: its id (plain or checked form, dashes, spaces
    /// and case ignored), its name, or a unique prefix of its id. A whole id is returned
    /// whether or not it is paired (the caller says what that means).
    pub fn peer_ref(&self, reference: &str) -> Result<PracticeId, NodeError> {
        let peers = self.store.peers()?;
        chartmesh_core::ids::match_peer(reference, peers.iter().map(|p| (p.id, p.name.as_str())))
            // Naming no paired practice is a mistake in the request (422), as a malformed id is.
            .map_err(|e| NodeError::Invalid(e.to_string()))
    }

    pub async fn add_peer(
        &self,
        id: &str,
        addr: &str,
        name: Option<String>,
        by: &str,
    ) -> Result<Peer, NodeError> {
        let id = parse_peer(id)?;
        if id == self.identity.id {
            return Err(NodeError::Invalid("that is this practice's own id: pair with the other practice's id (`chartmesh id` there)".into()));
        }
        let ok_addr = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        // No address: the peer is reached through the relay, or dials in itself.
        if !addr.is_empty() && !ok_addr {
            return Err(NodeError::Invalid(format!(
                "--addr {addr:?} is not HOST:PORT (e.g. 192.0.2.10:7361)"
            )));
        }
        let peer = Peer {
            id,
            name: name.unwrap_or_else(|| id.short()),
            addr: addr.to_string(),
            added_by: by.to_string(),
            added_ms: now_ms(),
        };
        self.store
            .put_peer(peer.clone())?
            .await
            .map_err(|_| StoreError::Closed)??;
        self.peers_changed.notify_one();
        Ok(peer)
    }

    pub async fn remove_peer(&self, id: &str, by: &str) -> Result<(), NodeError> {
        let id = self.peer_ref(id)?;
        if self.store.peer(&id)?.is_none() {
            return Err(NodeError::NotFound(format!("practice {id} is not paired")));
        }
        self.store
            .remove_peer(id, by, now_ms())?
            .await
            .map_err(|_| StoreError::Closed)??;
        self.peers_changed.notify_one();
        Ok(())
    }

    /// Records consent grants. Only paired peers, only existing charts of this practice.
    pub async fn share(&self, req: ShareRequest, by: &str) -> Result<Vec<Grant>, NodeError> {
        let peer = self.peer_ref(&req.peer)?;
        if self.store.peer(&peer)?.is_none() {
            return Err(NodeError::Invalid(format!(
                "practice {} is not paired: pair first with `chartmesh peer add {peer} --addr HOST:PORT`",
                peer.short()
            )));
        }
        let access: Access = req.access.as_deref().unwrap_or("read").parse()?;
        let purpose: Purpose = req.purpose.as_deref().unwrap_or("continuity").parse()?;
        let now = now_ms();
        let expires_ms = match req.expires.as_deref() {
            None => None,
            Some(s) => {
                let t = time::OffsetDateTime::parse(
                    s,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|_| {
                    NodeError::Invalid(format!(
                        "--expires {s:?} is not an RFC 3339 time such as 2026-12-31T23:59:00Z"
                    ))
                })?;
                let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
                if ms <= now {
                    return Err(NodeError::Invalid(format!("--expires {s} is in the past")));
                }
                Some(ms)
            }
        };
        let charts = match (req.all, req.charts.is_empty()) {
            (true, true) => vec![consent::ALL_CHARTS.to_string()],
            (false, false) => req.charts,
            _ => {
                return Err(NodeError::Invalid(
                    "name the charts to share, or --all (not both)".into(),
                ));
            }
        };
        for id in &charts {
            if id == consent::ALL_CHARTS {
                continue;
            }
            match self.store.chart_origin(id)? {
                None => return Err(NodeError::NotFound(id.clone())),
                Some(origin) => {
                    if consent::may_grant(origin.as_deref()).is_err() {
                        self.audit(vec![
                            AuditEvent::new(now, by, "refuse")
                                .chart(id)
                                .peer(peer.to_string())
                                .detail("share of a received chart"),
                        ])
                        .await?;
                        return Err(NodeError::Refused(format!(
                            "chart {id} was received from another practice and cannot be shared onward; ask that practice to share it"
                        )));
                    }
                }
            }
        }
        let grants: Vec<Grant> = charts
            .into_iter()
            .map(|chart_id| Grant {
                chart_id,
                peer,
                access,
                purpose,
                expires_ms,
                recorded_by: by.to_string(),
                recorded_ms: now,
                revoked_ms: None,
            })
            .collect();
        self.store
            .grant(grants.clone())?
            .await
            .map_err(|_| StoreError::Closed)??;
        Ok(grants)
    }

    pub async fn revoke(
        &self,
        req: ShareRequest,
        by: &str,
    ) -> Result<chartmesh_store::Revoked, NodeError> {
        let peer = self.peer_ref(&req.peer)?;
        let charts = match (req.all, req.charts.is_empty()) {
            (true, true) => None,
            (false, false) => Some(req.charts),
            _ => {
                return Err(NodeError::Invalid(
                    "name the charts to revoke, or --all (not both)".into(),
                ));
            }
        };
        if let Some(ids) = charts.clone() {
            // A name that is neither a chart here nor a grant's chart is a mistake.
            self.read(move |store| {
                let grants = store.grants(Some(&peer))?;
                for id in ids {
                    if store.chart_origin(&id)?.is_none()
                        && !grants.iter().any(|g| g.chart_id == id)
                    {
                        return Err(NodeError::NotFound(id));
                    }
                }
                Ok(())
            })
            .await?;
        }
        Ok(self
            .store
            .revoke(peer, charts, by, now_ms())?
            .await
            .map_err(|_| StoreError::Closed)??)
    }
}

/// A chart's due-list facts as stored beside it (chartmesh_core::due::facts).
fn facts_json(chart: &Chart) -> Option<String> {
    Some(serde_json::to_string(&chartmesh_core::due::facts(chart)).expect("facts serialize"))
}

fn singular(section: &str) -> &str {
    match section {
        "notes" => "note",
        "medications" => "medication",
        "allergies" => "allergy",
        "observations" => "observation",
        "conditions" => "condition",
        "immunizations" => "immunization",
        other => other,
    }
}

fn same_as_stored(store: &Store, id: &str, rec: &[u8]) -> Result<bool, NodeError> {
    let new = Chart::from_json_slice(rec)?.to_json_value();
    let Some(stored) = store.get(id)? else {
        return Ok(false);
    };
    Ok(canonical::to_canonical(&stored.doc.to_json()?) == canonical::to_canonical(&new))
}

/// Best effort: the `"id"` of a record that failed to parse, for the error report.
fn peek_id(rec: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(rec).ok()?;
    let at = s.find("\"id\"")?;
    let rest = s[at + 4..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    let id = &rest[..end];
    (id.len() <= 128).then(|| id.to_string())
}
