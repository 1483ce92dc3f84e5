//! The engine's state transitions, driven by hand: no tokio, no sockets, no store. Each test
//! plays the other side (and the store) message by message and checks what the session asks
//! its driver to do.

use super::*;
use crate::consent::{Access, Grant, Purpose};
use crate::ids::PracticeId;

fn ids() -> (PracticeId, PracticeId) {
    let a = PracticeId::from_certificate_der(b"a");
    let b = PracticeId::from_certificate_der(b"b");
    (a, b)
}

fn t(ms: u64) -> Time {
    Time {
        mono_ms: ms,
        wall_ms: 1_000_000 + ms as i64,
    }
}

fn drain(s: &mut PeerSession) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

/// A session of `me` with `peer`, connected (dialled by us), its first pull opened.
fn connected(me: PracticeId, peer: PracticeId) -> (PeerSession, Vec<Output>) {
    let mut s = PeerSession::new(me, peer, PeerRecord::default(), 42, 7, t(0));
    s.handle_timeout(t(0));
    assert_eq!(drain(&mut s), vec![Output::Dial]);
    s.handle_connected(t(1), 1, true);
    let out = drain(&mut s);
    (s, out)
}

fn pull_stream(out: &[Output]) -> StreamId {
    out.iter()
        .find_map(|o| match o {
            Output::Send {
                stream,
                msg: Msg::Pull { .. },
            } => Some(*stream),
            _ => None,
        })
        .expect("a pull was started")
}

fn offer(charts: impl Iterator<Item = String>, digest: u64) -> Msg {
    Msg::Offer {
        items: charts
            .map(|c| OfferItem {
                chart: c,
                kind: Offered::Shared {
                    digest,
                    access: Access::Read,
                    expires_ms: None,
                },
            })
            .collect(),
    }
}

fn query_task(out: &[Output]) -> (TaskId, Query) {
    out.iter()
        .find_map(|o| match o {
            Output::Query { task, query } => Some((*task, query.clone())),
            _ => None,
        })
        .expect("a store query")
}

fn refused(out: &[Output], needle: &str) -> bool {
    out.iter().any(|o| match o {
        Output::Audit(evs) => evs
            .iter()
            .any(|e| e.action == "refuse" && e.detail.as_deref().unwrap_or("").contains(needle)),
        _ => false,
    })
}

#[test]
fn a_connection_starts_a_pull_and_tells_the_peer_what_is_pending() {
    let (a, b) = ids();
    let (_, out) = connected(a, b);
    assert!(matches!(out[0], Output::Open { .. }));
    assert!(matches!(
        out[1],
        Output::Send {
            msg: Msg::Pull {
                version: PROTOCOL_VERSION,
                since: 0,
                incarnation: 0,
                ..
            },
            ..
        }
    ));
    // And the nudge decision is asked of the store.
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Query {
            query: Query::Pending { since: 0 },
            ..
        }
    )));
}

#[test]
fn the_puller_stops_a_responder_that_overruns_the_offer_window() {
    let (a, b) = ids();
    let (mut s, out) = connected(a, b);
    let stream = pull_stream(&out);
    let mut n = 0;
    for page in 0..4 {
        assert!(s.wants_read(stream));
        s.handle_message(
            t(2),
            stream,
            offer((0..OFFER_CHUNK).map(|i| format!("c-{page}-{i}")), 9),
        );
        assert!(!s.wants_read(stream), "reading waits for the lookup");
        let out = drain(&mut s);
        let (task, q) = query_task(&out);
        let Query::Local { keys } = q else { panic!() };
        n += keys.len();
        s.handle_answer(t(3), task, Answer::Local(vec![None; keys.len()]));
        let out = drain(&mut s);
        // Everything is wanted: no credit yet.
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send {
                msg: Msg::Want { .. },
                ..
            }
        )));
        assert!(!out.iter().any(|o| matches!(
            o,
            Output::Send {
                msg: Msg::Credit { .. },
                ..
            }
        )));
    }
    assert_eq!(n, OFFER_WINDOW);
    s.handle_message(t(4), stream, offer((0..1).map(|i| format!("over-{i}")), 9));
    let out = drain(&mut s);
    assert!(out.contains(&Output::Reset { stream }), "{out:?}");
    assert!(refused(&out, "unsettled"), "{out:?}");
    assert!(!s.has_stream(stream));
}

#[test]
fn credit_is_returned_as_offered_items_settle() {
    let (a, b) = ids();
    let (mut s, out) = connected(a, b);
    let stream = pull_stream(&out);
    s.handle_message(
        t(2),
        stream,
        offer((0..OFFER_CHUNK).map(|i| format!("c-{i}")), 9),
    );
    let (task, _) = query_task(&drain(&mut s));
    // All held with the same digest: settled at once, credited.
    let same = LocalChart {
        heads: vec![],
        revoked: false,
        access: Some(Access::Read),
        expires_ms: None,
    };
    // heads_digest(&[]) must equal the offered digest for "same": offer it that way.
    let _ = same;
    s.handle_answer(t(3), task, Answer::Local(vec![None; OFFER_CHUNK]));
    let out = drain(&mut s);
    let wants: Vec<WantItem> = out
        .iter()
        .flat_map(|o| match o {
            Output::Send {
                msg: Msg::Want { items },
                ..
            } => items.clone(),
            _ => vec![],
        })
        .collect();
    assert_eq!(wants.len(), OFFER_CHUNK);
    // Deliver them all as unavailable: settled, and credit goes back.
    s.handle_message(
        t(4),
        stream,
        Msg::Changes {
            items: wants
                .iter()
                .map(|w| Delivery {
                    chart: w.chart.clone(),
                    returned: false,
                    data: None,
                })
                .collect(),
        },
    );
    let out = drain(&mut s);
    assert!(
        out.iter().any(|o| matches!(o, Output::Send { msg: Msg::Credit { items }, .. } if *items as usize == OFFER_CHUNK)),
        "{out:?}"
    );
    // The offer ends: everything settled, the pull completes with Done and a checkpoint.
    s.handle_message(
        t(5),
        stream,
        Msg::OfferEnd {
            upto: 7,
            incarnation: 3,
        },
    );
    let out = drain(&mut s);
    assert!(out.contains(&Output::Send {
        stream,
        msg: Msg::Done { upto: 7 }
    }));
    assert!(out.contains(&Output::Persist(Persist::Checkpoint {
        upto: 7,
        incarnation: 3
    })));
}

fn grant(chart: &str, peer: PracticeId, access: Access, expires: Option<i64>) -> Grant {
    Grant {
        chart_id: chart.into(),
        peer,
        access,
        purpose: Purpose::Continuity,
        expires_ms: expires,
        recorded_by: "admin".into(),
        recorded_ms: 0,
        revoked_ms: None,
    }
}

fn row(key: &str, seq: u64, origin: Option<&str>) -> ChartRow {
    ChartRow {
        key: key.into(),
        chart: crate::ids::split_key(key).0.into(),
        seq,
        heads: vec![[seq as u8; 32]],
        origin: origin.map(str::to_string),
        access: origin.map(|_| Access::ReadWrite),
        expires_ms: None,
        revoked_ms: None,
    }
}

/// The responder side: B pulls from A. Returns A's session and the stream B's pull is on.
fn serving(grants: Vec<Grant>, own: Vec<ChartRow>) -> (PeerSession, StreamId, Vec<Output>) {
    let (a, b) = ids();
    let (mut s, _) = connected(a, b);
    let stream = s.handle_stream_accepted(t(2)).expect("served");
    s.handle_message(
        t(2),
        stream,
        Msg::Pull {
            version: PROTOCOL_VERSION,
            since: 0,
            incarnation: 0,
            wall_ms: None,
        },
    );
    let (task, q) = query_task(&drain(&mut s));
    assert_eq!(q, Query::Candidates { since: 0 });
    s.handle_answer(
        t(3),
        task,
        Answer::Candidates(Candidates {
            upto: 10,
            grants,
            changed_grants: vec![],
            own,
            returned: vec![],
        }),
    );
    let out = drain(&mut s);
    // The driver reports each message written.
    for o in &out {
        if let Output::Send { stream: st, .. } = o {
            s.handle_sent(t(3), *st);
        }
    }
    (s, stream, out)
}

#[test]
fn the_responder_offers_only_what_consent_allows_and_refuses_wants_for_anything_else() {
    let (_, b) = ids();
    let expired = grant("c3", b, Access::Read, Some(1_000_000));
    let (mut s, stream, out) = serving(
        vec![grant("c1", b, Access::Read, None), expired],
        vec![row("c1", 1, None), row("c2", 2, None), row("c3", 3, None)],
    );
    let offered: Vec<String> = out
        .iter()
        .flat_map(|o| match o {
            Output::Send {
                msg: Msg::Offer { items },
                ..
            } => items.iter().map(|i| i.chart.clone()).collect(),
            _ => vec![],
        })
        .collect();
    assert_eq!(offered, vec!["c1"], "only the chart under an active grant");
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            msg: Msg::OfferEnd {
                upto: 10,
                incarnation: 42
            },
            ..
        }
    )));
    // Wanting a chart not offered (granted or not) ends the stream with one refusal.
    s.handle_message(
        t(4),
        stream,
        Msg::Want {
            items: vec![WantItem {
                chart: "c2".into(),
                returned: false,
                have: vec![],
            }],
        },
    );
    let out = drain(&mut s);
    assert!(out.contains(&Output::Reset { stream }));
    assert!(refused(&out, "not offered"), "{out:?}");
}

#[test]
fn a_chart_is_decided_again_when_read_and_too_large_ones_are_unavailable_alone() {
    let (_, b) = ids();
    let (mut s, stream, _) = serving(
        vec![grant("*", b, Access::Read, None)],
        vec![row("c1", 1, None), row("c2", 2, None), row("c3", 3, None)],
    );
    s.handle_message(
        t(4),
        stream,
        Msg::Want {
            items: ["c1", "c2", "c3"]
                .iter()
                .map(|c| WantItem {
                    chart: c.to_string(),
                    returned: false,
                    have: vec![],
                })
                .collect(),
        },
    );
    let (task, q) = query_task(&drain(&mut s));
    let Query::Fetch { items, .. } = q else {
        panic!("{q:?}")
    };
    // Meanwhile c2's grant was revoked (the fetch reads the grants anew), and c3 is too big.
    let mut c2_revoked = grant("c2", b, Access::Read, None);
    c2_revoked.revoked_ms = Some(1);
    let fetched = items
        .into_iter()
        .map(|item| {
            let data = match item.chart.as_str() {
                "c3" => vec![0u8; MAX_CHART_BYTES + 1],
                _ => vec![1, 2, 3],
            };
            Fetched {
                row: Some(row(&item.key, 1, None)),
                item,
                data: Ok(Some(data)),
            }
        })
        .collect();
    s.handle_answer(
        t(5),
        task,
        Answer::Fetched {
            grants: vec![grant("*", b, Access::Read, None), c2_revoked],
            items: fetched,
            rest: vec![],
        },
    );
    let out = drain(&mut s);
    let (msg, audit) = out
        .iter()
        .find_map(|o| match o {
            Output::SendAudited { msg, audit, .. } => Some((msg, audit)),
            _ => None,
        })
        .expect("changes sent after their audit");
    let Msg::Changes { items } = msg else {
        panic!()
    };
    let sent: Vec<(&str, bool)> = items
        .iter()
        .map(|d| (d.chart.as_str(), d.data.is_some()))
        .collect();
    assert_eq!(sent, vec![("c1", true), ("c2", false), ("c3", false)]);
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, vec!["sync-send", "refuse", "refuse"]);
    assert!(audit[2].detail.as_deref().unwrap().contains("over the"));
}

#[test]
fn a_refused_or_silent_connection_backs_off_like_an_unreachable_peer() {
    let (a, b) = ids();
    let mut s = PeerSession::new(a, b, PeerRecord::default(), 1, 7, t(0));
    let mut now = 0;
    let mut waits = Vec::new();
    for i in 0..8u64 {
        s.handle_timeout(t(now));
        assert_eq!(drain(&mut s), vec![Output::Dial], "attempt {i}");
        // The handshake completes, then the peer closes it at once (it has not paired us).
        s.handle_connected(t(now + 1), i + 1, true);
        drain(&mut s);
        s.handle_connection_lost(t(now + 2), i + 1, Closed::Refused);
        let next = s.poll_timeout().expect("a redial is planned");
        waits.push(next - (now + 2));
        now = next;
    }
    // 200 ms doubling to 30 s, each ±25 %.
    assert!(waits[0] >= 150 && waits[0] <= 250, "{waits:?}");
    assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
    assert!(waits[7] >= 19_000, "{waits:?}");
    // A connection on which the peer spoke resets the back-off.
    s.handle_timeout(t(now));
    drain(&mut s);
    s.handle_connected(t(now), 99, true);
    s.handle_control(t(now + 1), Msg::Nudge { upto: None });
    s.handle_connection_lost(t(now + 2), 99, Closed::Lost("timeout".into()));
    assert!(s.poll_timeout().unwrap() - (now + 2) <= 250);
}

#[test]
fn both_sides_keep_the_connection_dialled_by_the_smaller_id() {
    let (a, b) = ids();
    let (small, big) = if a < b { (a, b) } else { (b, a) };
    // At the smaller practice: its own dial is kept, the other's closed as a duplicate.
    let (mut s, _) = connected(small, big);
    s.handle_connected(t(5), 2, false);
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            conn: 2,
            code: CloseCode::Duplicate
        }]
    );
    // At the bigger practice: the smaller's dial replaces its own.
    let (mut s, _) = connected(big, small);
    s.handle_connected(t(5), 2, false);
    let out = drain(&mut s);
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            code: CloseCode::Duplicate
        }
    );
    assert_eq!(s.conn(), Some(2));
}

#[test]
fn a_peer_that_dials_again_replaces_a_connection_it_had_spoken_on() {
    let (a, b) = ids();
    let (small, big) = if a < b { (a, b) } else { (b, a) };
    // The smaller practice holds the connection it dialled, proven; the other restarts and
    // dials: the old one is dead at the other end, so the new one replaces it at once.
    let (mut s, _) = connected(small, big);
    s.handle_control(t(2), Msg::Nudge { upto: None });
    drain(&mut s);
    // Within the first seconds it is the race of two simultaneous dials: kept by the rule.
    s.handle_connected(t(5), 9, false);
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            conn: 9,
            code: CloseCode::Duplicate
        }]
    );
    s.handle_connected(t(10_000), 2, false);
    let out = drain(&mut s);
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            code: CloseCode::Duplicate
        }
    );
    assert_eq!(s.conn(), Some(2));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            msg: Msg::Pull { .. },
            ..
        }
    )));
}

/// The relayed reconnect storm: the peer's relayed connection ended at its end (the relay
/// ends a session's halves independently; the QUIC close went down with the path), so it
/// dials again through the relay while we still hold the old one. Its new connection must
/// replace the old one at once, whoever has the smaller id, however young or silent the old
/// one is: refusing it as a duplicate makes the peer redial every 200 ms until the old one
/// times out here (30 s).
#[test]
fn a_peer_that_dials_again_through_the_relay_replaces_its_older_relayed_connection() {
    let (a, b) = ids();
    for (me, peer) in [(a, b), (b, a)] {
        for spoken in [false, true] {
            for age in [5, 400, 4_000, 20_000] {
                let mut s = PeerSession::new(me, peer, PeerRecord::default(), 42, 7, t(0));
                s.handle_connected_via(t(1), 1, false, true);
                if spoken {
                    s.handle_control(t(2), Msg::Nudge { upto: None });
                }
                drain(&mut s);
                s.handle_connected_via(t(1 + age), 2, false, true);
                let out = drain(&mut s);
                let case = format!("smaller={} spoken={spoken} age={age}", me < peer);
                assert_eq!(
                    out.first(),
                    Some(&Output::Close {
                        conn: 1,
                        code: CloseCode::Duplicate
                    }),
                    "{case}: {out:?}"
                );
                assert!(
                    !out.iter()
                        .any(|o| matches!(o, Output::Close { conn: 2, .. })),
                    "{case}: {out:?}"
                );
                assert_eq!((s.conn(), s.relayed()), (Some(2), Some(true)), "{case}");
                // And the sync starts on the new one.
                assert!(
                    out.iter().any(|o| matches!(
                        o,
                        Output::Send {
                            msg: Msg::Pull { .. },
                            ..
                        }
                    )),
                    "{case}: {out:?}"
                );
            }
        }
    }
    // Two connections dialled at once from both ends keep the tie-break: the peer's second
    // relayed dial replaces only a connection it dialled itself, never ours.
    let (small, big) = if a < b { (a, b) } else { (b, a) };
    let mut s = PeerSession::new(small, big, PeerRecord::default(), 42, 7, t(0));
    s.handle_timeout(t(0));
    assert_eq!(drain(&mut s), vec![Output::Dial]);
    s.handle_connected_via(t(1), 1, true, true);
    drain(&mut s);
    s.handle_connected_via(t(5), 2, false, true);
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            conn: 2,
            code: CloseCode::Duplicate
        }]
    );
    assert_eq!(s.conn(), Some(1));
}

/// A side whose connections the peer keeps closing as duplicates before a word is spoken
/// on them backs off like a failed dial (200 ms doubling), instead of redialling every
/// 200 ms; one spoken on first redials within 250 ms.
#[test]
fn connections_refused_as_duplicates_back_off() {
    let (a, b) = ids();
    let mut s = PeerSession::new(a, b, PeerRecord::default(), 1, 7, t(0));
    let mut now = 0;
    let mut waits = Vec::new();
    for i in 0..8u64 {
        s.handle_timeout(t(now));
        assert_eq!(drain(&mut s), vec![Output::Dial], "attempt {i}");
        s.handle_connected_via(t(now + 1), i + 1, true, true);
        drain(&mut s);
        s.handle_connection_lost(t(now + 2), i + 1, Closed::Duplicate);
        let next = s.poll_timeout().expect("a redial is planned");
        waits.push(next - (now + 2));
        now = next;
    }
    assert!(waits[0] >= 150 && waits[0] <= 250, "{waits:?}");
    assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
    assert!(waits[5] >= 4_800, "{waits:?}");
    // In 8 refusals the redials are spread over more than 20 s, not 1.6 s.
    assert!(waits.iter().sum::<u64>() >= 20_000, "{waits:?}");
    s.handle_timeout(t(now));
    drain(&mut s);
    s.handle_connected_via(t(now), 99, true, true);
    s.handle_control(t(now + 1), Msg::Nudge { upto: None });
    drain(&mut s);
    s.handle_connection_lost(t(now + 2), 99, Closed::Duplicate);
    assert!(s.poll_timeout().unwrap() - (now + 2) <= 250);
}

#[test]
fn a_rolled_back_responder_is_pulled_again_from_nothing() {
    let (a, b) = ids();
    let record = PeerRecord {
        checkpoint: 50,
        checkpoint_incarnation: 9,
        served_upto: 0,
        last_pull_ms: None,
    };
    let mut s = PeerSession::new(a, b, record, 42, 7, t(0));
    s.handle_timeout(t(0));
    drain(&mut s);
    s.handle_connected(t(1), 1, true);
    let out = drain(&mut s);
    let stream = pull_stream(&out);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            msg: Msg::Pull {
                since: 50,
                incarnation: 9,
                ..
            },
            ..
        }
    )));
    // Same incarnation, but it ends before our checkpoint: it was rolled back unknowingly.
    s.handle_message(
        t(2),
        stream,
        Msg::OfferEnd {
            upto: 40,
            incarnation: 9,
        },
    );
    let out = drain(&mut s);
    assert!(out.contains(&Output::Persist(Persist::Checkpoint {
        upto: 0,
        incarnation: 9
    })));
    s.handle_timeout(t(2 + session::PULL_RETRY_MS));
    let out = drain(&mut s);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Send {
                msg: Msg::Pull { since: 0, .. },
                ..
            }
        )),
        "{out:?}"
    );
}

#[test]
fn a_responder_asked_from_past_its_sequence_takes_a_new_incarnation() {
    let (a, b) = ids();
    let (mut s, _) = connected(a, b);
    let stream = s.handle_stream_accepted(t(2)).unwrap();
    s.handle_message(
        t(2),
        stream,
        Msg::Pull {
            version: PROTOCOL_VERSION,
            since: 100,
            incarnation: 42,
            wall_ms: None,
        },
    );
    let (task, _) = query_task(&drain(&mut s));
    s.handle_answer(
        t(3),
        task,
        Answer::Candidates(Candidates {
            upto: 60,
            ..Default::default()
        }),
    );
    let out = drain(&mut s);
    let inc = out
        .iter()
        .find_map(|o| match o {
            Output::Persist(Persist::NewIncarnation { incarnation }) => Some(*incarnation),
            _ => None,
        })
        .expect("a new incarnation");
    assert_ne!(inc, 42);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Query {
            query: Query::Candidates { since: 0 },
            ..
        }
    )));
    assert_eq!(s.incarnation(), inc);
}

#[test]
fn decoding_refuses_bad_ids_long_lists_and_too_many_heads() {
    let bad_id = Msg::Offer {
        items: vec![OfferItem {
            chart: "../x".into(),
            kind: Offered::Revoked,
        }],
    };
    assert!(Msg::decode(&bad_id.encode(), MAX_MESSAGE).is_err());
    let heads = Msg::Want {
        items: vec![WantItem {
            chart: "c".into(),
            returned: false,
            have: vec![[0; 32]; MAX_HEADS + 1],
        }],
    };
    assert!(Msg::decode(&heads.encode(), MAX_REQUEST).is_err());
    let long = Msg::Want {
        items: (0..WANT_CHUNK + 1)
            .map(|i| WantItem {
                chart: format!("c{i}"),
                returned: false,
                have: vec![],
            })
            .collect(),
    };
    assert!(Msg::decode(&long.encode(), MAX_REQUEST).is_err());
    let ok = Msg::Done { upto: 3 };
    assert_eq!(Msg::decode(&ok.encode(), 64).unwrap(), ok);
    assert!(Msg::decode(&[0u8; 100], 64).is_err());
}

/// A `Pull` carries the puller's wall clock; one from a build before that field (its bytes
/// end after the incarnation) still decodes, without it, and an older build reads a new one.
#[test]
fn a_pull_carries_the_wall_clock_and_one_without_it_still_decodes() {
    let (a, b) = ids();
    let (_, sent) = connected(a, b);
    let pull = sent
        .iter()
        .find_map(|o| match o {
            Output::Send {
                msg: m @ Msg::Pull { .. },
                ..
            } => Some(m.clone()),
            _ => None,
        })
        .expect("a pull");
    assert!(
        matches!(pull, Msg::Pull { wall_ms: Some(w), .. } if w == t(1).wall_ms),
        "{pull:?}"
    );
    let bytes = pull.encode();
    assert_eq!(Msg::decode(&bytes, MAX_REQUEST).unwrap(), pull);

    // What a build before the field sends: the same variant, three fields.
    #[derive(serde::Serialize)]
    enum OldMsg {
        Pull {
            version: u32,
            since: u64,
            incarnation: u64,
        },
    }
    let old = postcard::to_stdvec(&OldMsg::Pull {
        version: PROTOCOL_VERSION,
        since: 5,
        incarnation: 9,
    })
    .unwrap();
    assert_eq!(
        Msg::decode(&old, MAX_REQUEST).unwrap(),
        Msg::Pull {
            version: PROTOCOL_VERSION,
            since: 5,
            incarnation: 9,
            wall_ms: None
        }
    );
    // And what an older build reads of a new one: its three fields, the rest ignored.
    #[derive(Debug, serde::Deserialize, PartialEq)]
    enum OldIn {
        Pull {
            version: u32,
            since: u64,
            incarnation: u64,
        },
    }
    let new = Msg::Pull {
        version: PROTOCOL_VERSION,
        since: 5,
        incarnation: 9,
        wall_ms: Some(-3),
    }
    .encode();
    assert_eq!(
        postcard::from_bytes::<OldIn>(&new).unwrap(),
        OldIn::Pull {
            version: PROTOCOL_VERSION,
            since: 5,
            incarnation: 9
        }
    );
}

// ---- direct over relayed, and hole punching ----

fn relayed_session(me: PracticeId, peer: PracticeId) -> PeerSession {
    let mut s = PeerSession::new(me, peer, PeerRecord::default(), 42, 7, t(0));
    s.set_local_candidates(t(0), vec!["203.0.113.7:7361".parse().unwrap()]);
    s.handle_timeout(t(0));
    assert_eq!(drain(&mut s), vec![Output::Dial]);
    s
}

fn punches(out: &[Output]) -> Vec<Vec<std::net::SocketAddr>> {
    out.iter()
        .filter_map(|o| match o {
            Output::Punch { addrs } => Some(addrs.clone()),
            _ => None,
        })
        .collect()
}

fn sent_candidates(out: &[Output]) -> Vec<Vec<std::net::SocketAddr>> {
    out.iter()
        .filter_map(|o| match o {
            Output::Control {
                msg: Msg::Candidates { addrs },
            } => Some(addrs.clone()),
            _ => None,
        })
        .collect()
}

/// Both practices see the same connections (who dialled each, and whether it is relayed),
/// in their own orders of arrival, and must end up keeping the same one.
#[test]
fn both_sides_keep_a_direct_connection_over_a_relayed_one_and_agree_on_which() {
    let (a, b) = ids();
    // A connection as both see it: (dialled by a?, relayed?).
    let conns = [(true, true), (false, true), (true, false), (false, false)];
    // Every order of arrival at each side (within the first seconds, as in a punch).
    let orders: Vec<Vec<usize>> = vec![
        vec![0, 2],
        vec![2, 0],
        vec![0, 1, 2, 3],
        vec![1, 0, 3, 2],
        vec![0, 3, 2],
        vec![1, 2, 3],
        vec![3, 2, 1, 0],
        vec![0, 1],
        vec![2, 3],
        vec![3, 2],
    ];
    for oa in &orders {
        for ob in orders.iter().filter(|o| {
            let mut x = (*o).clone();
            let mut y = oa.clone();
            x.sort();
            y.sort();
            x == y
        }) {
            let mut kept = Vec::new();
            for (me, peer, order) in [(a, b, oa), (b, a, ob)] {
                let mut s = PeerSession::new(me, peer, PeerRecord::default(), 42, 7, t(0));
                for (n, &c) in order.iter().enumerate() {
                    let (by_a, relayed) = conns[c];
                    let dialed = by_a == (me == a);
                    s.handle_connected_via(t(10 + n as u64), c as u64 + 1, dialed, relayed);
                }
                kept.push(s.conn());
            }
            assert_eq!(kept[0], kept[1], "orders {oa:?} / {ob:?}");
            let k = kept[0].unwrap() as usize - 1;
            // A direct one is kept whenever there is one.
            assert!(
                !conns[k].1 || oa.iter().all(|&c| conns[c].1),
                "orders {oa:?}: kept relayed {k}"
            );
        }
    }
}

#[test]
fn a_direct_connection_replaces_the_relayed_one_and_the_pull_resumes_from_its_checkpoint() {
    let (a, b) = ids();
    let record = PeerRecord {
        checkpoint: 40,
        checkpoint_incarnation: 9,
        ..Default::default()
    };
    let mut s = PeerSession::new(a, b, record, 42, 7, t(0));
    s.handle_timeout(t(0));
    drain(&mut s);
    s.handle_connected_via(t(1), 1, true, true);
    assert_eq!(s.relayed(), Some(true));
    let out = drain(&mut s);
    let first = pull_stream(&out);
    s.handle_message(t(2), first, offer((0..3).map(|i| format!("c{i}")), 1));
    drain(&mut s);
    // The punched connection arrives (accepted): the relayed one is closed, and a new pull
    // starts from the same checkpoint (what was applied meanwhile compares equal by digest
    // and is not wanted again).
    s.handle_connected_via(t(3), 2, false, false);
    let out = drain(&mut s);
    assert_eq!(
        out[0],
        Output::Close {
            conn: 1,
            code: CloseCode::Duplicate
        }
    );
    assert_eq!((s.conn(), s.relayed()), (Some(2), Some(false)));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            msg: Msg::Pull {
                since: 40,
                incarnation: 9,
                ..
            },
            stream
        } if *stream != first
    )));
    // A late relayed connection does not replace it.
    s.handle_connected_via(t(4), 3, true, true);
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            conn: 3,
            code: CloseCode::Duplicate
        }]
    );
    // The direct path dies: back to dialling (the driver's routes: the relay).
    s.handle_connection_lost(t(5), 2, Closed::Lost("idle".into()));
    assert_eq!(s.conn(), None);
    let at = s.poll_timeout().unwrap();
    s.handle_timeout(t(at));
    assert_eq!(drain(&mut s), vec![Output::Dial]);
}

#[test]
fn candidates_are_exchanged_over_the_relay_and_punching_is_rate_limited() {
    let (a, b) = ids();
    let (small, big) = if a < b { (a, b) } else { (b, a) };
    let peer_addrs: Vec<std::net::SocketAddr> = vec![
        "198.51.100.9:7361".parse().unwrap(),
        "192.168.20.2:7361".parse().unwrap(),
    ];
    for (me, peer, leader) in [(small, big, true), (big, small, false)] {
        let mut s = relayed_session(me, peer);
        s.handle_connected_via(t(1), 1, true, true);
        let out = drain(&mut s);
        assert_eq!(
            sent_candidates(&out),
            vec![vec!["203.0.113.7:7361".parse().unwrap()]],
            "our candidates go to the peer as soon as we are relayed"
        );
        assert!(punches(&out).is_empty(), "nothing to dial yet");
        // Its candidates arrive: dial exactly them, at once.
        s.handle_control(
            t(100),
            Msg::Candidates {
                addrs: peer_addrs.clone(),
            },
        );
        assert_eq!(punches(&drain(&mut s)), vec![peer_addrs.clone()]);
        // Again at once (a hostile or chatty peer): no dial until the interval has passed.
        s.handle_control(
            t(200),
            Msg::Candidates {
                addrs: peer_addrs.clone(),
            },
        );
        assert!(punches(&drain(&mut s)).is_empty());
        assert!(s.poll_timeout().unwrap() <= 100 + PUNCH_MIN_MS);
        s.handle_timeout(t(100 + PUNCH_MIN_MS));
        assert_eq!(punches(&drain(&mut s)), vec![peer_addrs.clone()]);
        // Still relayed later: the smaller id starts another round (its candidates again,
        // so the other dials at the same moment) and dials; the other waits for it.
        s.handle_timeout(t(1 + PUNCH_RETRY_MS));
        let out = drain(&mut s);
        assert_eq!(!sent_candidates(&out).is_empty(), leader);
        assert_eq!(!punches(&out).is_empty(), leader);
        // A new public address (a new STUN answer) is sent at once.
        s.set_local_candidates(t(9_000), vec!["203.0.113.7:40000".parse().unwrap()]);
        assert_eq!(
            sent_candidates(&drain(&mut s)),
            vec![vec!["203.0.113.7:40000".parse().unwrap()]]
        );
        // Once direct, candidates are neither sent nor dialled.
        s.handle_connected_via(t(10_000), 2, false, false);
        drain(&mut s);
        s.handle_control(
            t(20_000),
            Msg::Candidates {
                addrs: peer_addrs.clone(),
            },
        );
        s.set_local_candidates(t(20_000), vec!["203.0.113.7:40001".parse().unwrap()]);
        s.handle_timeout(t(100_000));
        let out = drain(&mut s);
        assert!(
            punches(&out).is_empty() && sent_candidates(&out).is_empty(),
            "{out:?}"
        );
    }
}

#[test]
fn candidate_messages_are_bounded_and_only_dialable_addresses_pass() {
    let v6: Vec<std::net::SocketAddr> = (0..MAX_CANDIDATES)
        .map(|i| {
            format!("[2001:db8::{i}:ffff:ffff:ffff]:65535")
                .parse()
                .unwrap()
        })
        .collect();
    let m = Msg::Candidates { addrs: v6.clone() };
    let bytes = m.encode();
    assert!(bytes.len() <= MAX_CONTROL, "{} bytes", bytes.len());
    assert_eq!(Msg::decode(&bytes, MAX_CONTROL).unwrap(), m);
    let mut nine = v6.clone();
    nine.push("198.51.100.1:1".parse().unwrap());
    assert!(Msg::decode(&Msg::Candidates { addrs: nine }.encode(), MAX_CONTROL).is_err());
    for bad in [
        "127.0.0.1:7361",
        "0.0.0.0:7361",
        "198.51.100.1:0",
        "224.0.0.251:5353",
        "255.255.255.255:7361",
        "240.0.0.3:1025",
        "[::1]:7361",
        "[::]:7361",
        "[ff02::1]:7361",
        "[::ffff:127.0.0.1]:7361",
    ] {
        let m = Msg::Candidates {
            addrs: vec![bad.parse().unwrap()],
        };
        assert!(Msg::decode(&m.encode(), MAX_CONTROL).is_err(), "{bad}");
    }
    for good in ["192.168.1.10:7361", "10.77.1.2:7361", "[2001:db8::1]:7361"] {
        assert!(dialable(&good.parse().unwrap()), "{good}");
    }
}

/// A nudge that arrives while a pull runs asks for another pull only if that pull does not
/// cover what the nudge announced (the nudge a peer sends as the connection opens used to
/// cost a second, empty pull each time). A nudge from an older build (no `upto`) or of
/// another incarnation still asks for one.
#[test]
fn a_nudge_covered_by_the_running_pull_asks_for_no_second_pull() {
    let (a, b) = ids();
    let cases: [(Option<(u64, u64)>, bool); 4] = [
        (Some((7, 3)), false),
        (Some((9, 3)), true),
        (Some((7, 4)), true),
        (None, true),
    ];
    for (nudge, pulls_again) in cases {
        let (mut s, out) = connected(a, b);
        let stream = pull_stream(&out);
        s.handle_control(t(2), Msg::Nudge { upto: nudge });
        assert!(
            !drain(&mut s).iter().any(|o| matches!(
                o,
                Output::Send {
                    msg: Msg::Pull { .. },
                    ..
                }
            )),
            "one pull at a time"
        );
        s.handle_message(
            t(3),
            stream,
            Msg::OfferEnd {
                upto: 7,
                incarnation: 3,
            },
        );
        let out = drain(&mut s);
        assert!(
            out.contains(&Output::Send {
                stream,
                msg: Msg::Done { upto: 7 }
            }),
            "{out:?}"
        );
        let again = out.iter().any(|o| {
            matches!(
                o,
                Output::Send {
                    msg: Msg::Pull { since: 7, .. },
                    ..
                }
            )
        });
        assert_eq!(again, pulls_again, "nudge {nudge:?}: {out:?}");
        assert_eq!(s.status().pulled, !pulls_again, "nudge {nudge:?}");
    }

    // The nudge says what it covers: the sequence its pending check read.
    let (mut s, out) = connected(a, b);
    let task = out
        .iter()
        .find_map(|o| match o {
            Output::Query {
                task,
                query: Query::Pending { .. },
            } => Some(*task),
            _ => None,
        })
        .expect("a pending check at connect");
    s.handle_answer(
        t(2),
        task,
        Answer::Pending {
            pending: true,
            upto: 12,
        },
    );
    let out = drain(&mut s);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Control {
                msg: Msg::Nudge {
                    upto: Some((12, _))
                }
            }
        )),
        "{out:?}"
    );
    // On the wire it decodes to itself; a nudge of a build before the field still decodes.
    let n = Msg::Nudge {
        upto: Some((12, 5)),
    };
    assert_eq!(Msg::decode(&n.encode(), MAX_REQUEST).unwrap(), n);
    #[derive(serde::Serialize)]
    #[allow(dead_code)]
    enum OldMsg {
        Pull,
        Unsupported,
        Offer,
        OfferEnd,
        Credit,
        Want,
        Changes,
        Done,
        Nudge,
    }
    let old = postcard::to_stdvec(&OldMsg::Nudge).unwrap();
    assert_eq!(
        Msg::decode(&old, MAX_REQUEST).unwrap(),
        Msg::Nudge { upto: None }
    );
}
