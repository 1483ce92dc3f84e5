//! A hostile paired peer: a test client holding a paired certificate that speaks the sync
//! protocol directly to a real daemon (tests/src/raw_peer.rs). It asks for charts it was not
//! offered, floods wants and streams, sends oversized frames, changes to a read-only chart
//! and under another practice's actor, offers charts under invalid or squatted ids and
//! offers without end. The daemon refuses, audits each kind of refusal (once per interval,
//! with a count), keeps its data, stays within its memory bound and keeps serving others.
//! An unpaired certificate cannot complete the handshake at all.

use chartmesh_core::chart::{Entry, Note};
use chartmesh_core::sync::{
    Delivery, Msg, OFFER_CHUNK, OfferItem, Offered, PROTOCOL_VERSION, WantItem, heads_digest,
};
use chartmesh_core::{ChangeMeta, ChartDoc, PracticeId};
use chartmesh_tests::raw_peer::{RawPeer, Stream, peak_rss};
use chartmesh_tests::*;
use std::time::Duration;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn pull(since: u64) -> Msg {
    Msg::Pull {
        version: PROTOCOL_VERSION,
        since,
        incarnation: 0,
        wall_ms: None,
    }
}

fn want(chart: &str) -> WantItem {
    WantItem {
        chart: chart.into(),
        returned: false,
        have: vec![],
    }
}

fn is_end(m: &Msg) -> bool {
    matches!(m, Msg::OfferEnd { .. })
}

fn offered(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .flat_map(|m| match m {
            Msg::Offer { items } => items.iter().map(|i| i.chart.clone()).collect(),
            _ => vec![],
        })
        .collect()
}

fn note_by(p: PracticeId, text: &str) -> (Entry, ChangeMeta) {
    (
        Entry::Note(Note {
            id: format!("hostile-{}", text.len()),
            author: "Mallory".into(),
            date: "2026-01-01T00:00:00Z".into(),
            text: text.into(),
            ..Default::default()
        }),
        ChangeMeta {
            practice: p,
            author: "Mallory".into(),
            action: "add note".into(),
            time_ms: 1,
        },
    )
}

/// A practice with the first `n` bench charts, and a raw peer paired with it (at an address
/// nothing listens on, so only the raw peer's own connection is used), granted
/// `read`/`read-write` access to the listed charts.
fn practice_with_raw_peer(n: usize, grants: &[(&str, &str)]) -> (Practice, RawPeer, PracticeId) {
    let a = Practice::new("Valley Clinic");
    a.import_first(n);
    let id_a: PracticeId = a.id().parse().unwrap();
    let h = RawPeer::new([id_a]);
    let dead = format!("127.0.0.1:{}", free_udp_port());
    a.cli_ok(&[
        "peer",
        "add",
        &h.id.to_string(),
        "--addr",
        &dead,
        "--name",
        "Mallory",
    ]);
    for (chart, access) in grants {
        a.cli_ok(&[
            "share",
            chart,
            "--with",
            &h.id.to_string(),
            "--access",
            access,
        ]);
    }
    (a, h, id_a)
}

fn refusals(p: &Practice) -> Vec<String> {
    p.cli_json(&["audit"])["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "refuse")
        .map(|e| format!("{} {} {}", e["chart_id"], e["peer"], e["detail"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_is_refused_and_audited_and_others_are_still_served() {
    let (a, h, id_a) = blocking(|| {
        practice_with_raw_peer(
            6,
            &[("chart-000001", "read"), ("chart-000002", "read-write")],
        )
    });
    let b = blocking(|| {
        let b = Practice::new("Ridge Cardiology");
        pair(&a, &b);
        a.cli_ok(&[
            "share",
            "chart-000006",
            "--with",
            &b.id(),
            "--access",
            "read",
        ]);
        b
    });
    let before = blocking(|| chart_hashes(&a.export_all()));
    let a_addr: std::net::SocketAddr = blocking(|| a.sync_addr()).parse().unwrap();

    // An unpaired certificate cannot complete the handshake.
    let stranger = RawPeer::new([id_a]);
    if let Ok(pc) = stranger.endpoint.connect(a_addr, id_a).await {
        // TLS 1.3: the client may finish its side before the server's refusal arrives; the
        // connection is then closed by the server and cannot carry a request.
        let attempt = async {
            let (send, recv) = pc.connection.open_bi().await.map_err(|e| e.to_string())?;
            let mut s = Stream {
                w: chartmesh_net::FrameWriter::new(send),
                r: chartmesh_net::FrameReader::new(recv, 1 << 20),
            };
            s.send(&pull(0)).await?;
            s.recv().await?.ok_or("ended".to_string())
        };
        let r = tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .expect("refused promptly");
        assert!(r.is_err(), "an unpaired practice got an answer");
    }

    let conn = h.connect(a_addr, id_a).await;

    // The offer names only the granted charts.
    let mut s = Stream::open(&conn).await;
    s.send(&pull(0)).await.unwrap();
    let (msgs, r) = s.recv_until(is_end).await;
    r.unwrap();
    assert_eq!(offered(&msgs), vec!["chart-000001", "chart-000002"]);
    assert!(
        matches!(msgs.last(), Some(Msg::OfferEnd { incarnation, .. }) if *incarnation != 0),
        "the offer ends with the store's incarnation"
    );
    // The offered charts are sent when wanted.
    s.send(&Msg::Want {
        items: vec![want("chart-000001"), want("chart-000002")],
    })
    .await
    .unwrap();
    let (msgs, r) = s
        .recv_until(|m| matches!(m, Msg::Changes { items } if items.iter().any(|d| d.chart == "chart-000002")))
        .await;
    r.unwrap();
    let deliveries: Vec<Delivery> = msgs
        .into_iter()
        .flat_map(|m| match m {
            Msg::Changes { items } => items,
            _ => vec![],
        })
        .collect();
    let doc1 = deliveries[0].data.clone().expect("granted chart delivered");
    let doc2 = deliveries[1].data.clone().expect("granted chart delivered");

    // Asking for a chart that was not offered — granted to someone else, unknown, or not
    // granted — ends the stream the same way for each: nothing is disclosed.
    for chart in [
        "chart-000003",
        "chart-000006",
        "no-such-chart",
        "chart-000001",
    ] {
        let mut s = Stream::open(&conn).await;
        s.send(&pull(0)).await.unwrap();
        let (_, r) = s.recv_until(is_end).await;
        r.unwrap();
        let w = if chart == "chart-000001" {
            // Wanted twice in one pull: the second is refused.
            vec![want(chart), want(chart)]
        } else {
            vec![want(chart)]
        };
        s.send(&Msg::Want { items: w }).await.unwrap();
        let (msgs, r) = s.recv_until(|_| false).await;
        let disclosed: Vec<&Delivery> = msgs
            .iter()
            .flat_map(|m| match m {
                Msg::Changes { items } => items.iter().collect(),
                _ => vec![],
            })
            .filter(|d| d.data.is_some() && d.chart != "chart-000001")
            .collect();
        assert!(disclosed.is_empty(), "{chart}: {disclosed:?}");
        assert!(r.is_err(), "{chart}: the stream was not ended");
    }

    // Garbage, a future version and an oversized frame: each stream is refused, the
    // connection and the daemon carry on.
    {
        let (mut send, _r) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9])
            .await
            .unwrap();
        let _ = send.finish();
    }
    {
        let mut s = Stream::open(&conn).await;
        s.w.send(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap();
        let (_, r) = s.recv_until(|_| false).await;
        assert!(r.is_err());
    }
    {
        let mut s = Stream::open(&conn).await;
        s.send(&Msg::Pull {
            version: 99,
            since: 0,
            incarnation: 0,
            wall_ms: None,
        })
        .await
        .unwrap();
        assert_eq!(
            s.recv().await.unwrap(),
            Some(Msg::Unsupported {
                version: PROTOCOL_VERSION
            })
        );
    }

    // Changes from the hostile peer, offered when the daemon pulls from it: to a read-only
    // chart, and to a read-write chart but written under the daemon's own actor. Then one
    // legitimate change, to show the refusals were for cause.
    let mut d1 = ChartDoc::load(&doc1, []).unwrap();
    let h1 = d1.head_bytes();
    let (e, m) = note_by(h.id, "tampering with a read-only chart");
    d1.append(&e, &m).unwrap();
    let bad_readonly = d1.changes_after(&h1);
    let mut d2 = ChartDoc::load(&doc2, []).unwrap();
    let h2 = d2.head_bytes();
    let (e, m) = note_by(id_a, "forged under the custodian's actor");
    d2.append(&e, &m).unwrap();
    let bad_actor = d2.changes_after(&h2);
    let mut d3 = ChartDoc::load(&doc2, []).unwrap();
    let (e, m) = note_by(h.id, "a legitimate consult note");
    d3.append(&e, &m).unwrap();
    let good = d3.changes_after(&h2);
    let scripts = vec![
        vec![("chart-000001", d1.head_bytes(), bad_readonly)],
        vec![("chart-000002", d2.head_bytes(), bad_actor)],
        vec![("chart-000002", d3.head_bytes(), good)],
    ];
    let responder = {
        let conn = conn.clone();
        tokio::spawn(async move {
            for script in scripts {
                let mut s = Stream::accept(&conn).await;
                let first = s.recv().await.unwrap().unwrap();
                assert!(matches!(
                    first,
                    Msg::Pull {
                        version: PROTOCOL_VERSION,
                        ..
                    }
                ));
                let items = script
                    .iter()
                    .map(|(c, heads, _)| OfferItem {
                        chart: c.to_string(),
                        kind: Offered::Returned {
                            digest: heads_digest(heads),
                        },
                    })
                    .collect();
                s.send(&Msg::Offer { items }).await.unwrap();
                s.send(&Msg::OfferEnd {
                    upto: 1,
                    incarnation: 7,
                })
                .await
                .unwrap();
                let w = s.recv().await.unwrap().unwrap();
                assert!(
                    matches!(&w, Msg::Want { items } if items.iter().all(|i| i.returned)),
                    "{w:?}"
                );
                let items = script
                    .into_iter()
                    .map(|(c, _, data)| Delivery {
                        chart: c.to_string(),
                        returned: true,
                        data: Some(data),
                    })
                    .collect();
                s.send(&Msg::Changes { items }).await.unwrap();
                let done = s.recv().await.unwrap().unwrap();
                assert!(matches!(done, Msg::Done { upto: 1 }), "{done:?}");
                // Ask for the next pull.
                let mut u = conn.open_uni().await.unwrap();
                chartmesh_net::write_frame(&mut u, &Msg::Nudge { upto: None }.encode())
                    .await
                    .unwrap();
                let _ = u.finish();
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(60), responder)
        .await
        .expect("the daemon pulled three times")
        .unwrap();

    blocking(|| {
        wait_until(
            "the legitimate note is applied",
            Duration::from_secs(20),
            || {
                a.cli_json(&["chart", "show", "chart-000002"])
                    .to_string()
                    .contains("a legitimate consult note")
            },
        );
        let after = chart_hashes(&a.export_all());
        for (id, hash) in &before {
            if id != "chart-000002" {
                assert_eq!(&after[id], hash, "{id} changed");
            }
        }
        let c2 = a.cli_json(&["chart", "show", "chart-000002"]).to_string();
        assert!(
            !c2.contains("forged under"),
            "a change under another practice's actor was applied"
        );
        assert!(
            !a.cli_json(&["chart", "show", "chart-000001"])
                .to_string()
                .contains("tampering")
        );
        let refusals = refusals(&a);
        let has = |needle: &str| refusals.iter().any(|r| r.contains(needle));
        assert!(has("read-only"), "{refusals:?}");
        assert!(has("change-under-another-practice"), "{refusals:?}");
        assert!(has("not offered on this stream"), "{refusals:?}");
        assert!(has("handshake"), "{refusals:?}");
        a.cli_ok(&["audit", "verify"]);

        // The daemon still serves a well-behaved peer.
        a.sync_wait(&b, 60);
        b.sync_wait(&a, 60);
        assert_eq!(chart_hashes(&b.export_all()).len(), 1);
    });
}

/// Item 1 of the hardening issue: a 16 MiB `Want`, wants for charts never offered, repeats of
/// a granted chart and streams beyond the limit. Each is refused before it costs memory or an
/// audit row per item; repeated violations close the connection; the daemon stays under
/// 100 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn want_and_stream_floods_are_refused_in_bounded_memory() {
    let (a, h, id_a) = blocking(|| practice_with_raw_peer(3, &[("chart-000001", "read")]));
    let a_addr: std::net::SocketAddr = blocking(|| a.sync_addr()).parse().unwrap();
    let conn = h.connect(a_addr, id_a).await;
    let audit_rows = || blocking(|| a.cli_json(&["audit"])["entries"].as_array().unwrap().len());
    let rows_before = audit_rows();

    // One Want frame of ~15 MB (110,000 items): refused on its length, never decoded.
    {
        let mut s = Stream::open(&conn).await;
        s.send(&pull(0)).await.unwrap();
        let (_, r) = s.recv_until(is_end).await;
        r.unwrap();
        let items: Vec<WantItem> = (0..115_000).map(|i| want(&format!("{i:0>128}"))).collect();
        let big = Msg::Want { items }.encode();
        assert!(big.len() > 14 << 20, "{}", big.len());
        // Refused as soon as its length is read: the write itself may fail midway.
        if s.w.send(&big).await.is_ok() {
            let (_, r) = s.recv_until(|_| false).await;
            assert!(r.is_err(), "the oversized want was not refused");
        }
    }

    // The daemon serves at most two streams of a peer at once; a third is refused.
    {
        let mut s1 = Stream::open(&conn).await;
        s1.send(&pull(0)).await.unwrap();
        let mut s2 = Stream::open(&conn).await;
        s2.send(&pull(0)).await.unwrap();
        let (_, r) = s1.recv_until(is_end).await;
        r.unwrap();
        let (_, r) = s2.recv_until(is_end).await;
        r.unwrap();
        let mut s3 = Stream::open(&conn).await;
        s3.send(&pull(0)).await.unwrap();
        let (msgs, r) = s3.recv_until(|_| false).await;
        assert!(
            msgs.is_empty() && r.is_err(),
            "a third stream was served: {msgs:?}"
        );
        drop((s1, s2));
    }

    // Wants for charts never offered, stream after stream: one audit entry for the kind,
    // and the connection is closed after repeated violations.
    let mut attempts = 0;
    let closed = loop {
        attempts += 1;
        if attempts > 60 {
            break false;
        }
        let Ok((send, recv)) = conn.open_bi().await else {
            break true;
        };
        let mut s = Stream {
            w: chartmesh_net::FrameWriter::new(send),
            r: chartmesh_net::FrameReader::new(recv, 1 << 24),
        };
        if s.send(&pull(0)).await.is_err() {
            break true;
        }
        let (_, r) = s.recv_until(is_end).await;
        if r.is_err() {
            break true;
        }
        let items: Vec<WantItem> = (0..128).map(|i| want(&format!("unknown-{i}"))).collect();
        if s.send(&Msg::Want { items }).await.is_err() {
            break true;
        }
        let _ = s.recv_until(|_| false).await;
    };
    assert!(
        closed,
        "the connection was not closed after {attempts} violations"
    );
    assert!(attempts <= 25, "closed only after {attempts} violations");

    blocking(|| {
        let added = audit_rows() - rows_before;
        // Each kind of violation once (oversized frame, unoffered wants) plus the reads of
        // the audit itself: never one row per item or per attempt.
        assert!(added <= 8, "{added} audit rows for the flood");
        // The violation is audited by a task of its own: wait for it (on a busy machine it
        // can land after the connection is closed).
        wait_until(
            "the protocol violation audited",
            Duration::from_secs(30),
            || {
                let found = refusals(&a).iter().any(|r| r.contains("protocol"));
                if !found {
                    std::thread::sleep(Duration::from_millis(500));
                }
                found
            },
        );
        let rss = peak_rss(a.pid().unwrap());
        assert!(rss < 100 << 20, "peak RSS {} MB", rss >> 20);
        a.cli_ok(&["audit", "verify"]);
    });
}

/// Items 6 and 10: a hostile custodian offers charts under invalid ids, squats an id this
/// practice uses itself, overruns the offer window, and offers tens of thousands of charts it
/// never sends. Invalid ids are refused before anything is stored; the squatted id is filed
/// as the peer's copy beside our own chart; the puller's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_custodian_cannot_plant_bad_ids_squat_ours_or_grow_our_memory() {
    let (a, h, id_a) = blocking(|| practice_with_raw_peer(2, &[]));
    let show = |id: &str| blocking(|| a.cli_json(&["chart", "show", id]));
    let own_before = [show("chart-000001"), show("chart-000002")];
    let a_addr: std::net::SocketAddr = blocking(|| a.sync_addr()).parse().unwrap();
    let conn = h.connect(a_addr, id_a).await;

    // Our own chart of the squatted id, as the hostile practice "shares" it.
    let squat = {
        let json = serde_json::json!({
            "id": "chart-000001", "type": "chart", "schemaVersion": 1, "practiceId": "x",
            "patient": {"mrn": "SQUAT1", "name": {"given": ["Eve"], "family": "Squatter"},
                        "birthDate": "1990-01-01"},
            "createdAt": "2024-01-01T00:00:00Z", "updatedAt": "2024-01-01T00:00:00Z"
        });
        let mut d = ChartDoc::create_from_json(
            &json,
            &ChangeMeta {
                practice: h.id,
                author: "Mallory".into(),
                action: "create".into(),
                time_ms: 1,
            },
        );
        (d.head_bytes(), d.save())
    };

    // Pull 1: invalid ids. Pull 2: more offers than the window allows. Pull 3: the squat.
    // Pull 4: 20,000 charts offered within the window, none ever sent.
    let responder = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let bad = [
                "*",
                "..\\..\\etc",
                "C:\\x",
                "a\u{1b}[31mred",
                "nul\0",
                &"x".repeat(100_000),
            ];
            let mut s = Stream::accept(&conn).await;
            s.recv().await.unwrap().unwrap();
            let items = bad
                .iter()
                .map(|c| OfferItem {
                    chart: c.to_string(),
                    kind: Offered::Shared {
                        digest: 1,
                        access: chartmesh_core::consent::Access::Read,
                        expires_ms: None,
                    },
                })
                .collect();
            let _ = s.send(&Msg::Offer { items }).await;
            let (_, r) = s.recv_until(|_| false).await;
            assert!(r.is_err(), "invalid ids were accepted");

            let mut s = Stream::accept(&conn).await;
            s.recv().await.unwrap().unwrap();
            let mut refused = false;
            for page in 0..6 {
                // Charts it does not hold: each stays unsettled until delivered.
                let items = (0..OFFER_CHUNK)
                    .map(|i| OfferItem {
                        chart: format!("flood-{page}-{i}"),
                        kind: Offered::Shared {
                            digest: 1,
                            access: chartmesh_core::consent::Access::Read,
                            expires_ms: None,
                        },
                    })
                    .collect();
                if s.send(&Msg::Offer { items }).await.is_err() {
                    refused = true;
                    break;
                }
            }
            let (_, r) = s.recv_until(|_| false).await;
            assert!(
                refused || r.is_err(),
                "offers past the window were accepted"
            );

            let mut s = Stream::accept(&conn).await;
            s.recv().await.unwrap().unwrap();
            s.send(&Msg::Offer {
                items: vec![OfferItem {
                    chart: "chart-000001".into(),
                    kind: Offered::Shared {
                        digest: heads_digest(&squat.0),
                        access: chartmesh_core::consent::Access::Read,
                        expires_ms: None,
                    },
                }],
            })
            .await
            .unwrap();
            s.send(&Msg::OfferEnd {
                upto: 3,
                incarnation: 9,
            })
            .await
            .unwrap();
            let w = s.recv().await.unwrap().unwrap();
            assert!(
                matches!(&w, Msg::Want { items } if items.len() == 1 && !items[0].returned),
                "{w:?}"
            );
            s.send(&Msg::Changes {
                items: vec![Delivery {
                    chart: "chart-000001".into(),
                    returned: false,
                    data: Some(squat.1.clone()),
                }],
            })
            .await
            .unwrap();
            assert!(matches!(
                s.recv().await.unwrap(),
                Some(Msg::Done { upto: 3 })
            ));

            // Ask for another pull, and flood it.
            let mut u = conn.open_uni().await.unwrap();
            chartmesh_net::write_frame(&mut u, &Msg::Nudge { upto: None }.encode())
                .await
                .unwrap();
            let _ = u.finish();
            let mut s = Stream::accept(&conn).await;
            s.recv().await.unwrap().unwrap();
            let total = 20_000usize;
            let (mut sent, mut credit, mut wanted, mut ended) = (0usize, 4096usize, 0usize, false);
            loop {
                while sent < total && credit > 0 {
                    let n = credit.min(OFFER_CHUNK).min(total - sent);
                    let items = (sent..sent + n)
                        .map(|i| OfferItem {
                            chart: format!("ghost-{i:06}-{}", "g".repeat(100)),
                            kind: Offered::Shared {
                                digest: i as u64,
                                access: chartmesh_core::consent::Access::Read,
                                expires_ms: None,
                            },
                        })
                        .collect();
                    s.send(&Msg::Offer { items }).await.unwrap();
                    sent += n;
                    credit -= n;
                }
                if sent == total && !ended {
                    s.send(&Msg::OfferEnd {
                        upto: 4,
                        incarnation: 9,
                    })
                    .await
                    .unwrap();
                    ended = true;
                }
                match s.recv().await.unwrap() {
                    Some(Msg::Credit { items }) => credit += items as usize,
                    Some(Msg::Want { items }) => {
                        wanted += items.len();
                        // None of them is ever sent.
                        let items = items
                            .into_iter()
                            .map(|w| Delivery {
                                chart: w.chart,
                                returned: false,
                                data: None,
                            })
                            .collect();
                        s.send(&Msg::Changes { items }).await.unwrap();
                    }
                    Some(Msg::Done { upto }) => {
                        assert_eq!(upto, 4);
                        break;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            wanted
        })
    };
    let wanted = tokio::time::timeout(Duration::from_secs(300), responder)
        .await
        .expect("the daemon pulled four times")
        .unwrap();
    assert_eq!(wanted, 20_000, "every ghost chart was wanted once");

    blocking(|| {
        // Our own chart is untouched; the squatted id is the peer's copy, filed apart.
        for (i, id) in ["chart-000001", "chart-000002"].iter().enumerate() {
            assert_eq!(
                a.cli_json(&["chart", "show", id]),
                own_before[i],
                "{id} changed"
            );
        }
        let mine = a.cli_json(&["chart", "show", "chart-000001"]);
        assert_ne!(mine["patient"]["mrn"], "SQUAT1");
        let copy_key = format!("chart-000001@{}", h.id);
        let copy = a.cli_json(&["chart", "show", &copy_key]);
        assert_eq!(copy["patient"]["mrn"], "SQUAT1");
        // Nothing under an invalid id (or a ghost) was stored: two own charts and one copy.
        assert_eq!(a.get("/status")["charts"], 3);
        let rs = refusals(&a);
        assert!(rs.iter().any(|r| r.contains("invalid chart id")), "{rs:?}");
        assert!(
            rs.iter().any(|r| r.contains("unsettled")),
            "{rs:?}\n{}",
            a.log()
        );
        let rss = peak_rss(a.pid().unwrap());
        assert!(rss < 100 << 20, "peak RSS {} MB", rss >> 20);
    });
}

/// Item 5: a peer's document that decompresses without end (188 bytes holding two million
/// list operations) is refused before it is loaded, as a new copy and as changes to a copy
/// already held; the daemon stays under 100 MB and keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_of_millions_of_operations_is_refused_before_it_is_loaded() {
    let bomb = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../core/tests/fixtures/hostile-2m-list-ops.automerge"),
    )
    .unwrap();
    assert!(bomb.len() < 1024, "{}", bomb.len());
    let (a, h, id_a) = blocking(|| practice_with_raw_peer(1, &[]));
    let a_addr: std::net::SocketAddr = blocking(|| a.sync_addr()).parse().unwrap();
    let conn = h.connect(a_addr, id_a).await;
    let responder = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut s = Stream::accept(&conn).await;
            s.recv().await.unwrap().unwrap();
            s.send(&Msg::Offer {
                items: vec![OfferItem {
                    chart: "bomb-1".into(),
                    kind: Offered::Shared {
                        digest: 77,
                        access: chartmesh_core::consent::Access::Read,
                        expires_ms: None,
                    },
                }],
            })
            .await
            .unwrap();
            s.send(&Msg::OfferEnd {
                upto: 1,
                incarnation: 5,
            })
            .await
            .unwrap();
            let w = s.recv().await.unwrap().unwrap();
            assert!(
                matches!(&w, Msg::Want { items } if items.len() == 1),
                "{w:?}"
            );
            s.send(&Msg::Changes {
                items: vec![Delivery {
                    chart: "bomb-1".into(),
                    returned: false,
                    data: Some(bomb),
                }],
            })
            .await
            .unwrap();
            // The pull completes: the item was settled (refused), nothing is owed.
            assert!(matches!(
                s.recv().await.unwrap(),
                Some(Msg::Done { upto: 1 })
            ));
        })
    };
    tokio::time::timeout(Duration::from_secs(60), responder)
        .await
        .expect("the daemon pulled")
        .unwrap();
    blocking(|| {
        assert_eq!(a.get("/status")["charts"], 1, "the bomb was stored");
        let rs = refusals(&a);
        assert!(
            rs.iter()
                .any(|r| r.contains("bomb-1") && r.contains("operations")),
            "{rs:?}"
        );
        let rss = peak_rss(a.pid().unwrap());
        assert!(rss < 100 << 20, "peak RSS {} MB", rss >> 20);
        a.cli_ok(&["audit", "verify"]);
    });
}
