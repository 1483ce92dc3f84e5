//! Two practices, each behind its own NAT router, neither reachable from outside, pair by
//! id alone and sync through a Syncthing relay (`strelaysrv`, Debian's syncthing-relaysrv)
//! on an "internet" namespace between them (`chartmesh_tests::netns`). The relay's traffic
//! is captured and must hold no chart content; after a NAT restart (translations flushed,
//! new external ports) the practices are back in sync by themselves within 30 s.
//!
//! Needs root, iproute2, iptables, conntrack, tcpdump and strelaysrv (`.ci/run` installs
//! them); skips with a message otherwise. The relay runs with `-pools=` and no status
//! server: it contacts nobody.

use chartmesh_tests::netns::{Lab, RELAY_IP, unavailable};
use chartmesh_tests::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct RelayServer {
    _child: KillOnDrop,
    id: String,
    _dir: tempfile::TempDir,
}

fn start_relay(lab: &Lab) -> RelayServer {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns("inet"), "strelaysrv"])
        .arg(format!("-listen={RELAY_IP}:22067"))
        .args(["-pools=", "-status-srv=", "-nat=false"])
        .arg(format!("-keys={}", dir.path().display()))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("strelaysrv starts");
    let child = KillOnDrop(child);
    let mut id = String::new();
    wait_until(
        "the relay to print its URI",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match text.split("id=").nth(1) {
                Some(rest) => {
                    id = rest.split(['&', '\n', ' ']).next().unwrap().to_string();
                    true
                }
                None => false,
            }
        },
    );
    RelayServer {
        _child: child,
        id,
        _dir: dir,
    }
}

fn peer_view(p: &Practice, id: &str) -> Value {
    p.get("/sync")["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|x| x["id"] == id).cloned())
        .unwrap_or(Value::Null)
}

/// Strings of the first bench chart that must never cross the relay in the clear.
fn canaries() -> Vec<String> {
    let text = std::fs::read_to_string(bench_data().join("charts-1000.jsonl")).unwrap();
    let c: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let note = c["notes"][0]["text"].as_str().unwrap();
    vec![
        c["patient"]["mrn"].as_str().unwrap().to_string(),
        c["patient"]["name"]["family"].as_str().unwrap().to_string(),
        note[..note.len().min(40)].to_string(),
        c["id"].as_str().unwrap().to_string(),
    ]
}

#[test]
fn practices_behind_separate_nats_sync_through_a_relay_that_sees_no_chart_content() {
    if let Some(why) = unavailable(&["ip", "iptables", "conntrack", "tcpdump", "strelaysrv"]) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::two_nats();
    let relay = start_relay(&lab);
    let pcap = tempfile::tempdir().unwrap();
    let pcap_file = pcap.path().join("relay.pcap");
    let mut capture = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns("inet"),
                "tcpdump",
                "-i",
                "any",
                "-s",
                "0",
                "-U",
                "-w",
            ])
            .arg(&pcap_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump starts"),
    );
    wait_until("tcpdump to start", Duration::from_secs(10), || {
        pcap_file.exists()
    });

    let relay_addr = format!("{RELAY_IP}:22067");
    let args = ["--relay", &relay_addr, "--relay-id", &relay.id];
    let a = Practice::new_in_netns("Valley Clinic", &lab.ns("ca"), &args);
    let b = Practice::new_in_netns("Ridge Cardiology", &lab.ns("cb"), &args);
    wait_until("both to join the relay", Duration::from_secs(30), || {
        [&a, &b]
            .iter()
            .all(|p| p.get("/status")["sync"]["relay"]["connected"] == true)
    });
    a.cli_ok(&[
        "import",
        bench_data().join("charts-1000.jsonl").to_str().unwrap(),
    ]);
    let (id_a, id_b) = (a.id(), b.id());
    // Pairing by id alone: no address.
    a.cli_ok(&["peer", "add", &id_b, "--name", "Ridge"]);
    b.cli_ok(&["peer", "add", &id_a, "--name", "Valley"]);
    wait_connected(&a, &b);
    assert_eq!(peer_view(&a, &id_b)["path"], "relayed");

    let t = Instant::now();
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    let in_sync = |p: &Practice, id: &str| peer_view(p, id)["inSync"] == true;
    wait_until(
        "B to hold the 1,000 charts through the relay",
        Duration::from_secs(180),
        || b.get("/status")["charts"].as_u64() == Some(1000) && in_sync(&a, &id_b),
    );
    eprintln!(
        "relayed: 1,000 charts in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        set_checksum(&b.export_all()),
        (1000, manifest_checksum(1000))
    );
    let v = peer_view(&a, &id_b);
    assert_eq!(v["path"], "relayed", "{v}");
    assert!(v["rttMs"].as_u64().is_some(), "status shows the RTT: {v}");

    // NAT restart at A: translations flushed, new external ports. No action is taken; a
    // new chart at A must reach B within 30 s.
    let joins = |p: &Practice| p.log().matches("joined the relay").count();
    let lost = |p: &Practice| p.log().matches("disconnected").count();
    let (joins_before, lost_before) = (joins(&a), lost(&a));
    lab.restart_nat("ra");
    let t = Instant::now();
    let extra = std::fs::read_to_string(bench_data().join("charts-10000.jsonl")).unwrap();
    let line = extra.lines().nth(5000).unwrap();
    let file = a.dir.with_extension("extra.jsonl");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    a.cli_ok(&["import", file.to_str().unwrap()]);
    wait_until(
        "B to be back in sync after A's NAT restarted",
        Duration::from_secs(30),
        || b.get("/status")["charts"].as_u64() == Some(1001) && in_sync(&a, &id_b),
    );
    eprintln!(
        "after the NAT restart: in sync again in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The restart really broke A's paths: the relayed session (its connection was lost and
    // replaced) and, at its next ping, the relay connection (joined again).
    assert!(
        lost(&a) > lost_before,
        "A's relayed connection was lost and replaced"
    );
    wait_until(
        "A to join the relay again after its NAT restarted",
        Duration::from_secs(30),
        || joins(&a) > joins_before,
    );
    a.sync_wait(&b, 30);

    // What the relay saw: TLS to the relay (its ALPN is in the clear, proving the capture
    // works) and QUIC packets it cannot read — no chart text, name, MRN or id.
    let _ = Command::new("kill")
        .args(["-INT", &capture.id().to_string()])
        .status();
    let _ = capture.wait();
    let bytes = std::fs::read(&pcap_file).unwrap();
    assert!(
        bytes.len() > 1_000_000,
        "the capture holds the sync: {} bytes",
        bytes.len()
    );
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"bep-relay"), "the capture holds the relay handshake");
    for c in canaries() {
        assert!(
            !has(c.as_bytes()),
            "the relay saw chart content in the clear: {c:?}"
        );
    }
}

/// `status` says why a peer cannot be reached: no address, no LAN sighting and no relay; or
/// the relay is down. (Loopback only: no namespaces needed.)
#[test]
fn status_says_why_a_peer_is_unreachable() {
    let mut a = Practice::new("Valley Clinic");
    let other = Practice::new("Ridge Cardiology");
    let id = other.id();
    drop(other);
    a.cli_ok(&["peer", "add", &id, "--name", "Ridge"]);
    let reason = |p: &Practice| {
        p.get("/sync")["peers"][0]["unreachable"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let r = reason(&a);
    assert!(r.contains("no relay configured"), "{r}");
    // A relay that is not there: nothing listens on this TCP port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    a.set_env(&[("CHARTMESH_SYNC_RELAY", &format!("127.0.0.1:{port}"))]);
    a.restart();
    wait_until(
        "status to say the relay is down",
        Duration::from_secs(20),
        || reason(&a).contains("relay is down"),
    );
    let relay = &a.get("/status")["sync"]["relay"];
    assert_eq!(relay["connected"], false, "{relay}");
    assert!(
        relay["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("connect"),
        "{relay}"
    );
}
