//! Two practices on loopback that reach each other only through a Syncthing relay
//! (`strelaysrv`, Debian's syncthing-relaysrv): paired by id alone, no address. Pausing and
//! resuming the sync ten times must bring them back in sync within 2 s each time, without
//! a storm of connections refused as duplicates (docs/PERFORMANCE.md, "The standard bench
//! through a relay").
//!
//! What went wrong: closing a relayed connection removed its relayed path at once, so the
//! CONNECTION_CLOSE never left (a relay does not pass one end's close on), and the other
//! practice kept the dead connection as its live one; it then refused the resumed
//! practice's new connections as duplicates of it, and each was redialled 200 ms later,
//! until the dead one was 5 s old (if it had been spoken on) or timed out (30 s). And the
//! relay refused one half of a session whose two halves arrived at the same instant, so the
//! dialler waited 10 s for an answer.
//!
//! Needs strelaysrv (`.ci/run` installs it); skips with a message otherwise. The relay runs
//! with `-pools=` and no status server: it contacts nobody.

use chartmesh_tests::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

fn start_relay() -> RelayServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    RelayServer::start(None, &format!("127.0.0.1:{port}"))
}

fn peer_view(p: &Practice, id: &str) -> Value {
    p.get("/sync")["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|x| x["id"] == id).cloned())
        .unwrap_or(Value::Null)
}

fn back(p: &Practice, id: &str) -> bool {
    let v = peer_view(p, id);
    v["connected"] == true && v["inSync"] == true
}

fn duplicates(p: &Practice) -> usize {
    p.log().matches("disconnected reason=Duplicate").count()
}

#[test]
fn pausing_and_resuming_through_a_relay_reconnects_at_once_without_a_duplicate_storm() {
    if Command::new("strelaysrv").arg("-version").output().is_err() {
        eprintln!("skipped: strelaysrv (Debian package syncthing-relaysrv) is not installed");
        return;
    }
    let relay = start_relay();
    let args = ["--relay", &relay.addr, "--relay-id", &relay.id];
    let a = Practice::new_with("Valley Clinic", &args);
    let b = Practice::new_with("Ridge Cardiology", &args);
    wait_until("both to join the relay", Duration::from_secs(30), || {
        [&a, &b]
            .iter()
            .all(|p| p.get("/status")["sync"]["relay"]["connected"] == true)
    });
    a.import_first(20);
    let (id_a, id_b) = (a.id(), b.id());
    // Pairing by id alone: the relay is the only way between them.
    a.cli_ok(&["peer", "add", &id_b, "--name", "Ridge"]);
    b.cli_ok(&["peer", "add", &id_a, "--name", "Valley"]);
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    wait_until("B to hold the 20 charts", Duration::from_secs(60), || {
        b.get("/status")["charts"].as_u64() == Some(20) && back(&a, &id_b) && back(&b, &id_a)
    });
    assert_eq!(peer_view(&a, &id_b)["path"], "relayed");

    let dup_before = duplicates(&a) + duplicates(&b);
    let resume = serde_json::to_vec(&serde_json::json!({ "peer": id_a })).unwrap();
    let mut times = Vec::new();
    for i in 0..10 {
        // As the bench does: pause, and resume at once.
        b.cli_ok(&["sync", "pause", "--peer", &id_a]);
        let t = Instant::now();
        let (status, v) = b.post("/sync/resume", &resume, "admin").unwrap();
        assert_eq!(status, 200, "{v}");
        wait_until(
            &format!("both back in sync (round {i})"),
            Duration::from_secs(60),
            || back(&b, &id_a) && back(&a, &id_b),
        );
        times.push(t.elapsed().as_millis());
    }
    let dups = duplicates(&a) + duplicates(&b) - dup_before;
    eprintln!(
        "reconnects through the relay (ms): {times:?}; connections refused as duplicates: {dups}"
    );
    assert!(
        times.iter().all(|&ms| ms <= 2_000),
        "every reconnect within 2 s: {times:?} ms ({dups} refused as duplicates)\n--- A ---\n{}\n--- B ---\n{}",
        a.log(),
        b.log()
    );
    assert!(
        dups <= 3,
        "{dups} connections refused as duplicates in 10 reconnects\n--- A ---\n{}\n--- B ---\n{}",
        a.log(),
        b.log()
    );
}
