//! Store tests on real SQLite files.

use chartmesh_core::audit::AuditEvent;
use chartmesh_core::chart::{Entry, Note};
use chartmesh_core::{ChangeMeta, Chart, ChartDoc, PracticeId};
use chartmesh_store::{IndexFields, InsertOutcome, NewChart, Store, StoreError, StoreOptions};

fn chart(id: &str, family: &str, mrn: &str) -> Chart {
    let s = format!(
        r#"{{"id":"{id}","type":"chart","schemaVersion":1,"patient":{{"mrn":"{mrn}","name":{{"given":["Ana"],"family":"{family}"}},"birthDate":"1980-02-03"}},"notes":[],"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}}"#
    );
    Chart::from_json_slice(s.as_bytes()).unwrap()
}

fn meta(author: &str) -> ChangeMeta {
    ChangeMeta {
        practice: PracticeId::from_certificate_der(b"p"),
        author: author.into(),
        action: "test".into(),
        time_ms: 5,
    }
}

fn new_chart(c: &Chart) -> NewChart {
    let mut d = ChartDoc::create(c, &meta("import"));
    NewChart {
        id: c.id.clone(),
        doc: d.save(),
        index: IndexFields::from_chart_json(&c.to_json_value()),
        origin: None,
        time_ms: 1,
        heads: d.head_bytes(),
        referrals: Vec::new(),
        due_facts: None,
    }
}

fn note(id: &str) -> Entry {
    Entry::Note(Note {
        id: id.into(),
        author: "Dr X".into(),
        date: "2025-01-01T00:00:00Z".into(),
        text: "text".into(),
        ..Default::default()
    })
}

/// Appends `e` to chart `id` as Dr X (with `audit`) and waits for the commit.
fn append(
    store: &Store,
    id: &str,
    e: Entry,
    audit: Vec<AuditEvent>,
) -> Result<(), chartmesh_store::StoreError> {
    let m = meta("Dr X");
    store
        .edit(id.into(), Box::new(move |d| d.append(&e, &m)), audit)
        .unwrap()
        .blocking_recv()
        .unwrap()
        .map(|_| ())
}

/// Sets the schema version of the store file at `path` (as an older build would have left it).
fn set_user_version(path: &std::path::Path, v: u32) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", key().to_hex()))
        .unwrap();
    conn.pragma_update(None, "user_version", v).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
}

#[test]
fn charts_survive_reopen_and_edits_compact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(
        &path,
        &key(),
        StoreOptions {
            compact_after: 3,
            max_batch: 64,
        },
    )
    .unwrap();
    let a = chart("c1", "Holhol", "MRN1");
    let b = chart("c2", "Korvin", "MRN2");
    let out = store
        .insert_charts(
            vec![new_chart(&a), new_chart(&b), new_chart(&a)],
            "import".into(),
        )
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(
        out,
        vec![
            InsertOutcome::Inserted,
            InsertOutcome::Inserted,
            InsertOutcome::AlreadyExists
        ]
    );
    for i in 0..7 {
        append(
            &store,
            "c1",
            note(&format!("n{i}")),
            vec![AuditEvent::new(9, "Dr X", "update").chart("c1")],
        )
        .unwrap();
    }
    store.close();
    drop(store);

    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    assert_eq!(store.count().unwrap(), 2);
    let mut rec = store.get("c1").unwrap().unwrap();
    let c = rec.doc.to_chart().unwrap();
    let ids: Vec<_> = c.notes.iter().map(|n| n.id.clone()).collect();
    assert_eq!(ids, (0..7).map(|i| format!("n{i}")).collect::<Vec<_>>());
    assert_eq!(rec.doc.history().len(), 8);
    assert!(store.get("nope").unwrap().is_none());
    let missing = store
        .edit("nope".into(), Box::new(|_| Ok(())), vec![])
        .unwrap()
        .blocking_recv()
        .unwrap();
    assert!(matches!(
        missing,
        Err(chartmesh_store::StoreError::NotFound(_))
    ));

    assert_eq!(store.search("MRN2", 10).unwrap()[0].id, "c2");
    assert_eq!(store.search("holh", 10).unwrap()[0].id, "c1");
    assert_eq!(store.search("1980-02-03", 10).unwrap().len(), 2);
    assert_eq!(store.verify_audit().unwrap(), Ok(2 + 7));
}

#[test]
fn read_only_open_sees_committed_data_and_refuses_missing_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    assert!(Store::open_read_only(&path, &key()).is_err());
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    store
        .insert_charts(vec![new_chart(&chart("c1", "A", "M"))], "import".into())
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    let ro = Store::open_read_only(&path, &key()).unwrap();
    assert_eq!(ro.count().unwrap(), 1);
    assert!(ro.insert_charts(vec![], "x".into()).is_err());
}

#[test]
fn every_chart_write_takes_the_next_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db"), &key(), StoreOptions::default()).unwrap();
    assert_eq!(store.seq().unwrap(), 0);
    let charts = vec![
        new_chart(&chart("c1", "A", "M1")),
        new_chart(&chart("c2", "B", "M2")),
        new_chart(&chart("c3", "C", "M3")),
    ];
    store
        .insert_charts(charts, "import".into())
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(store.seq().unwrap(), 3);
    append(&store, "c1", note("n1"), vec![]).unwrap();
    // c1 changed last: it now sorts after the others, and a checkpoint at 3 sees only it.
    assert_eq!(
        store.charts_since(0, 10).unwrap(),
        vec![
            ("c2".to_string(), 2),
            ("c3".to_string(), 3),
            ("c1".to_string(), 4)
        ]
    );
    assert_eq!(
        store.charts_since(3, 10).unwrap(),
        vec![("c1".to_string(), 4)]
    );
    assert!(
        store.charts_since(4, 10).unwrap().is_empty(),
        "nothing changed since the last checkpoint"
    );
    // A failed write takes no number (its savepoint is rolled back).
    let r = store
        .edit("nope".into(), Box::new(|_| Ok(())), vec![])
        .unwrap()
        .blocking_recv()
        .unwrap();
    assert!(r.is_err());
    assert_eq!(store.seq().unwrap(), 4);
}

fn key() -> chartmesh_store::StoreKey {
    chartmesh_store::StoreKey::from_bytes([7; 32])
}

/// Every file the store leaves on disk, read raw.
fn files_under(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn the_store_is_encrypted_and_refuses_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    store
        .insert_charts(
            vec![new_chart(&chart("c1", "Zanzibarova", "MRN-PLAIN-77"))],
            "import".into(),
        )
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    // While open (WAL and shared memory present) and after close, no file holds the name.
    for (name, bytes) in files_under(dir.path()) {
        for needle in ["Zanzibarova", "MRN-PLAIN-77"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} found in plaintext in {name}"
            );
        }
    }
    store.close();
    drop(store);
    let wrong = chartmesh_store::StoreKey::from_bytes([8; 32]);
    match Store::open(&path, &wrong, StoreOptions::default()) {
        Err(chartmesh_store::StoreError::WrongKey(_)) => {}
        Err(other) => panic!("expected WrongKey, got {other}"),
        Ok(_) => panic!("a wrong key opened the store"),
    }
    assert!(matches!(
        Store::open_read_only(&path, &wrong),
        Err(chartmesh_store::StoreError::WrongKey(_))
    ));
    assert_eq!(
        Store::open_read_only(&path, &key())
            .unwrap()
            .count()
            .unwrap(),
        1
    );
}

#[test]
fn an_online_backup_is_a_consistent_store_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    let charts: Vec<NewChart> = (0..50)
        .map(|i| new_chart(&chart(&format!("c{i}"), "Fam", &format!("M{i}"))))
        .collect();
    store
        .insert_charts(charts, "import".into())
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    // Writes keep arriving while the backup runs; the copy holds a prefix of them.
    let pending: Vec<_> = (50..80)
        .map(|i| {
            store
                .insert_charts(
                    vec![new_chart(&chart(&format!("c{i}"), "Fam", &format!("M{i}")))],
                    "import".into(),
                )
                .unwrap()
        })
        .collect();
    let dest = dir.path().join("backup.db");
    let bytes = store.backup_to(&dest).unwrap();
    assert!(bytes > 0);
    for p in pending {
        p.blocking_recv().unwrap().unwrap();
    }
    let copy = Store::open_read_only(&dest, &key()).unwrap();
    let n = copy.count().unwrap();
    assert!((50..=80).contains(&n), "backup holds {n} charts");
    assert!(copy.verify_audit().unwrap().is_ok());
    assert!(!dir.path().join("backup.db.partial").exists());
}

#[test]
fn a_merge_prepared_off_the_writer_is_redone_when_the_chart_changed_meanwhile() {
    use chartmesh_store::SyncOutcome;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_one_chart(dir.path());
    let peer_meta = |author: &str| ChangeMeta {
        practice: PracticeId::from_certificate_der(b"peer"),
        author: author.into(),
        action: "test".into(),
        time_ms: 9,
    };
    let notes = |s: &Store| -> Vec<String> {
        s.get("c1")
            .unwrap()
            .unwrap()
            .doc
            .to_chart()
            .unwrap()
            .notes
            .into_iter()
            .map(|n| n.id)
            .collect()
    };
    let peer_id = PracticeId::from_certificate_der(b"peer").to_string();
    let apply = |data: Vec<u8>, merge| apply_returned(&store, &peer_id, data, merge);

    // The peer's change, merged off the writer; then a local edit lands first.
    let mut peer = store.get("c1").unwrap().unwrap().doc;
    let stored_heads = peer.head_bytes();
    peer.append(&note("from-peer"), &peer_meta("Dr P")).unwrap();
    let data = peer.changes_after(&stored_heads);
    let prepared = store.prepare_merge("c1", &data, true).unwrap();
    assert!(prepared.is_some());
    append(&store, "c1", note("local"), vec![]).unwrap();
    // The stale preparation is not used: both notes survive.
    assert_eq!(
        apply(data, prepared),
        vec![SyncOutcome::Applied { changed: true }]
    );
    let got = notes(&store);
    assert!(
        got.contains(&"local".to_string()) && got.contains(&"from-peer".to_string()),
        "{got:?}"
    );

    // A fresh preparation is used as is, with the same result as merging in the writer.
    let mut peer = store.get("c1").unwrap().unwrap().doc;
    let stored_heads = peer.head_bytes();
    peer.append(&note("second"), &peer_meta("Dr P")).unwrap();
    let data = peer.changes_after(&stored_heads);
    let prepared = store.prepare_merge("c1", &data, true).unwrap();
    assert_eq!(
        apply(data.clone(), prepared),
        vec![SyncOutcome::Applied { changed: true }]
    );
    assert_eq!(notes(&store).len(), 3);
    // Applying the same changes again changes nothing.
    let prepared = store.prepare_merge("c1", &data, true).unwrap();
    assert_eq!(
        apply(data, prepared),
        vec![SyncOutcome::Applied { changed: false }]
    );
    // Reopened, the store holds the merged chart.
    drop(store);
    let again = Store::open(&dir.path().join("s.db"), &key(), StoreOptions::default()).unwrap();
    assert_eq!(notes(&again).len(), 3);
}

#[test]
fn a_peer_cannot_add_a_referral_step_in_another_practices_name() {
    use chartmesh_core::referral::{Event, Referral, Step};
    use chartmesh_store::SyncOutcome;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_one_chart(dir.path());
    let me = meta("Dr A");
    let (a, b) = (
        me.practice.to_string(),
        PracticeId::from_certificate_der(b"peer"),
    );
    let event = |step, practice: &str| Event {
        step,
        at: "2026-01-02T00:00:00Z".into(),
        by: "x".into(),
        practice: practice.into(),
        note_id: None,
    };
    let r = Referral {
        id: "ref-1".into(),
        from: a.clone(),
        to: b.to_string(),
        reason: "r".into(),
        specialty: None,
        requested: "2026-01-01T00:00:00Z".into(),
        requested_by: "Dr A".into(),
        events: vec![event(Step::Request, &a)],
    };
    store
        .edit(
            "c1".into(),
            Box::new(move |d| d.add_referral(&r, &me)),
            vec![],
        )
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    let peer_meta = ChangeMeta {
        practice: b,
        author: "Dr B".into(),
        action: "test".into(),
        time_ms: 9,
    };
    let apply = |data: Vec<u8>| apply_returned(&store, &b.to_string(), data, None);
    // The receiving practice "cancels" in the referrer's name: refused, nothing stored.
    let mut forged = store.get("c1").unwrap().unwrap().doc;
    let heads = forged.head_bytes();
    forged
        .add_referral_event("ref-1", &event(Step::Cancel, &a), None, &peer_meta)
        .unwrap();
    let out = apply(forged.changes_after(&heads));
    assert!(
        matches!(&out[0], SyncOutcome::Refused(why) if why.contains("claims-another-practice")),
        "{out:?}"
    );
    let stored = store.get("c1").unwrap().unwrap().doc.referrals().unwrap();
    assert_eq!(stored["ref-1"].events.len(), 1);
    // In its own name it is applied.
    let mut honest = store.get("c1").unwrap().unwrap().doc;
    let heads = honest.head_bytes();
    honest
        .add_referral_event(
            "ref-1",
            &event(Step::Accept, &b.to_string()),
            None,
            &peer_meta,
        )
        .unwrap();
    assert_eq!(
        apply(honest.changes_after(&heads)),
        vec![SyncOutcome::Applied { changed: true }]
    );
    let stored = store.get("c1").unwrap().unwrap().doc.referrals().unwrap();
    assert_eq!(
        stored["ref-1"].status(),
        chartmesh_core::referral::Status::Accepted
    );
}

/// A store in `dir` holding one own chart, `c1`.
fn store_with_one_chart(dir: &std::path::Path) -> Store {
    let store = Store::open(&dir.join("s.db"), &key(), StoreOptions::default()).unwrap();
    store
        .insert_charts(vec![new_chart(&chart("c1", "A", "M1"))], "import".into())
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    store
}

/// Applies a peer's changes to our chart `c1` as a pull would, under a read-write grant of
/// `c1` to that peer (consent is decided by the store with chartmesh_core::consent).
fn apply_returned(
    store: &Store,
    peer: &str,
    data: Vec<u8>,
    merge: Option<chartmesh_store::PreparedMerge>,
) -> Vec<chartmesh_store::SyncOutcome> {
    let peer_id: PracticeId = peer.parse().unwrap();
    store
        .grant(vec![chartmesh_core::consent::Grant {
            chart_id: "c1".into(),
            peer: peer_id,
            access: chartmesh_core::consent::Access::ReadWrite,
            purpose: chartmesh_core::consent::Purpose::Referral,
            expires_ms: None,
            recorded_by: "admin".into(),
            recorded_ms: 1,
            revoked_ms: None,
        }])
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    store
        .apply_sync(
            peer.into(),
            vec![chartmesh_store::SyncItem {
                key: "c1".into(),
                chart: "c1".into(),
                kind: chartmesh_core::sync::Offered::Returned { digest: 0 },
                data: Some(data),
                prepared: None,
                merge,
                held: true,
            }],
            10,
        )
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap()
}

/// A write that would take a chart past the size limit is refused whole, with an error that
/// says so; the chart stays as it was and can still be written within the limit.
#[test]
fn a_write_past_the_chart_size_limit_is_refused_and_loses_nothing() {
    use chartmesh_core::sync::MAX_CHART_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_one_chart(dir.path());
    let mut x: u64 = 88172645463325252;
    let mut big = |i: usize| {
        let text: String = (0..1_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b"abcdefghijklmnopqrstuvwxyz234567"[(x % 32) as usize])
            })
            .collect();
        Entry::Note(Note {
            id: format!("big-{i}"),
            author: "Dr X".into(),
            date: "2024-01-01T00:00:00Z".into(),
            text,
            ..Default::default()
        })
    };
    let mut written = 0;
    let err = loop {
        match append(&store, "c1", big(written), vec![]) {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 40, "no limit was applied");
    };
    assert!(
        matches!(&err, chartmesh_store::StoreError::TooLarge { bytes, .. } if *bytes > MAX_CHART_BYTES as i64),
        "{err}"
    );
    assert!(err.to_string().contains("over the limit"), "{err}");
    let notes = store
        .get("c1")
        .unwrap()
        .unwrap()
        .doc
        .to_chart()
        .unwrap()
        .notes;
    assert_eq!(notes.len(), written, "the refused note was not kept");
    append(&store, "c1", note("small"), vec![]).expect("a small write still fits");
}

/// An offline admin command's store (`Store::open_existing`): a store of an older schema is
/// refused before anything is written to it; on a current one the audit entry it commits
/// is durable in the WAL it leaves (no checkpoint at close), and the next opener reads it.
#[test]
fn an_offline_open_refuses_an_older_schema_untouched_and_leaves_its_audit_in_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    store
        .insert_charts(vec![new_chart(&chart("c1", "Ames", "M1"))], "import".into())
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    store.close();
    drop(store);
    let wal = dir.path().join("store.db-wal");
    assert!(!wal.exists(), "a daemon's store folds its WAL in at close");

    // Older schema: refused, no file changed or added.
    {
        let v: u32 = {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", key().to_hex()))
                .unwrap();
            conn.query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        set_user_version(&path, v - 1);
        let before = files_under(dir.path());
        let err = Store::open_existing(&path, &key()).err().expect("refused");
        assert!(
            err.to_string()
                .contains("start chartmeshd once to upgrade it"),
            "{err}"
        );
        assert_eq!(
            files_under(dir.path()),
            before,
            "the refused store was changed"
        );
        set_user_version(&path, v);
    }

    // Current schema: the audit entry is committed into a WAL left for the next opener.
    let off = Store::open_existing(&path, &key()).unwrap();
    assert!(off.get("c1").unwrap().is_some());
    off.audit(vec![
        AuditEvent::new(9, "admin", "read")
            .chart("c1")
            .detail("chart; offline"),
    ])
    .unwrap()
    .blocking_recv()
    .unwrap()
    .unwrap();
    off.close();
    drop(off);
    assert!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0,
        "the committed entry stays in the WAL"
    );
    let next = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    let entries = next.audit_entries(Some("c1"), None, None).unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.event.actor == "admin" && e.event.action == "read"),
        "{entries:?}"
    );
    assert!(next.verify_audit().unwrap().is_ok());
}

/// An offline command's store has no writer thread: its reads and writes share one
/// connection, and a write made while a read still holds it (an export that audits as it
/// goes) commits through a second write connection. Both are durable and chained, and a
/// write after close is refused.
#[test]
fn an_offline_store_writes_inline_even_while_a_read_holds_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
        store
            .insert_charts(
                vec![
                    new_chart(&chart("c1", "Ames", "M1")),
                    new_chart(&chart("c2", "Bell", "M2")),
                ],
                "import".into(),
            )
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        store.close();
    }
    let off = Store::open_existing(&path, &key()).unwrap();
    let changes = off.subscribe_changes().expect("an offline store can write");
    let seq_before = *changes.borrow();
    // Each write is committed when `audit` returns: the reply is already there.
    let mut rx = off
        .audit(vec![AuditEvent::new(1, "admin", "read").chart("c1")])
        .unwrap();
    rx.try_recv().expect("answered at once").unwrap();
    let mut seen = Vec::new();
    off.for_each_chart(None, &mut |rec| {
        off.audit(vec![
            AuditEvent::new(2, "admin", "export").chart(rec.id.clone()),
        ])?
        .try_recv()
        .expect("answered at once")?;
        seen.push(rec.id);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, ["c1", "c2"]);
    append(&off, "c1", note("n-offline"), vec![]).unwrap();
    assert!(*changes.borrow() > seq_before, "the change sequence moved");
    off.close();
    assert!(matches!(
        off.audit(vec![AuditEvent::new(3, "admin", "read")]),
        Err(StoreError::Closed)
    ));
    drop(off);

    let next = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    let actions: Vec<(String, Option<String>)> = next
        .audit_entries(None, None, None)
        .unwrap()
        .into_iter()
        .filter(|e| e.event.actor == "admin")
        .map(|e| (e.event.action, e.event.chart_id))
        .collect();
    assert_eq!(
        actions,
        [
            ("read".to_string(), Some("c1".to_string())),
            ("export".to_string(), Some("c1".to_string())),
            ("export".to_string(), Some("c2".to_string())),
        ]
    );
    assert!(next.verify_audit().unwrap().is_ok());
    let doc = next.get("c1").unwrap().unwrap().doc.to_chart().unwrap();
    assert!(
        doc.notes.iter().any(|n| n.id == "n-offline"),
        "the note is kept"
    );
}

/// One audit entry for a list of patients: a search by any chart it names finds it (by the
/// index and by the filtered search), the chain verifies, and the index is checked against
/// the entries: a row removed (an access hidden from that patient's trail) or added (one
/// invented) fails verification at that entry. A store of the schema before such entries
/// (a backup) still verifies.
#[test]
fn an_entry_naming_many_charts_is_found_by_each_and_its_index_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    store
        .audit(vec![
            AuditEvent::new(1, "nurse", "read").chart("c9"),
            AuditEvent::new(2, "nurse", "read")
                .detail("listed in the due list")
                .charts(["c3", "c1", "c2"]),
        ])
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    // The whole log has every chart of the entry; a trail of one chart only that one.
    let all = store.audit_entries(None, None, None).unwrap();
    let listed = all.iter().find(|e| !e.event.charts.is_empty()).unwrap();
    assert_eq!(listed.event.charts, ["c1", "c2", "c3"]);
    assert_eq!(listed.charts_named, None);
    for c in ["c1", "c2", "c3"] {
        let found = store.audit_entries(Some(c), None, None).unwrap();
        assert_eq!(found.len(), 1, "{c}: {found:?}");
        assert_eq!(
            found[0].event.charts,
            [c],
            "other patients are not in {c}'s trail"
        );
        assert_eq!(found[0].charts_named, Some(3));
        let searched = store
            .audit_search(&chartmesh_store::AuditFilter {
                chart: Some(c.into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(searched, found, "{c}");
    }
    let unfiltered = store
        .audit_search(&chartmesh_store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    let listed = unfiltered
        .iter()
        .find(|e| e.charts_named.is_some())
        .unwrap();
    assert!(
        listed.event.charts.is_empty(),
        "a search of everything gives the count only"
    );
    assert_eq!(listed.charts_named, Some(3));
    assert_eq!(
        store.audit_entries(Some("c9"), None, None).unwrap().len(),
        1
    );
    assert!(
        store
            .audit_entries(Some("c4"), None, None)
            .unwrap()
            .is_empty()
    );
    let n = store.verify_audit().unwrap().expect("verifies");
    store.close();
    drop(store);

    let raw = || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", key().to_hex()))
            .unwrap();
        conn
    };
    let seq: i64 = raw()
        .query_row(
            "SELECT seq FROM audit_charts WHERE chart_id = 'c2'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // Removed from the index: the entry is hidden from c2's trail, and verify says so.
    raw()
        .execute("DELETE FROM audit_charts WHERE chart_id = 'c2'", [])
        .unwrap();
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    assert!(
        store
            .audit_entries(Some("c2"), None, None)
            .unwrap()
            .is_empty()
    );
    let err = store.verify_audit().unwrap().unwrap_err();
    assert_eq!(err.seq, seq);
    assert!(err.reason.contains("lacks chart c2"), "{}", err.reason);
    store.close();
    drop(store);
    // Put back, and one invented for another chart.
    raw()
        .execute_batch(&format!(
            "INSERT INTO audit_charts(chart_id, seq) VALUES ('c2', {seq}), ('c7', {seq});"
        ))
        .unwrap();
    let store = Store::open(&path, &key(), StoreOptions::default()).unwrap();
    let err = store.verify_audit().unwrap().unwrap_err();
    assert!(err.reason.contains("chart c7"), "{}", err.reason);
    store.close();
    drop(store);
    raw()
        .execute("DELETE FROM audit_charts WHERE chart_id = 'c7'", [])
        .unwrap();
    // Edited in the entry itself: its hash no longer matches.
    raw()
        .execute(
            "UPDATE audit SET charts = '[\"c1\",\"c3\"]' WHERE seq = ?1",
            [seq],
        )
        .unwrap();
    let check = Store::open_to_check(&path, &key()).unwrap();
    assert_eq!(check.verify_audit().unwrap().unwrap_err().seq, seq);
    drop(check);

    // A store of the previous schema (no such entries, no index): verifies as before.
    let old = dir.path().join("old.db");
    {
        let store = Store::open(&old, &key(), StoreOptions::default()).unwrap();
        store
            .audit(vec![AuditEvent::new(1, "nurse", "read").chart("c1")])
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        store.close();
    }
    let conn = rusqlite::Connection::open(&old).unwrap();
    conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", key().to_hex()))
        .unwrap();
    let v: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    conn.execute_batch("DROP TABLE audit_charts; ALTER TABLE audit DROP COLUMN charts;")
        .unwrap();
    drop(conn);
    set_user_version(&old, v - 1);
    let check = Store::open_to_check(&old, &key()).unwrap();
    assert_eq!(check.verify_audit().unwrap(), Ok(n - 1));
}

/// Changes to a copy the pull looked up as held here, and the copy is gone by the time they
/// are applied (an emergency access ended meanwhile): the apply fails whole, so the pull is
/// redone from its old checkpoint and asks for the whole document, rather than refusing the
/// item and moving the checkpoint past a chart still shared with this practice. The same
/// changes for a chart the pull did not look up as held (a peer sending a fragment where a
/// whole document was asked for) are refused, and audited.
#[test]
fn changes_to_a_copy_removed_during_the_pull_fail_the_apply_instead_of_being_skipped() {
    use chartmesh_core::consent::Access;
    use chartmesh_core::sync::{Incoming, Offered};
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_one_chart(dir.path());
    let peer = PracticeId::from_certificate_der(b"custodian").to_string();
    let mut doc = ChartDoc::create(&chart("c9", "B", "M9"), &meta("import"));
    doc.save();
    doc.append(&note("n1"), &meta("Dr Y")).unwrap();
    let delta = doc.save_incremental();
    let key = chartmesh_core::ids::copy_key("c9", &peer);
    let apply = |held: bool| {
        let item = store.prepare_sync(
            Incoming {
                key: key.clone(),
                chart: "c9".into(),
                kind: Offered::Shared {
                    digest: 1,
                    access: Access::Read,
                    expires_ms: None,
                },
                data: Some(delta.clone()),
                held,
            },
            10,
        );
        store
            .apply_sync(peer.clone(), vec![item], 10)
            .unwrap()
            .blocking_recv()
            .unwrap()
    };
    let audited = || store.audit_entries(Some(&key), None, None).unwrap().len();
    match apply(true) {
        Err(e @ StoreError::GoneDuringPull(_)) => {
            assert!(e.to_string().contains("the pull is redone"), "{e}")
        }
        other => panic!("expected the apply to fail as gone during the pull: {other:?}"),
    }
    assert!(store.get(&key).unwrap().is_none(), "nothing was written");
    assert_eq!(audited(), 0, "nothing was received or refused");
    match apply(false) {
        Ok(outcomes) => assert!(
            matches!(&outcomes[..], [chartmesh_store::SyncOutcome::Refused(_)]),
            "{outcomes:?}"
        ),
        other => panic!("expected a refusal: {other:?}"),
    }
    assert!(store.get(&key).unwrap().is_none());
    assert_eq!(audited(), 1, "the refusal is audited");
}
