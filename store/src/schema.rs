//! The schema, as numbered migrations tracked by `PRAGMA user_version`. A released migration
//! is never edited: a change to the schema is a new migration at the end of the list.

use rusqlite::Connection;
use std::path::Path;

use crate::StoreError;

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: charts, their incremental changes, the search index, settings, the audit chain.
    r#"
    CREATE TABLE charts (
        id          TEXT PRIMARY KEY,
        doc         BLOB NOT NULL,
        inc_seq     INTEGER NOT NULL DEFAULT 0,
        inc_count   INTEGER NOT NULL DEFAULT 0,
        origin      TEXT,
        created_ms  INTEGER NOT NULL,
        updated_ms  INTEGER NOT NULL,
        mrn         TEXT NOT NULL,
        family      TEXT NOT NULL,
        given       TEXT NOT NULL,
        birth_date  TEXT NOT NULL,
        name_key    TEXT NOT NULL
    );
    CREATE INDEX charts_mrn ON charts(mrn);
    CREATE INDEX charts_name ON charts(name_key);
    CREATE INDEX charts_birth ON charts(birth_date);
    CREATE TABLE chart_changes (
        chart_id TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        data     BLOB NOT NULL,
        PRIMARY KEY (chart_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        time_ms   INTEGER NOT NULL,
        actor     TEXT NOT NULL,
        action    TEXT NOT NULL,
        chart_id  TEXT,
        peer      TEXT,
        detail    TEXT,
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    CREATE INDEX audit_chart ON audit(chart_id);
    "#,
    // 2: paired practices and consent grants.
    r#"
    CREATE TABLE peers (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        addr        TEXT NOT NULL,
        added_by    TEXT NOT NULL,
        added_ms    INTEGER NOT NULL
    );
    CREATE TABLE grants (
        chart_id    TEXT NOT NULL,
        peer        TEXT NOT NULL,
        access      TEXT NOT NULL,
        purpose     TEXT NOT NULL,
        expires_ms  INTEGER,
        recorded_by TEXT NOT NULL,
        recorded_ms INTEGER NOT NULL,
        revoked_ms  INTEGER,
        PRIMARY KEY (chart_id, peer)
    );
    CREATE INDEX grants_peer ON grants(peer);
    "#,
    // 3: the change sequence: every chart or grant write takes the next number, so a peer's
    // checkpoint says exactly what it has seen (docs/PROTOCOL.md).
    r#"
    CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
    INSERT INTO sequence(id, n) VALUES (1, 0);
    ALTER TABLE charts ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE grants ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX charts_seq ON charts(seq);
    CREATE INDEX grants_seq ON grants(seq);
    "#,
    // 4: sync. Per chart: its heads (so offers need no document load), and for a chart
    // received from a peer the grant it came under and whether it was revoked; the peer whose
    // sync wrote the latest version when that peer has all of it (so it is not offered back).
    // Per peer: the checkpoint of its sequence applied here, and what it acknowledged of ours.
    r#"
    ALTER TABLE charts ADD COLUMN heads BLOB;
    ALTER TABLE charts ADD COLUMN access TEXT;
    ALTER TABLE charts ADD COLUMN expires_ms INTEGER;
    ALTER TABLE charts ADD COLUMN revoked_ms INTEGER;
    ALTER TABLE charts ADD COLUMN from_peer TEXT;
    CREATE INDEX charts_origin ON charts(origin);
    ALTER TABLE chart_changes ADD COLUMN heads_before BLOB;
    CREATE TABLE sync_peers (
        peer            TEXT PRIMARY KEY,
        checkpoint      INTEGER NOT NULL DEFAULT 0,
        last_pull_ms    INTEGER,
        served_upto     INTEGER NOT NULL DEFAULT 0,
        last_served_ms  INTEGER
    );
    "#,
    // 5: counting received charts per custodian (status, "shared from") reads only an index.
    // `revoked_ms` was added after the document column, so reading it from the table walks
    // each chart's overflow pages: at 10,000 charts that was the whole file, decrypted.
    r#"
    DROP INDEX charts_origin;
    CREATE INDEX charts_origin_revoked ON charts(origin, revoked_ms);
    "#,
    // 6: referrals (which chart holds each referral, kept on every write of a chart) and the
    // clinical conflict inbox (risky merges of concurrent edits, for review).
    r#"
    CREATE TABLE referral_index (
        referral_id TEXT PRIMARY KEY,
        chart_id    TEXT NOT NULL
    );
    CREATE INDEX referral_index_chart ON referral_index(chart_id);
    CREATE TABLE conflicts (
        id          INTEGER PRIMARY KEY,
        chart_id    TEXT NOT NULL,
        peer        TEXT,
        detected_ms INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        summary     TEXT NOT NULL,
        resolved_ms INTEGER,
        resolved_by TEXT,
        resolution  TEXT,
        UNIQUE(chart_id, kind, summary)
    );
    CREATE INDEX conflicts_open ON conflicts(resolved_ms);
    "#,
    // 7: emergency access granted to this practice: which held charts came by break-glass,
    // so they are removed when the access ends.
    r#"
    CREATE TABLE emergency_access (
        chart_id    TEXT NOT NULL,
        peer        TEXT NOT NULL,
        granted_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        requester   TEXT NOT NULL,
        PRIMARY KEY (chart_id, peer)
    );
    "#,
    // 8: documents in a table of their own. A chart's row held its document (~5 KB, spilling
    // to overflow pages) before its bookkeeping columns, so reading `seq`, `heads` or
    // `origin` walked (and decrypted) the document's pages, and every update of the
    // bookkeeping rewrote the whole document. Now the row is small and the document is
    // written only when it changes.
    r#"
    CREATE TABLE chart_docs (
        chart_id TEXT PRIMARY KEY,
        doc      BLOB NOT NULL
    );
    INSERT INTO chart_docs(chart_id, doc) SELECT id, doc FROM charts;
    ALTER TABLE charts DROP COLUMN doc;
    -- The due-list facts of each chart (chartmesh_core::due::facts as JSON), kept on every
    -- write, so a due list over every chart reads small rows instead of loading documents.
    -- Charts written before this have none until their next write (the due list reads their
    -- documents meanwhile).
    ALTER TABLE charts ADD COLUMN due_facts TEXT;
    "#,
    // 9: rows left behind by emergency expiry before it removed copies whole: documents,
    // changes and referral index rows of charts no longer held (a later share of the same
    // chart then failed on chart_docs' primary key, forever), and their open conflicts.
    r#"
    DELETE FROM chart_docs WHERE chart_id NOT IN (SELECT id FROM charts);
    DELETE FROM chart_changes WHERE chart_id NOT IN (SELECT id FROM charts);
    DELETE FROM referral_index WHERE chart_id NOT IN (SELECT id FROM charts);
    DELETE FROM conflicts WHERE resolved_ms IS NULL AND chart_id NOT IN (SELECT id FROM charts);
    "#,
    // 10: sync protocol 2. Copies of other practices' charts are keyed by (custodian, chart
    // id): the local key of a copy is `CHART@CUSTODIAN`, so two practices' charts with the
    // same id never collide and no peer can take an id before its custodian shares it. The
    // store's incarnation goes with each checkpoint (a checkpoint of a store since restored
    // means nothing). A grant's expiry is recorded as an event with a sequence number, so
    // peers learn of it on their next pull. Each chart's stored size is kept, so writes and
    // merges past the size limit are refused without reading the document.
    r#"
    UPDATE chart_docs SET chart_id = chart_id || '@' ||
        (SELECT origin FROM charts WHERE charts.id = chart_docs.chart_id)
        WHERE chart_id IN (SELECT id FROM charts WHERE origin IS NOT NULL);
    UPDATE chart_changes SET chart_id = chart_id || '@' ||
        (SELECT origin FROM charts WHERE charts.id = chart_changes.chart_id)
        WHERE chart_id IN (SELECT id FROM charts WHERE origin IS NOT NULL);
    UPDATE referral_index SET chart_id = chart_id || '@' ||
        (SELECT origin FROM charts WHERE charts.id = referral_index.chart_id)
        WHERE chart_id IN (SELECT id FROM charts WHERE origin IS NOT NULL);
    UPDATE conflicts SET chart_id = chart_id || '@' ||
        (SELECT origin FROM charts WHERE charts.id = conflicts.chart_id)
        WHERE chart_id IN (SELECT id FROM charts WHERE origin IS NOT NULL);
    UPDATE emergency_access SET chart_id = chart_id || '@' || peer
        WHERE instr(chart_id, '@') = 0;
    UPDATE charts SET id = id || '@' || origin WHERE origin IS NOT NULL;
    ALTER TABLE sync_peers ADD COLUMN checkpoint_inc INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE grants ADD COLUMN expired_ms INTEGER;
    CREATE INDEX grants_expiry ON grants(expires_ms) WHERE expires_ms IS NOT NULL AND revoked_ms IS NULL AND expired_ms IS NULL;
    ALTER TABLE charts ADD COLUMN doc_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE charts SET doc_bytes =
        coalesce((SELECT length(doc) FROM chart_docs WHERE chart_docs.chart_id = charts.id), 0) +
        coalesce((SELECT sum(length(data)) FROM chart_changes WHERE chart_changes.chart_id = charts.id), 0);
    "#,
    // 11: one audit entry for the patients a list disclosed together (a due list, search
    // results): their chart ids in the entry (JSON array, covered by its hash) and, to find
    // the entry by chart, one small index row per chart.
    r#"
    ALTER TABLE audit ADD COLUMN charts TEXT;
    CREATE TABLE audit_charts (
        chart_id TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        PRIMARY KEY (chart_id, seq)
    ) WITHOUT ROWID;
    "#,
];

/// Takes `count` numbers of the change sequence; returns the first.
pub(crate) fn take_seq(conn: &Connection, count: i64) -> Result<i64, StoreError> {
    let last: i64 = conn
        .prepare_cached("UPDATE sequence SET n = n + ?1 WHERE id = 1 RETURNING n")?
        .query_row([count], |r| r.get(0))?;
    Ok(last - count + 1)
}

/// The write connection; with `upgrade` false a store of another schema version is refused
/// before anything is written to it (an offline admin command: chartmeshd upgrades stores).
pub(crate) fn open_write_connection_as(
    path: &Path,
    key: &crate::StoreKey,
    upgrade: bool,
) -> Result<Connection, StoreError> {
    Ok(open_write_connection_checked(path, key, upgrade, false)?.0)
}

/// [`open_write_connection_as`]; with `check`, the start-up check of [`crate::integrity`]
/// runs first on this same connection (its report; `None` for a store about to be
/// created), so the daemon opens and keys the file once.
pub(crate) fn open_write_connection_checked(
    path: &Path,
    key: &crate::StoreKey,
    upgrade: bool,
    check: bool,
) -> Result<(Connection, Option<crate::integrity::IntegrityReport>), StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
    }
    let busy = std::time::Duration::from_secs(5);
    let (mut conn, report) = if check && path.exists() {
        let conn =
            crate::integrity::open_to_check(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(busy)?;
        let report = crate::integrity::check_connection(&conn, path, key)?;
        (conn, Some(report))
    } else {
        if check {
            crate::integrity::forget_marks(path);
        } else if path.exists()
            && let Some(e) = crate::integrity::access_problem(path)
        {
            return Err(e);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(busy)?;
        key.apply(&conn, path)?;
        (conn, None)
    };
    if !upgrade {
        check_version(&conn, false)?;
    }
    // WAL + synchronous=FULL: a committed transaction survives kill -9 and power loss.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "could not switch the store to WAL mode (got {mode})"
        )));
    }
    conn.execute_batch(
        // journal_size_limit: after a checkpoint the WAL file is cut back instead of keeping its peak size.
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA cache_size=-8000; PRAGMA journal_size_limit=16777216;",
    )?;
    migrate(&mut conn)?;
    crate::sync::ensure_incarnation(&conn)?;
    conn.set_prepared_statement_cache_capacity(crate::read::STATEMENT_CACHE);
    Ok((conn, report))
}

pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "store migrated");
    }
    Ok(())
}

/// The file has a chartmesh schema this build knows; unless `older_ok`, the current one.
pub(crate) fn check_version(conn: &Connection, older_ok: bool) -> Result<(), StoreError> {
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    if version == 0 {
        return Err(StoreError::Corrupt(
            "the database has no chartmesh schema".into(),
        ));
    }
    if version < known && !older_ok {
        return Err(StoreError::Corrupt(format!(
            "the store has schema {version} and this chartmesh expects {known}; start chartmeshd once to upgrade it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before documents moved to their own table (schema 7) is migrated
    /// without loss: every document readable, bookkeeping kept.
    #[test]
    fn documents_move_to_their_own_table_without_loss() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..7] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 7).unwrap();
        // (Migrated to the end, including later migrations.)
        for (id, doc) in [("c1", vec![1u8, 2, 3]), ("c2", vec![7u8; 9000])] {
            conn.execute(
                "INSERT INTO charts(id, doc, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq)
                 VALUES (?1, ?2, NULL, 1, 2, 'M', 'F', 'G', '2000-01-01', 'f g', 5)",
                rusqlite::params![id, doc],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let v: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        let docs: Vec<(String, Vec<u8>, i64)> = conn
            .prepare("SELECT c.id, d.doc, c.seq FROM charts c JOIN chart_docs d ON d.chart_id = c.id ORDER BY c.id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            docs,
            vec![
                ("c1".to_string(), vec![1, 2, 3], 5),
                ("c2".to_string(), vec![7; 9000], 5)
            ]
        );
        // The document column is gone from the chart rows; no chart has due facts yet.
        assert!(conn.prepare("SELECT doc FROM charts").is_err());
        let facts: i64 = conn
            .query_row("SELECT count(due_facts) FROM charts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(facts, 0);
    }

    /// Copies received from other practices are re-keyed `CHART@CUSTODIAN` by migration 10,
    /// with every row that names them; this practice's own charts keep their ids.
    #[test]
    fn received_copies_are_rekeyed_by_custodian_without_loss() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..8] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 8).unwrap();
        for (id, origin) in [("own-1", None), ("c-9", Some("PEER-A"))] {
            conn.execute(
                "INSERT INTO charts(id, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq)
                 VALUES (?1, ?2, 1, 2, 'M', 'F', 'G', '2000-01-01', 'f g', 5)",
                rusqlite::params![id, origin],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO chart_docs(chart_id, doc) VALUES (?1, ?2)",
                rusqlite::params![id, vec![1u8; 10]],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO chart_changes(chart_id, seq, data) VALUES (?1, 1, ?2)",
                rusqlite::params![id, vec![2u8; 5]],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO referral_index(referral_id, chart_id) VALUES (?1, ?2)",
                rusqlite::params![format!("ref-{id}"), id],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO emergency_access(chart_id, peer, granted_ms, expires_ms, requester) VALUES ('c-9', 'PEER-A', 1, 2, 'x')",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(String, i64)> = conn
            .prepare("SELECT c.id, c.doc_bytes FROM charts c JOIN chart_docs d ON d.chart_id = c.id ORDER BY c.id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![("c-9@PEER-A".to_string(), 15), ("own-1".to_string(), 15)]
        );
        for (table, col) in [
            ("chart_changes", "chart_id"),
            ("referral_index", "chart_id"),
        ] {
            let ids: Vec<String> = conn
                .prepare(&format!("SELECT {col} FROM {table} ORDER BY {col}"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(ids, vec!["c-9@PEER-A", "own-1"], "{table}");
        }
        let e: String = conn
            .query_row("SELECT chart_id FROM emergency_access", [], |r| r.get(0))
            .unwrap();
        assert_eq!(e, "c-9@PEER-A");
    }

    /// Emergency expiry used to leave a removed copy's document (and changes, referral
    /// index rows, open conflicts) behind; the migration removes exactly those orphans.
    #[test]
    fn orphans_of_removed_copies_are_cleaned_and_held_charts_kept() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..8] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 8).unwrap();
        conn.execute_batch(
            "INSERT INTO charts(id, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq)
               VALUES ('held', NULL, 1, 1, 'M', 'F', 'G', '2000-01-01', 'f g', 1);
             INSERT INTO chart_docs(chart_id, doc) VALUES ('held', x'01'), ('gone', x'02');
             INSERT INTO chart_changes(chart_id, seq, data) VALUES ('held', 1, x'03'), ('gone', 1, x'04');
             INSERT INTO referral_index(referral_id, chart_id) VALUES ('r1', 'held'), ('r2', 'gone');
             INSERT INTO conflicts(chart_id, detected_ms, kind, summary) VALUES ('held', 1, 'k', 's'), ('gone', 1, 'k', 's');
             INSERT INTO conflicts(chart_id, detected_ms, kind, summary, resolved_ms) VALUES ('gone', 1, 'k2', 's', 5);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        for table in ["chart_docs", "chart_changes", "referral_index"] {
            assert_eq!(
                count(&format!(
                    "SELECT count(*) FROM {table} WHERE chart_id = 'gone'"
                )),
                0,
                "{table}"
            );
            assert_eq!(
                count(&format!(
                    "SELECT count(*) FROM {table} WHERE chart_id = 'held'"
                )),
                1,
                "{table}"
            );
        }
        // Open conflicts of a chart no longer held go; the reviewed one stays as history.
        assert_eq!(
            count("SELECT count(*) FROM conflicts WHERE chart_id = 'gone'"),
            1
        );
        assert_eq!(
            count("SELECT count(*) FROM conflicts WHERE chart_id = 'held'"),
            1
        );
    }

    /// A store left by an earlier chartmesh (here schema 5, documents in the chart rows):
    /// readable for checking (backups, upgrades) but not for other offline reads, and
    /// migrated without loss when the daemon opens it.
    #[test]
    fn an_older_store_is_checked_then_migrated_on_open() {
        use chartmesh_core::{ChangeMeta, Chart, ChartDoc, PracticeId};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let key = crate::StoreKey::from_bytes([3; 32]);
        let c = Chart::from_json_slice(br#"{"id":"c1","type":"chart","schemaVersion":1,"patient":{"mrn":"M1","name":{"given":["Ana"],"family":"Old"},"birthDate":"1980-02-03"},"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}"#).unwrap();
        let meta = ChangeMeta {
            practice: PracticeId::from_certificate_der(b"p"),
            author: "import".into(),
            action: "create".into(),
            time_ms: 1,
        };
        let doc = ChartDoc::create(&c, &meta).save();
        {
            let conn = Connection::open(&path).unwrap();
            key.apply(&conn, &path).unwrap();
            for sql in &MIGRATIONS[..5] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 5).unwrap();
            conn.execute(
                "INSERT INTO charts(id, doc, origin, created_ms, updated_ms, mrn, family, given, birth_date, name_key, seq)
                 VALUES ('c1', ?1, NULL, 1, 1, 'M1', 'Old', 'Ana', '1980-02-03', 'old ana', 1)",
                [&doc],
            )
            .unwrap();
        }
        let check = crate::Store::open_to_check(&path, &key).unwrap();
        assert_eq!(check.count().unwrap(), 1);
        assert!(check.verify_audit().unwrap().is_ok());
        check.close();
        match crate::Store::open_read_only(&path, &key) {
            Err(e) => assert!(e.to_string().contains("start chartmeshd once"), "{e}"),
            Ok(_) => panic!("an offline read of an old schema must ask for an upgrade"),
        }
        let store = crate::Store::open(&path, &key, crate::StoreOptions::default()).unwrap();
        let rec = store.get("c1").unwrap().unwrap();
        assert_eq!(rec.doc.to_chart().unwrap(), c);
        store.close();
    }
}
