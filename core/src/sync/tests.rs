//! The puller against a simulated responder holding real automerge documents: complete
//! pulls, no-op pulls, interruption after every step, duplicated and reordered messages.

use super::*;
use crate::chart::{Entry, Note};
use crate::consent::Access;
use crate::doc::{ChangeMeta, ChartDoc};
use crate::ids::PracticeId;
use std::collections::{BTreeMap, HashMap};

fn meta(p: &PracticeId, t: i64) -> ChangeMeta {
    ChangeMeta {
        practice: *p,
        author: "Dr. Test".into(),
        action: "test".into(),
        time_ms: t,
    }
}

fn chart_json(i: usize) -> serde_json::Value {
    serde_json::json!({
        "id": format!("chart-{i:06}"), "type": "chart", "schemaVersion": 1, "practiceId": "p",
        "patient": {"mrn": format!("MRN{i}"), "name": {"given": ["A"], "family": "B"},
                    "birthDate": "2000-01-01", "sex": "female"},
        "conditions": [], "medications": [], "observations": [], "notes": [],
        "createdAt": "2021-07-03T11:45:00Z", "updatedAt": "2021-07-03T11:45:00Z"
    })
}

fn note(i: usize) -> Entry {
    Entry::Note(Note {
        id: format!("n{i}"),
        author: "Dr. Test".into(),
        date: "2024-01-01T00:00:00Z".into(),
        text: format!("note {i}"),
        ..Default::default()
    })
}

/// The responder's side: its documents and change sequence.
struct Responder {
    docs: BTreeMap<String, (ChartDoc, u64)>,
    seq: u64,
    practice: PracticeId,
}

impl Responder {
    fn new(n: usize) -> Responder {
        let practice = PracticeId::from_certificate_der(b"a");
        let mut r = Responder {
            docs: BTreeMap::new(),
            seq: 0,
            practice,
        };
        for i in 0..n {
            r.seq += 1;
            let doc = ChartDoc::create_from_json(&chart_json(i), &meta(&practice, 1));
            r.docs.insert(format!("chart-{i:06}"), (doc, r.seq));
        }
        r
    }

    fn edit(&mut self, id: &str, n: usize) {
        self.seq += 1;
        let (doc, seq) = self.docs.get_mut(id).unwrap();
        doc.append(&note(n), &meta(&self.practice, 2)).unwrap();
        *seq = self.seq;
    }

    fn answer(&mut self, msg: &Msg) -> Vec<Msg> {
        match msg {
            Msg::Pull { since, .. } => {
                let mut items = Vec::new();
                for (id, (doc, seq)) in self.docs.iter_mut() {
                    if *seq > *since {
                        items.push(OfferItem {
                            chart: id.clone(),
                            kind: Offered::Shared {
                                digest: heads_digest(&doc.head_bytes()),
                                access: Access::Read,
                                expires_ms: None,
                            },
                        });
                    }
                }
                let mut out: Vec<Msg> = items
                    .chunks(3)
                    .map(|c| Msg::Offer { items: c.to_vec() })
                    .collect();
                out.push(Msg::OfferEnd { upto: self.seq });
                out
            }
            Msg::Want { items } => vec![Msg::Changes {
                items: items
                    .iter()
                    .map(|w| Delivery {
                        chart: w.chart.clone(),
                        data: self
                            .docs
                            .get_mut(&w.chart)
                            .map(|(d, _)| d.changes_after(&w.have)),
                    })
                    .collect(),
            }],
            _ => vec![],
        }
    }
}

/// The puller's side: its documents and checkpoint.
#[derive(Default)]
struct Local {
    docs: HashMap<String, ChartDoc>,
    checkpoint: u64,
    applied_total: usize,
}

impl Local {
    fn lookup(&mut self, id: &str) -> Option<LocalChart> {
        self.docs.get_mut(id).map(|d| LocalChart {
            heads: d.head_bytes(),
            revoked: false,
            access: Some(Access::Read),
            expires_ms: None,
        })
    }

    fn apply(&mut self, items: &[Incoming]) {
        for it in items {
            if let Some(data) = &it.data {
                match self.docs.get_mut(&it.chart) {
                    Some(d) => {
                        d.merge(data).unwrap();
                    }
                    None => {
                        self.docs
                            .insert(it.chart.clone(), ChartDoc::load(data, []).unwrap());
                    }
                }
                self.applied_total += 1;
            }
        }
    }
}

/// Runs one pull. `cut` = stop (as if the connection died) after that many messages have
/// been handled by the puller; `dup` = deliver every Changes message twice; `rev` = reverse
/// the items of every Offer and Changes. Returns true if the pull completed.
fn run_pull(r: &mut Responder, l: &mut Local, cut: Option<usize>, dup: bool, rev: bool) -> bool {
    let (mut p, first) = Puller::start(l.checkpoint);
    let mut to_responder = vec![first];
    let mut handled = 0;
    loop {
        let mut to_puller = Vec::new();
        for m in to_responder.drain(..) {
            to_puller.extend(r.answer(&m));
        }
        if to_puller.is_empty() {
            return p.is_complete();
        }
        for mut m in to_puller {
            if rev {
                match &mut m {
                    Msg::Offer { items } => items.reverse(),
                    Msg::Changes { items } => items.reverse(),
                    _ => {}
                }
            }
            let copies = if dup && matches!(m, Msg::Changes { .. }) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                if cut.is_some_and(|c| handled >= c) {
                    return false;
                }
                handled += 1;
                let actions = p
                    .on_message(m.clone(), &mut |id: &str| l.lookup(id))
                    .unwrap();
                let mut queue: Vec<Action> = actions;
                while let Some(a) = queue.pop() {
                    match a {
                        Action::Send(m) => to_responder.push(m),
                        Action::Apply(items) => {
                            l.apply(&items);
                            queue.extend(p.applied(items.len()));
                        }
                        Action::Complete { upto } => {
                            l.checkpoint = upto;
                            to_responder.push(Msg::Done { upto });
                        }
                    }
                }
            }
        }
    }
}

fn assert_same(r: &mut Responder, l: &mut Local) {
    assert_eq!(r.docs.len(), l.docs.len());
    for (id, (doc, _)) in r.docs.iter_mut() {
        let mine = l.docs.get_mut(id).expect("chart present");
        assert_eq!(mine.head_bytes(), doc.head_bytes(), "{id}");
        assert_eq!(mine.to_json().unwrap(), doc.to_json().unwrap());
    }
}

#[test]
fn a_pull_brings_everything_and_moves_the_checkpoint() {
    let mut r = Responder::new(10);
    let mut l = Local::default();
    assert!(run_pull(&mut r, &mut l, None, false, false));
    assert_same(&mut r, &mut l);
    assert_eq!(l.checkpoint, r.seq);
    assert_eq!(l.applied_total, 10);
}

#[test]
fn a_no_op_pull_is_two_messages_whatever_the_number_of_charts() {
    for n in [10, 200] {
        let mut r = Responder::new(n);
        let mut l = Local::default();
        assert!(run_pull(&mut r, &mut l, None, false, false));
        let (mut p, pull) = Puller::start(l.checkpoint);
        let answers = r.answer(&pull);
        assert_eq!(answers, vec![Msg::OfferEnd { upto: r.seq }]);
        let actions = p
            .on_message(answers[0].clone(), &mut |id: &str| l.lookup(id))
            .unwrap();
        assert_eq!(actions, vec![Action::Complete { upto: r.seq }]);
        assert!(pull.encode().len() < 16 && answers[0].encode().len() < 16);
    }
}

#[test]
fn an_incremental_pull_sends_only_the_new_changes() {
    let mut r = Responder::new(20);
    let mut l = Local::default();
    assert!(run_pull(&mut r, &mut l, None, false, false));
    r.edit("chart-000003", 1);
    r.edit("chart-000007", 2);
    let before = l.applied_total;
    let (mut p, pull) = Puller::start(l.checkpoint);
    let offer = r.answer(&pull);
    let mut wants = Vec::new();
    for m in offer {
        for a in p.on_message(m, &mut |id: &str| l.lookup(id)).unwrap() {
            if let Action::Send(w) = a {
                wants.push(w);
            }
        }
    }
    assert_eq!(wants.len(), 1);
    let changes = r.answer(&wants[0]);
    let Msg::Changes { items } = &changes[0] else {
        panic!()
    };
    assert_eq!(items.len(), 2);
    for d in items {
        // One note change, far smaller than the chart.
        assert!(
            d.data.as_ref().unwrap().len() < 600,
            "{}",
            d.data.as_ref().unwrap().len()
        );
    }
    assert!(run_pull(&mut r, &mut l, None, false, false));
    assert_eq!(l.applied_total, before + 2);
    assert_same(&mut r, &mut l);
}

#[test]
fn interrupted_at_every_step_a_later_pull_completes_without_loss() {
    // Count the messages of a complete pull, then cut after each of them in turn.
    let total = {
        let mut r = Responder::new(7);
        let mut l = Local::default();
        let (mut p, first) = Puller::start(0);
        let mut n = 0;
        let mut to_r = vec![first];
        while !to_r.is_empty() {
            let msgs: Vec<Msg> = to_r.drain(..).flat_map(|m| r.answer(&m)).collect();
            for m in msgs {
                n += 1;
                let mut q = p.on_message(m, &mut |id: &str| l.lookup(id)).unwrap();
                while let Some(a) = q.pop() {
                    match a {
                        Action::Send(m) => to_r.push(m),
                        Action::Apply(items) => {
                            l.apply(&items);
                            q.extend(p.applied(items.len()));
                        }
                        Action::Complete { .. } => {}
                    }
                }
            }
        }
        n
    };
    assert!(total >= 4);
    for cut in 0..total {
        let mut r = Responder::new(7);
        let mut l = Local::default();
        assert!(!run_pull(&mut r, &mut l, Some(cut), false, false));
        assert_eq!(l.checkpoint, 0, "checkpoint moved on an interrupted pull");
        // Changes happen meanwhile; the next pull resumes from the old checkpoint.
        r.edit("chart-000002", 9);
        assert!(run_pull(&mut r, &mut l, None, false, false));
        assert_same(&mut r, &mut l);
        assert_eq!(l.checkpoint, r.seq);
    }
}

#[test]
fn duplicated_and_reordered_messages_change_nothing() {
    let mut r = Responder::new(9);
    let mut l = Local::default();
    assert!(run_pull(&mut r, &mut l, None, true, true));
    assert_same(&mut r, &mut l);
    assert_eq!(
        l.applied_total, 9,
        "a duplicated delivery was applied twice"
    );
    r.edit("chart-000001", 1);
    assert!(run_pull(&mut r, &mut l, None, true, true));
    assert_same(&mut r, &mut l);
}

#[test]
fn concurrent_edits_on_both_sides_converge() {
    let mut r = Responder::new(3);
    let mut l = Local::default();
    assert!(run_pull(&mut r, &mut l, None, false, false));
    let b = PracticeId::from_certificate_der(b"b");
    l.docs
        .get_mut("chart-000001")
        .unwrap()
        .append(&note(100), &meta(&b, 5))
        .unwrap();
    r.edit("chart-000001", 200);
    assert!(run_pull(&mut r, &mut l, None, false, false));
    let notes = l.docs["chart-000001"].to_json().unwrap()["notes"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(notes, 2, "both concurrent notes survive the merge");
}

#[test]
fn protocol_violations_end_the_pull() {
    let (mut p, _) = Puller::start(5);
    let mut none = |_: &str| None;
    assert!(matches!(
        p.on_message(Msg::OfferEnd { upto: 3 }, &mut none),
        Err(ProtocolError::Malformed(_))
    ));
    let (mut p, _) = Puller::start(0);
    assert!(matches!(
        p.on_message(
            Msg::Pull {
                version: 1,
                since: 0
            },
            &mut none
        ),
        Err(ProtocolError::Unexpected { .. })
    ));
    assert_eq!(
        p.on_message(Msg::Unsupported { version: 1 }, &mut none),
        Err(ProtocolError::Version(1))
    );
    let too_many = Msg::Offer {
        items: vec![
            OfferItem {
                chart: "x".into(),
                kind: Offered::Revoked
            };
            OFFER_CHUNK + 1
        ],
    };
    assert!(p.on_message(too_many, &mut none).is_err());
    assert!(matches!(
        Msg::decode(&[0xff, 0xff, 0xff]),
        Err(ProtocolError::Malformed(_))
    ));
    assert!(matches!(
        Msg::decode(&vec![0u8; MAX_MESSAGE + 1]),
        Err(ProtocolError::TooLarge(_))
    ));
}

#[test]
fn undelivered_wants_are_settled_and_the_pull_completes() {
    let mut r = Responder::new(2);
    let mut l = Local::default();
    // The responder loses the chart between offer and want (e.g. the grant was revoked).
    let (mut p, pull) = Puller::start(0);
    let offer = r.answer(&pull);
    r.docs.remove("chart-000001");
    let mut wants = Vec::new();
    for m in offer {
        for a in p.on_message(m, &mut |id: &str| l.lookup(id)).unwrap() {
            if let Action::Send(w) = a {
                wants.push(w);
            }
        }
    }
    let changes = r.answer(&wants[0]);
    let actions = p
        .on_message(changes[0].clone(), &mut |id: &str| l.lookup(id))
        .unwrap();
    let Action::Apply(items) = &actions[0] else {
        panic!("{actions:?}")
    };
    assert_eq!(items.len(), 1);
    assert_eq!(p.stats().unavailable, 1);
    assert_eq!(p.applied(1), vec![Action::Complete { upto: 2 }]);
}

#[test]
fn message_round_trip() {
    let m = Msg::Changes {
        items: vec![
            Delivery {
                chart: "c".into(),
                data: Some(vec![1, 2, 3]),
            },
            Delivery {
                chart: "d".into(),
                data: None,
            },
        ],
    };
    assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
}
