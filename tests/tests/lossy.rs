//! A lossy, long-distance link: 15 % loss and 80 ms delay each way (160 ms round trip) and
//! 2 % duplicated datagrams, made by an impairing UDP relay on loopback between two real
//! daemons (`chartmesh_bench::relay`; the kernel's netem is not needed). 1,000 bench charts
//! must arrive, checksum equal, in under 15 s, over one connection that survives the loss.
//!
//! `CHARTMESH_LOSSY_CONTROLLERS=bbr,cubic,newreno` runs the same sync once per congestion
//! controller and prints the times (the measurement in docs/PERFORMANCE.md); only the
//! default (BBR) is asserted on.

use chartmesh_bench::relay::{Impairment, Relay};
use chartmesh_tests::*;
use std::time::{Duration, Instant};

/// Within the bar of issue 14 (51 s before tuning).
const LIMIT: Duration = Duration::from_secs(15);

struct Run {
    elapsed: Duration,
    disconnects: usize,
    dropped: u64,
    duplicated: u64,
}

fn sync_1000_over_rural_link(congestion: &str, seed: u64, impaired: bool) -> Run {
    let mut a = Practice::new("Valley Clinic");
    let mut b = Practice::new("Ridge Cardiology");
    for p in [&mut a, &mut b] {
        p.set_env(&[("CHARTMESH_SYNC_CONGESTION", congestion)]);
        p.restart();
    }
    a.cli_ok(&[
        "import",
        bench_data().join("charts-1000.jsonl").to_str().unwrap(),
    ]);
    // Each practice is reached through its own impairing relay, so every datagram between
    // them crosses exactly one impaired hop in each direction.
    let to_a = Relay::start_impaired(
        a.sync_addr().parse().unwrap(),
        impaired.then(|| Impairment::rural(seed)),
    )
    .unwrap();
    let to_b = Relay::start_impaired(
        b.sync_addr().parse().unwrap(),
        impaired.then(|| Impairment::rural(seed + 1)),
    )
    .unwrap();
    let (id_a, id_b) = (a.id(), b.id());
    a.cli_ok(&[
        "peer",
        "add",
        &id_b,
        "--addr",
        &to_b.addr.to_string(),
        "--name",
        "Ridge",
    ]);
    b.cli_ok(&[
        "peer",
        "add",
        &id_a,
        "--addr",
        &to_a.addr.to_string(),
        "--name",
        "Valley",
    ]);
    wait_connected(&a, &b);
    let disconnects_before = count_disconnects(&a) + count_disconnects(&b);

    let t = Instant::now();
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    let in_sync = |p: &Practice, id: &str| {
        p.get("/sync")["peers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|x| x["id"] == id && x["inSync"] == true))
    };
    wait_until(
        "B to hold the 1,000 charts and A to see it in sync",
        Duration::from_secs(120),
        || b.get("/status")["charts"].as_u64() == Some(1000) && in_sync(&a, &id_b),
    );
    let elapsed = t.elapsed();
    let exported = b.export_all();
    assert_eq!(
        set_checksum(&exported),
        (1000, manifest_checksum(1000)),
        "B's charts equal the benchmark's ({congestion})"
    );
    let stats = (to_a.stats(), to_b.stats());
    let dropped = stats.0.dropped.load(std::sync::atomic::Ordering::Relaxed)
        + stats.1.dropped.load(std::sync::atomic::Ordering::Relaxed);
    let duplicated = stats
        .0
        .duplicated
        .load(std::sync::atomic::Ordering::Relaxed)
        + stats
            .1
            .duplicated
            .load(std::sync::atomic::Ordering::Relaxed);
    Run {
        elapsed,
        disconnects: count_disconnects(&a) + count_disconnects(&b) - disconnects_before,
        dropped,
        duplicated,
    }
}

/// Connections lost (timed out, reset) — not the duplicate of two simultaneous dials that
/// one side closes by design.
fn count_disconnects(p: &Practice) -> usize {
    p.log()
        .lines()
        .filter(|l| l.contains("disconnected") && l.contains("Lost("))
        .count()
}

#[test]
fn a_thousand_charts_cross_a_lossy_long_link_in_under_15_s_on_one_connection() {
    let r = sync_1000_over_rural_link("bbr", 14, true);
    eprintln!(
        "lossy link (bbr): 1,000 charts in {:.1} s; {} datagrams dropped, {} duplicated; {} disconnects",
        r.elapsed.as_secs_f64(),
        r.dropped,
        r.duplicated,
        r.disconnects
    );
    assert!(
        r.dropped > 100,
        "the link really lost datagrams: {}",
        r.dropped
    );
    assert!(r.duplicated > 5, "and duplicated some: {}", r.duplicated);
    assert_eq!(r.disconnects, 0, "one connection carried the whole sync");
    assert!(
        r.elapsed < LIMIT,
        "1,000 charts took {:?} over the lossy link (limit {LIMIT:?})",
        r.elapsed
    );
}

/// Opt-in measurement: `CHARTMESH_LOSSY_CONTROLLERS=bbr,cubic,newreno` (each over the
/// rural link and over a clean one).
#[test]
fn lossy_link_per_congestion_controller() {
    let Ok(list) = std::env::var("CHARTMESH_LOSSY_CONTROLLERS") else {
        eprintln!("skipped: set CHARTMESH_LOSSY_CONTROLLERS=bbr,cubic,newreno to measure");
        return;
    };
    for (i, c) in list.split(',').enumerate() {
        for impaired in [true, false] {
            let r = sync_1000_over_rural_link(c.trim(), 100 + i as u64, impaired);
            eprintln!(
                "{} link ({c}): 1,000 charts in {:.1} s; {} dropped, {} duplicated; {} disconnects",
                if impaired { "lossy" } else { "clean" },
                r.elapsed.as_secs_f64(),
                r.dropped,
                r.duplicated,
                r.disconnects
            );
        }
    }
}

/// A flapping link: up `UP` of every `UP + DOWN` seconds (10 s of every 60 s on a real rural
/// line; scaled to 2 s of every 12 s here, `CHARTMESH_FLAP_FULL=1` for the real timing).
/// The sync of 1,000 charts resumes in every up window until it completes; throughout,
/// A never reports B in sync while B lacks charts, and B's checksum ends equal.
#[test]
fn a_flapping_link_completes_the_sync_and_status_stays_truthful() {
    let full = std::env::var_os("CHARTMESH_FLAP_FULL").is_some();
    let (up, down) = if full {
        (Duration::from_secs(10), Duration::from_secs(50))
    } else {
        (Duration::from_secs(2), Duration::from_secs(10))
    };
    let a = Practice::new("Valley Clinic");
    let b = Practice::new("Ridge Cardiology");
    a.cli_ok(&[
        "import",
        bench_data().join("charts-1000.jsonl").to_str().unwrap(),
    ]);
    let to_a = std::sync::Arc::new(Relay::start(a.sync_addr().parse().unwrap()).unwrap());
    let to_b = std::sync::Arc::new(Relay::start(b.sync_addr().parse().unwrap()).unwrap());
    let (id_a, id_b) = (a.id(), b.id());
    a.cli_ok(&["peer", "add", &id_b, "--addr", &to_b.addr.to_string()]);
    b.cli_ok(&["peer", "add", &id_a, "--addr", &to_a.addr.to_string()]);
    wait_connected(&a, &b);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let downs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flapper = {
        let (to_a, to_b, stop, downs) = (to_a.clone(), to_b.clone(), stop.clone(), downs.clone());
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let pause = |d: Duration| {
                let end = Instant::now() + d;
                while Instant::now() < end && !stop.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            // The link is down when the share is recorded (a short first outage), so even a
            // sync faster than one up window crosses an outage and has to resume after it.
            let mut window = Duration::ZERO;
            let mut outage = Duration::from_millis(1500);
            while !stop.load(Relaxed) {
                pause(window);
                window = up;
                if stop.load(Relaxed) {
                    break;
                }
                to_a.set_down(true);
                to_b.set_down(true);
                downs.fetch_add(1, Relaxed);
                pause(outage);
                outage = down;
                to_a.set_down(false);
                to_b.set_down(false);
            }
            to_a.set_down(false);
            to_b.set_down(false);
        })
    };
    let t = Instant::now();
    wait_until("the first outage", Duration::from_secs(10), || {
        downs.load(std::sync::atomic::Ordering::Relaxed) >= 1
    });
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    let mut checks = 0;
    wait_until(
        "the sync to complete over the flapping link",
        Duration::from_secs(if full { 900 } else { 240 }),
        || {
            let held = b.get("/status")["charts"].as_u64().unwrap_or(0);
            let said = a.get("/sync")["peers"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|x| x["id"] == id_b && x["inSync"] == true));
            checks += 1;
            // Read after the claim: B can only have gained charts since.
            let held_after = b.get("/status")["charts"].as_u64().unwrap_or(0);
            assert!(
                !said || held_after == 1000,
                "A said B is in sync while B held {held} (then {held_after}) of 1,000 charts"
            );
            said && held == 1000
        },
    );
    let elapsed = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flapper.join().unwrap();
    let downs = downs.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "flapping link ({up:?} up / {down:?} down): 1,000 charts in {:.1} s across {downs} outages ({checks} status checks)",
        elapsed.as_secs_f64()
    );
    assert!(
        downs >= 1,
        "the link went down at least once during the sync"
    );
    assert_eq!(
        set_checksum(&b.export_all()),
        (1000, manifest_checksum(1000))
    );
    // `sync wait` agrees once the link is up for good.
    a.sync_wait(&b, 60);
}

/// The same rural link made by the kernel (`tc netem` on a veth between two namespaces, 15 %
/// loss, 80 ms delay and 2 % duplicates each way), where the kernel has netem; skipped with a
/// message otherwise (the relay-based test above covers the same link everywhere).
#[test]
fn a_thousand_charts_cross_a_netem_link_in_under_15_s() {
    use chartmesh_tests::netns::{Lab, netem_unavailable, sh};
    if let Some(why) = netem_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::lan();
    for (a, b) in [("la", "lb"), ("lb", "la")] {
        sh(
            Some(&lab.ns(a)),
            &format!(
                "tc qdisc add dev {} root netem loss 15% delay 80ms duplicate 2%",
                lab.iface(a, b)
            ),
        );
    }
    let a = Practice::new_in_netns("Valley Clinic", &lab.ns("la"), &[]);
    let b = Practice::new_in_netns("Ridge Cardiology", &lab.ns("lb"), &[]);
    a.cli_ok(&[
        "import",
        bench_data().join("charts-1000.jsonl").to_str().unwrap(),
    ]);
    let (id_a, id_b) = (a.id(), b.id());
    a.cli_ok(&["peer", "add", &id_b, "--addr", "10.88.0.2:7361"]);
    b.cli_ok(&["peer", "add", &id_a, "--addr", "10.88.0.1:7361"]);
    wait_connected(&a, &b);
    let t = Instant::now();
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    wait_until(
        "B to hold the 1,000 charts",
        Duration::from_secs(120),
        || {
            b.get("/status")["charts"].as_u64() == Some(1000)
                && a.get("/sync")["peers"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|x| x["id"] == id_b && x["inSync"] == true))
        },
    );
    let elapsed = t.elapsed();
    eprintln!("netem link: 1,000 charts in {:.1} s", elapsed.as_secs_f64());
    assert_eq!(
        set_checksum(&b.export_all()),
        (1000, manifest_checksum(1000))
    );
    assert!(elapsed < LIMIT, "took {elapsed:?}");
}
