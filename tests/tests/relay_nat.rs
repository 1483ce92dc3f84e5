//! Two practices, each behind its own NAT router, neither reachable from outside, pair by
//! id alone and sync through a Syncthing relay (`strelaysrv`, Debian's syncthing-relaysrv)
//! on an "internet" namespace between them (`chartmesh_tests::netns`). The relay's traffic
//! is captured and must hold no chart content; after a NAT restart (translations flushed,
//! new external ports) the practices are back in sync by themselves within 30 s.
//!
//! With a STUN server (coturn's `turnserver`, STUN only) on the internet namespace too, two
//! practices connected through the relay learn their public addresses, exchange them over
//! the relayed connection and dial each other at once (hole punching): behind NATs that keep
//! one mapping per socket (plain MASQUERADE) they switch to a direct connection in the
//! middle of a sync, losing nothing, and fall back to the relay when the NAT restarts;
//! behind one that maps every destination anew (`--random-fully`) they stay relayed.
//!
//! Where hole punching fails, a router that offers port mapping (miniupnpd: NAT-PMP, PCP,
//! UPnP IGD) still gives a direct path: the practice behind it maps its sync port and sends
//! the mapped address as a candidate.
//!
//! Needs root, iproute2, iptables, conntrack, tcpdump, strelaysrv, turnserver and (for the
//! port-mapping case) miniupnpd with iptables-legacy (`.ci/run` installs them); skips with a
//! message otherwise. The relay runs with `-pools=` and no status server, coturn with no
//! TURN, CLI, TLS or TCP, miniupnpd on the clinic's side of its router only: they contact
//! nobody.

use chartmesh_tests::netns::{Lab, RELAY_IP, unavailable};
use chartmesh_tests::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start_relay(lab: &Lab) -> RelayServer {
    RelayServer::start(Some(&lab.ns("inet")), &format!("{RELAY_IP}:22067"))
}

/// coturn as a plain STUN server on the internet namespace, UDP port 3478.
fn start_stun(lab: &Lab) -> (KillOnDrop, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("inet"),
            "turnserver",
            "-n",
            "--stun-only",
        ])
        .args([
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--no-software-attribute",
        ])
        .args([
            "-L",
            RELAY_IP,
            "-p",
            "3478",
            "--log-file",
            "stdout",
            "--simple-log",
        ])
        .arg("--pidfile")
        .arg(dir.path().join("turnserver.pid"))
        .arg("--db")
        .arg(dir.path().join("turndb"))
        .stdout(std::fs::File::create(dir.path().join("stun.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver starts");
    let child = KillOnDrop(child);
    let inet = lab.ns("inet");
    wait_until("the STUN server to listen", Duration::from_secs(20), || {
        chartmesh_tests::netns::sh(Some(&inet), "ss -lun").contains(&format!("{RELAY_IP}:3478"))
    });
    (child, dir)
}

/// Imports one more chart (one not among the first 1,000) at `p`.
fn import_one_more(p: &Practice) {
    let extra = std::fs::read_to_string(bench_data().join("charts-10000.jsonl")).unwrap();
    let line = extra.lines().nth(5000).unwrap();
    let file = p.dir.with_extension("extra.jsonl");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    p.cli_ok(&["import", file.to_str().unwrap()]);
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
    import_one_more(&a);
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

/// Two practices behind NATs, a relay and a STUN server between them; both pair by id alone,
/// A holds the 1,000 bench charts and shares them all, B (last to pair) starts the sync.
struct NatPair {
    a: Practice,
    b: Practice,
    id_a: String,
    id_b: String,
    _relay: RelayServer,
    _stun: (KillOnDrop, tempfile::TempDir),
    lab: Lab,
}

fn nat_pair(setup: impl FnOnce(&Lab)) -> Option<NatPair> {
    let tools = [
        "ip",
        "iptables",
        "conntrack",
        "strelaysrv",
        "turnserver",
        "ss",
    ];
    if let Some(why) = unavailable(&tools) {
        eprintln!("skipped: {why}");
        return None;
    }
    let lab = Lab::two_nats();
    setup(&lab);
    let relay = start_relay(&lab);
    let stun = start_stun(&lab);
    let relay_addr = format!("{RELAY_IP}:22067");
    let stun_addr = format!("{RELAY_IP}:3478");
    let args = [
        "--relay",
        &relay_addr,
        "--relay-id",
        &relay.id,
        "--stun",
        &stun_addr,
    ];
    let a = Practice::new_in_netns("Valley Clinic", &lab.ns("ca"), &args);
    let b = Practice::new_in_netns("Ridge Cardiology", &lab.ns("cb"), &args);
    wait_until(
        "both to join the relay and learn their public address",
        Duration::from_secs(30),
        || {
            [&a, &b].iter().all(|p| {
                let s = p.get("/status");
                s["sync"]["relay"]["connected"] == true && s["sync"]["publicAddr"].is_string()
            })
        },
    );
    // The STUN server saw each clinic as its router's public address.
    assert!(
        a.get("/status")["sync"]["publicAddr"]
            .as_str()
            .unwrap()
            .starts_with("10.77.1.2:"),
        "{}",
        a.get("/status")["sync"]
    );
    a.cli_ok(&[
        "import",
        bench_data().join("charts-1000.jsonl").to_str().unwrap(),
    ]);
    let (id_a, id_b) = (a.id(), b.id());
    a.cli_ok(&["peer", "add", &id_b, "--name", "Ridge"]);
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    b.cli_ok(&["peer", "add", &id_a, "--name", "Valley"]);
    Some(NatPair {
        a,
        b,
        id_a,
        id_b,
        _relay: relay,
        _stun: stun,
        lab,
    })
}

/// Prints both daemons' logs if the test fails (they go with their temporary directories).
struct LogsOnPanic<'a>(&'a Practice, &'a Practice);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (n, p) in [("A", self.0), ("B", self.1)] {
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(80).collect();
                eprintln!("---- {n}'s log (last lines) ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn charts(p: &Practice) -> u64 {
    p.get("/status")["charts"].as_u64().unwrap_or(0)
}

/// Waits for B to hold A's 1,000 charts with A seeing B in sync, prints how long it took
/// since `t` (`how`: by which path), and checks B's set against the bench manifest.
fn all_charts_arrive(a: &Practice, b: &Practice, id_b: &str, t: Instant, how: &str) {
    wait_until(
        "B to hold the 1,000 charts",
        Duration::from_secs(180),
        || charts(b) == 1000 && peer_view(a, id_b)["inSync"] == true,
    );
    eprintln!("{how}: 1,000 charts in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(
        set_checksum(&b.export_all()),
        (1000, manifest_checksum(1000))
    );
}

/// Endpoint-independent NATs (plain MASQUERADE keeps a socket's port for every destination):
/// the practices connect through the relay, and switch to a direct connection in the middle
/// of the sync of 1,000 charts; the sync goes on on it from its checkpoint, nothing is lost
/// and no chart B already held is sent again. A NAT restart then breaks the direct path, and
/// the relay takes over by itself.
#[test]
fn behind_endpoint_independent_nats_a_relayed_sync_switches_to_direct_and_loses_nothing() {
    // The direct path is blocked at first, so the sync starts relayed; the relay's TCP is
    // slowed (where the kernel can shape traffic) so that the sync is still running when the
    // direct path opens.
    let slow = Lab::can_shape();
    // (Every part is bound: what a pattern leaves out is dropped at once.)
    let Some(NatPair {
        lab,
        _relay,
        _stun,
        a,
        b,
        id_a,
        id_b,
    }) = nat_pair(|lab| {
        lab.block_direct_udp(true);
        if slow {
            // 1,000 charts are about 6 Mbit on the wire: at 600 kbit/s the relayed sync
            // takes about 10 s, while punching connects 0.4–1.7 s after the path opens (at
            // 4 Mbit/s a loaded machine once finished the sync before the switch).
            lab.slow_tcp(600);
        }
    })
    else {
        return;
    };
    let _logs = LogsOnPanic(&a, &b);
    let t = Instant::now();
    wait_until(
        "B to hold some of the charts, through the relay",
        Duration::from_secs(40),
        || charts(&b) >= 50,
    );
    assert_eq!(peer_view(&b, &id_a)["path"], "relayed");
    assert!(
        a.log().contains("hole punching did not connect")
            || b.log().contains("hole punching did not connect")
            || charts(&b) < 1000,
        "punching was tried while the direct path was blocked"
    );
    // Open the direct path; the next round of hole punching finds it.
    lab.block_direct_udp(false);
    let opened = Instant::now();
    let mut held_at_switch = None;
    wait_until(
        "both practices to switch to a direct connection",
        Duration::from_secs(60),
        || {
            let before = charts(&b);
            if held_at_switch.is_none() && peer_view(&a, &id_b)["path"] == "direct" {
                held_at_switch = Some(before);
            }
            held_at_switch.is_some() && peer_view(&b, &id_a)["path"] == "direct"
        },
    );
    let held_at_switch = held_at_switch.unwrap();
    eprintln!(
        "direct {:.1} s after the path opened ({:.1} s after the sync began), B holding {held_at_switch} of 1,000 charts",
        opened.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    if slow {
        assert!(
            held_at_switch < 1000,
            "the switch came in the middle of the sync"
        );
    }
    let in_sync = |p: &Practice, id: &str| peer_view(p, id)["inSync"] == true;
    wait_until(
        "B to hold the 1,000 charts",
        Duration::from_secs(180),
        || charts(&b) == 1000 && in_sync(&a, &id_b),
    );
    eprintln!("1,000 charts in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(
        set_checksum(&b.export_all()),
        (1000, manifest_checksum(1000))
    );
    let v = peer_view(&a, &id_b);
    assert_eq!(v["path"], "direct", "{v}");
    assert!(v["rttMs"].as_u64().is_some(), "{v}");
    let text = a.cli_ok(&["status"]);
    assert!(text.contains("(direct, RTT "), "{text}");
    // Each chart was received once: nothing B already held came again after the switch.
    let entries = b.get("/audit")["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut received = std::collections::HashMap::new();
    for e in entries.iter().filter(|e| e["action"] == "sync-receive") {
        *received
            .entry(e["chart_id"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(received.len(), 1000);
    let twice: Vec<_> = received.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "charts received twice: {twice:?}");
    let sent = a.get("/audit")["entries"].as_array().map_or(0, |es| {
        es.iter().filter(|e| e["action"] == "sync-send").count()
    });
    eprintln!("A sent {sent} charts (1,000 distinct) across the switch");

    // A's NAT restarts with new, random external ports (so punching fails from now on): the
    // direct path is dead, the practices go back to the relay by themselves and a new chart
    // reaches B within 30 s.
    lab.restart_nat("ra");
    let t = Instant::now();
    import_one_more(&a);
    wait_until(
        "B to be back in sync, through the relay, after A's NAT restarted",
        Duration::from_secs(40),
        || charts(&b) == 1001 && in_sync(&a, &id_b),
    );
    eprintln!(
        "after the NAT restart: in sync again in {:.1} s, path {}",
        t.elapsed().as_secs_f64(),
        peer_view(&a, &id_b)["path"]
    );
    assert!(
        a.log().contains("no packet on the direct path")
            || b.log().contains("no packet on the direct path")
    );
}

/// A NAT that maps each destination to a new random port (`--random-fully`): the address
/// STUN saw is not the one the peer would have to reach, so punching fails; the practices
/// stay relayed and the 1,000 charts still arrive.
#[test]
fn behind_a_nat_that_maps_each_destination_anew_the_sync_stays_relayed() {
    let Some(NatPair {
        lab: _lab,
        _relay,
        _stun,
        a,
        b,
        id_a,
        id_b,
    }) = nat_pair(|lab| lab.random_fully("rb"))
    else {
        return;
    };
    let _logs = LogsOnPanic(&a, &b);
    let t = Instant::now();
    wait_until(
        "hole punching to be tried and fail at both practices",
        Duration::from_secs(60),
        || {
            [&a, &b]
                .iter()
                .all(|p| p.log().contains("hole punching did not connect"))
        },
    );
    all_charts_arrive(&a, &b, &id_b, t, "relayed behind --random-fully");
    assert_eq!(peer_view(&a, &id_b)["path"], "relayed");
    assert_eq!(peer_view(&b, &id_a)["path"], "relayed");
    assert!(!a.log().contains("direct connection by hole punching"));
    assert!(!b.log().contains("direct connection by hole punching"));
}

/// The address [`start_miniupnpd`] gives router `ra` as its public one (the lab's 10.77/16 is
/// private, and miniupnpd maps nothing on a private external address): put on `ra`'s WAN
/// link and routed to it from the internet namespace. Nothing leaves the namespaces.
const RA_PUBLIC: &str = "11.77.1.2";

/// miniupnpd (Debian's miniupnpd-iptables) on router `ra`: NAT-PMP/PCP and UPnP IGD for the
/// clinic's subnet only (secure mode: a client maps ports to itself alone), its rules in
/// chains of the legacy iptables tables it drives (made here, as its init script would).
/// Stopped with SIGTERM (it deletes its rules) when dropped; the namespace goes with the lab.
struct Miniupnpd {
    child: std::process::Child,
    ns: String,
    dir: tempfile::TempDir,
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its chains, in case the namespace outlives the test (it does not: the lab
        // deletes it).
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c"])
            .arg(
                "for t in nat filter; do iptables-legacy -t $t -F MINIUPNPD; done; \
                 iptables-legacy -t nat -F MINIUPNPD-POSTROUTING",
            )
            .stderr(Stdio::null())
            .status();
    }
}

impl Miniupnpd {
    /// Its UDP port mappings (the nat chain's DNAT rules by external port).
    fn udp_rules(&self) -> String {
        chartmesh_tests::netns::sh(Some(&self.ns), "iptables-legacy -t nat -S MINIUPNPD")
            .lines()
            .filter(|l| l.contains("-p udp"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("miniupnpd.log")).unwrap_or_default()
    }
}

fn start_miniupnpd(lab: &Lab, natpmp: bool) -> Miniupnpd {
    use chartmesh_tests::netns::sh;
    let ns = lab.ns("ra");
    let wan = lab.wan("ra");
    let lan = lab.iface("ra", "ca");
    sh(Some(&ns), &format!("ip addr add {RA_PUBLIC}/32 dev {wan}"));
    sh(
        Some(&lab.ns("inet")),
        &format!("ip route add {RA_PUBLIC}/32 via 10.77.1.2"),
    );
    sh(
        Some(&ns),
        &format!(
            "iptables-legacy -t nat -N MINIUPNPD && \
             iptables-legacy -t nat -I PREROUTING -i {wan} -j MINIUPNPD && \
             iptables-legacy -t nat -N MINIUPNPD-POSTROUTING && \
             iptables-legacy -t nat -I POSTROUTING -o {wan} -j MINIUPNPD-POSTROUTING && \
             iptables-legacy -t filter -N MINIUPNPD && \
             iptables-legacy -t filter -I FORWARD -i {wan} ! -o {wan} -j MINIUPNPD"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("miniupnpd.conf");
    std::fs::write(
        &conf,
        format!(
            "ext_ifname={wan}\n\
             ext_ip={RA_PUBLIC}\n\
             listening_ip={lan}\n\
             port=0\n\
             enable_natpmp={}\n\
             enable_upnp=yes\n\
             secure_mode=yes\n\
             system_uptime=yes\n\
             lease_file={}\n\
             uuid=3a1c3f0e-4c1b-4e55-9a4e-6f7d2b8e9c01\n\
             allow 1024-65535 192.168.10.0/24 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            if natpmp { "yes" } else { "no" },
            dir.path().join("leases").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("miniupnpd.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns, "miniupnpd", "-d", "-f"])
        .arg(&conf)
        .arg("-P")
        .arg(dir.path().join("miniupnpd.pid"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("miniupnpd starts");
    let m = Miniupnpd { child, ns, dir };
    wait_until("miniupnpd to listen", Duration::from_secs(20), || {
        let ss = chartmesh_tests::netns::sh(Some(&m.ns), "ss -lun");
        ss.contains(":1900") && (!natpmp || ss.contains(":5351"))
    });
    m
}

/// Port mapping: A's router runs miniupnpd (NAT-PMP/PCP, UPnP IGD), B's NAT maps every
/// destination anew (`--random-fully`), so hole punching alone fails (the test above: the
/// sync stays relayed). A asks its gateway to map its sync port, and sends the mapped
/// address to B as a candidate; B dials it, and the sync ends up direct. `status` shows A's
/// mapping and why B has none; `/metrics` carries it; A deletes it when it stops.
#[test]
fn a_port_mapped_by_the_router_makes_the_path_direct_where_hole_punching_fails() {
    if let Some(why) = unavailable(&["miniupnpd", "iptables-legacy"]) {
        eprintln!("skipped: {why}");
        return;
    }
    let mut upnp = None;
    let Some(NatPair {
        lab,
        _relay,
        _stun,
        mut a,
        b,
        id_a,
        id_b,
    }) = nat_pair(|lab| {
        lab.random_fully("rb");
        upnp = Some(start_miniupnpd(lab, true));
    })
    else {
        return;
    };
    let upnp = upnp.unwrap();
    let logs = LogsOnPanic(&a, &b);
    let t = Instant::now();
    let mapping = |p: &Practice| p.get("/status")["sync"]["portMapping"].clone();
    wait_until(
        "A's router to map its sync port",
        Duration::from_secs(30),
        || mapping(&a)["external"].is_string(),
    );
    let m = mapping(&a);
    eprintln!("A's mapping: {m}");
    assert_eq!(m["external"], format!("{RA_PUBLIC}:7361"), "{m}");
    assert!(
        matches!(m["protocol"].as_str(), Some("PCP" | "NAT-PMP" | "UPnP")),
        "{m}"
    );
    assert!(m["leaseLeftS"].as_u64().unwrap() > 3600, "{m}");
    // The router holds it: its log names the clinic's address, its nat chain the port.
    assert!(
        upnp.udp_rules().contains("--dport 7361") && upnp.log().contains("7361->192.168.10.2:7361"),
        "miniupnpd holds the mapping: {}\n{}",
        upnp.udp_rules(),
        upnp.log()
    );
    // B's router offers no port mapping: it says so, quietly.
    wait_until(
        "B to give up on port mapping",
        Duration::from_secs(30),
        || {
            mapping(&b)["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no gateway answered"))
        },
    );
    assert!(mapping(&b)["external"].is_null());

    wait_until(
        "the path to become direct at both practices",
        Duration::from_secs(60),
        || peer_view(&a, &id_b)["path"] == "direct" && peer_view(&b, &id_a)["path"] == "direct",
    );
    eprintln!("direct after {:.1} s", t.elapsed().as_secs_f64());
    // B reached A at the mapped address (random-fully NAT at B: A's dials cannot succeed).
    let line = b
        .log()
        .lines()
        .find(|l| l.contains("direct connection by hole punching"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains(&format!("{RA_PUBLIC}:7361")), "{line}");
    all_charts_arrive(&a, &b, &id_b, t, "through A's mapped port");
    assert_eq!(peer_view(&a, &id_b)["path"], "direct");
    assert_eq!(peer_view(&b, &id_a)["path"], "direct");

    // `status --json`, the text status, doctor and /metrics show the mapping.
    let s = a.cli_json(&["status"]);
    assert_eq!(
        s["sync"]["portMapping"]["external"],
        format!("{RA_PUBLIC}:7361"),
        "{s}"
    );
    let text = a.cli_ok(&["status"]);
    assert!(
        text.contains(&format!("Mapped:     {RA_PUBLIC}:7361 by the router")),
        "{text}"
    );
    let text = b.cli_ok(&["status"]);
    assert!(
        text.contains("no port mapping: no gateway answered"),
        "{text}"
    );
    let doctor: Value =
        serde_json::from_slice(&a.cli(&["--json", "doctor"]).stdout).expect("doctor --json");
    assert!(
        doctor["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "port mapping"
                && f["status"] == "ok"
                && f["detail"].as_str().unwrap_or("").contains(RA_PUBLIC)),
        "{doctor}"
    );
    let api = std::fs::read_to_string(a.dir.join("api.addr")).unwrap();
    let url = format!("http://{}/metrics", api.trim());
    let metrics = chartmesh_tests::netns::in_netns(&lab.ns("ca"), move || {
        ureq::get(url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    });
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("chartmesh_port_mapping{")
                && l.contains(&format!("external=\"{RA_PUBLIC}:7361\""))
                && l.ends_with(" 1")),
        "{metrics}"
    );

    // A stops gracefully: it deletes the mapping on the router.
    drop(logs);
    a.stop();
    assert!(
        !upnp.udp_rules().contains("--dport 7361"),
        "the mapping outlived A: {}",
        upnp.udp_rules()
    );
    assert!(a.log().contains("port mapping deleted"), "{}", a.log());
    drop(upnp);
}

/// A router that offers UPnP IGD only (NAT-PMP/PCP off): the practice finds it by SSDP, maps
/// its sync port with AddPortMapping, shows it, and deletes it (DeletePortMapping) when it
/// stops.
#[test]
fn a_router_with_upnp_only_maps_the_port_by_upnp_and_the_mapping_goes_at_shutdown() {
    if let Some(why) = unavailable(&["ip", "iptables", "miniupnpd", "iptables-legacy", "ss"]) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::two_nats();
    let upnp = start_miniupnpd(&lab, false);
    let mut a = Practice::new_in_netns("Valley Clinic", &lab.ns("ca"), &[]);
    let mapping = |p: &Practice| p.get("/status")["sync"]["portMapping"].clone();
    wait_until(
        "A's router to map its sync port",
        Duration::from_secs(30),
        || mapping(&a)["external"].is_string(),
    );
    let m = mapping(&a);
    assert_eq!(m["protocol"], "UPnP", "{m}");
    assert_eq!(m["external"], format!("{RA_PUBLIC}:7361"), "{m}");
    assert!(upnp.udp_rules().contains("--dport 7361"), "{}", upnp.log());
    a.stop();
    assert!(
        !upnp.udp_rules().contains("--dport 7361"),
        "the mapping outlived A: {}\n{}",
        upnp.udp_rules(),
        upnp.log()
    );
    drop(upnp);
}
