//! A hostile paired peer: a test client holding a paired certificate that speaks the sync
//! protocol directly to a real daemon. It asks for charts it was not granted, sends changes to
//! a read-only chart and under another practice's actor, sends garbage and oversized frames
//! and replays old messages. The daemon refuses, audits every refusal, keeps its data and keeps
//! serving others. An unpaired certificate cannot complete the handshake at all.

use chartmesh_core::chart::{Entry, Note};
use chartmesh_core::sync::{
    Delivery, MAX_MESSAGE, Msg, OfferItem, Offered, WantItem, heads_digest,
};
use chartmesh_core::{ChangeMeta, ChartDoc, PracticeId};
use chartmesh_net::{Credentials, Endpoint, FrameReader, FrameWriter, PinSet};
use chartmesh_tests::*;
use std::time::Duration;

fn creds() -> (Credentials, PracticeId) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["chartmesh".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().to_vec();
    (
        Credentials {
            cert_der: der.clone(),
            key_der: key.serialize_der(),
        },
        PracticeId::from_certificate_der(&der),
    )
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn request(conn: &chartmesh_net::quinn::Connection, msgs: &[Msg]) -> Vec<Msg> {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, MAX_MESSAGE);
    for m in msgs {
        w.send(&m.encode()).await.unwrap();
    }
    let mut out = Vec::new();
    let want_changes = msgs.iter().any(|m| matches!(m, Msg::Want { .. }));
    while let Ok(Some(b)) = tokio::time::timeout(Duration::from_secs(10), r.recv())
        .await
        .unwrap()
    {
        let m = Msg::decode(&b).unwrap();
        let last = matches!(m, Msg::Changes { .. })
            || (!want_changes && matches!(m, Msg::OfferEnd { .. }));
        out.push(m);
        if last {
            break;
        }
    }
    let _ = w.finish().await;
    out
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_is_refused_and_audited_and_others_are_still_served() {
    let (a, b) = blocking(|| {
        let a = Practice::new("Valley Clinic");
        let b = Practice::new("Ridge Cardiology");
        let text: String = std::fs::read_to_string(bench_data().join("charts-1000.jsonl"))
            .unwrap()
            .lines()
            .take(6)
            .collect::<Vec<_>>()
            .join("\n");
        let f = a.dir.with_extension("6.jsonl");
        std::fs::write(&f, text).unwrap();
        a.cli_ok(&["import", f.to_str().unwrap()]);
        pair(&a, &b);
        (a, b)
    });
    let (hc, hid) = creds();
    let id_a: PracticeId = blocking(|| a.id()).parse().unwrap();
    let dead = format!("127.0.0.1:{}", free_udp_port());
    blocking(|| {
        a.cli_ok(&[
            "peer",
            "add",
            &hid.to_string(),
            "--addr",
            &dead,
            "--name",
            "Mallory",
        ]);
        a.cli_ok(&[
            "share",
            "chart-000001",
            "--with",
            &hid.to_string(),
            "--access",
            "read",
        ]);
        a.cli_ok(&[
            "share",
            "chart-000002",
            "--with",
            &hid.to_string(),
            "--access",
            "read-write",
        ]);
        a.cli_ok(&[
            "share",
            "chart-000006",
            "--with",
            &b.id(),
            "--access",
            "read",
        ]);
    });
    let before = blocking(|| chart_hashes(&a.export_all()));
    let a_addr: std::net::SocketAddr = blocking(|| a.sync_addr()).parse().unwrap();

    // An unpaired certificate cannot complete the handshake.
    let (uc, _) = creds();
    let stranger =
        Endpoint::bind("127.0.0.1:0".parse().unwrap(), &uc, PinSet::new([id_a])).unwrap();
    if let Ok(pc) = stranger.connect(a_addr, id_a).await {
        // TLS 1.3: the client may finish its side before the server's refusal arrives; the
        // connection is then closed by the server and cannot carry a request.
        let attempt = async {
            let (send, recv) = pc.connection.open_bi().await.map_err(|e| e.to_string())?;
            let mut w = FrameWriter::new(send);
            w.send(
                &Msg::Pull {
                    version: 1,
                    since: 0,
                }
                .encode(),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut r = FrameReader::new(recv, MAX_MESSAGE);
            r.recv()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("ended".to_string())
        };
        let r = tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .expect("refused promptly");
        assert!(r.is_err(), "an unpaired practice got an answer");
    }

    let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &hc, PinSet::new([id_a])).unwrap();
    let pc = ep
        .connect(a_addr, id_a)
        .await
        .expect("the paired peer connects");
    let conn = pc.connection;

    // The offer names only the granted charts.
    let offer = request(
        &conn,
        &[Msg::Pull {
            version: 1,
            since: 0,
        }],
    )
    .await;
    let offered: Vec<String> = offer
        .iter()
        .flat_map(|m| match m {
            Msg::Offer { items } => items.iter().map(|i| i.chart.clone()).collect(),
            _ => vec![],
        })
        .collect();
    assert_eq!(
        offered,
        vec!["chart-000001".to_string(), "chart-000002".to_string()]
    );

    // Asking for charts it was not granted: answered exactly like an unknown chart.
    let got = request(
        &conn,
        &[
            Msg::Pull {
                version: 1,
                since: 0,
            },
            Msg::Want {
                items: vec![
                    WantItem {
                        chart: "chart-000003".into(),
                        have: vec![],
                    },
                    WantItem {
                        chart: "chart-000006".into(),
                        have: vec![],
                    },
                    WantItem {
                        chart: "no-such-chart".into(),
                        have: vec![],
                    },
                    WantItem {
                        chart: "chart-000001".into(),
                        have: vec![],
                    },
                    WantItem {
                        chart: "chart-000002".into(),
                        have: vec![],
                    },
                ],
            },
        ],
    )
    .await;
    let deliveries: Vec<Delivery> = got
        .into_iter()
        .flat_map(|m| match m {
            Msg::Changes { items } => items,
            _ => vec![],
        })
        .collect();
    assert_eq!(deliveries.len(), 5);
    for d in &deliveries[..3] {
        assert_eq!(d.data, None, "{} was disclosed", d.chart);
    }
    let doc1 = deliveries[3].data.clone().expect("granted chart delivered");
    let doc2 = deliveries[4].data.clone().expect("granted chart delivered");

    // A replayed request is answered the same way and changes nothing.
    let again = request(
        &conn,
        &[
            Msg::Pull {
                version: 1,
                since: 0,
            },
            Msg::Want {
                items: vec![WantItem {
                    chart: "chart-000003".into(),
                    have: vec![],
                }],
            },
        ],
    )
    .await;
    assert!(
        again
            .iter()
            .any(|m| matches!(m, Msg::Changes { items } if items[0].data.is_none()))
    );

    // Garbage, a wrong first message, a future version and an oversized frame: each stream
    // is refused, the connection and the daemon carry on.
    {
        let (mut s, _r) = conn.open_bi().await.unwrap();
        s.write_all(&[0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9])
            .await
            .unwrap();
        let _ = s.finish();
    }
    {
        let (send, _r) = conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        w.send(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap();
        w.send(&Msg::Done { upto: 99 }.encode()).await.unwrap();
    }
    {
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        w.send(
            &Msg::Pull {
                version: 99,
                since: 0,
            }
            .encode(),
        )
        .await
        .unwrap();
        let mut r = FrameReader::new(recv, MAX_MESSAGE);
        let m = Msg::decode(&r.recv().await.unwrap().unwrap()).unwrap();
        assert_eq!(m, Msg::Unsupported { version: 1 });
    }
    {
        let (send, _r) = conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        // Announce a frame over the limit (the writer refuses to send one, so forge it).
        let mut raw = vec![];
        raw.extend(((MAX_MESSAGE + 1) as u32).to_be_bytes());
        let _ = w.send(&raw).await;
    }

    // Changes from the hostile peer, offered when the daemon pulls from it: to a read-only
    // chart, and to a read-write chart but written under the daemon's own actor. Then one
    // legitimate change, to show the refusals were for cause.
    let mut d1 = ChartDoc::load(&doc1, []).unwrap();
    let h1 = d1.head_bytes();
    let (e, m) = note_by(hid, "tampering with a read-only chart");
    d1.append(&e, &m).unwrap();
    let bad_readonly = d1.changes_after(&h1);
    let mut d2 = ChartDoc::load(&doc2, []).unwrap();
    let h2 = d2.head_bytes();
    let (e, m) = note_by(id_a, "forged under the custodian's actor");
    d2.append(&e, &m).unwrap();
    let bad_actor = d2.changes_after(&h2);
    let mut d3 = ChartDoc::load(&doc2, []).unwrap();
    let (e, m) = note_by(hid, "a legitimate consult note");
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
                let (send, recv) = conn.accept_bi().await.unwrap();
                let mut w = FrameWriter::new(send);
                let mut r = FrameReader::new(recv, MAX_MESSAGE);
                let pull = Msg::decode(&r.recv().await.unwrap().unwrap()).unwrap();
                assert!(matches!(pull, Msg::Pull { .. }));
                let items = script
                    .iter()
                    .map(|(c, heads, _)| OfferItem {
                        chart: c.to_string(),
                        kind: Offered::Returned {
                            digest: heads_digest(heads),
                        },
                    })
                    .collect();
                w.send(&Msg::Offer { items }.encode()).await.unwrap();
                w.send(&Msg::OfferEnd { upto: 1 }.encode()).await.unwrap();
                let want = Msg::decode(&r.recv().await.unwrap().unwrap()).unwrap();
                assert!(matches!(want, Msg::Want { .. }));
                let items = script
                    .into_iter()
                    .map(|(c, _, data)| Delivery {
                        chart: c.to_string(),
                        data: Some(data),
                    })
                    .collect();
                w.send(&Msg::Changes { items }.encode()).await.unwrap();
                let done = Msg::decode(&r.recv().await.unwrap().unwrap()).unwrap();
                assert!(matches!(done, Msg::Done { .. }));
                // Ask for the next pull.
                let mut u = conn.open_uni().await.unwrap();
                chartmesh_net::write_frame(&mut u, &Msg::Nudge.encode())
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
        for (id, h) in &before {
            if id != "chart-000002" {
                assert_eq!(&after[id], h, "{id} changed");
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
        let audit = a.cli_json(&["audit"]);
        let entries = audit["entries"].as_array().unwrap();
        let refusals: Vec<String> = entries
            .iter()
            .filter(|e| e["action"] == "refuse")
            .map(|e| format!("{} {}", e["chart_id"], e["detail"]))
            .collect();
        let has = |needle: &str| refusals.iter().any(|r| r.contains(needle));
        assert!(has("chart-000003"), "{refusals:?}");
        assert!(has("chart-000006"), "{refusals:?}");
        assert!(has("read-only"), "{refusals:?}");
        assert!(has("change-under-another-practice"), "{refusals:?}");
        assert!(has("protocol"), "{refusals:?}");
        assert!(has("handshake"), "{refusals:?}");
        a.cli_ok(&["audit", "verify"]);

        // The daemon still serves a well-behaved peer.
        a.sync_wait(&b, 60);
        b.sync_wait(&a, 60);
        assert_eq!(chart_hashes(&b.export_all()).len(), 1);
    });
}
