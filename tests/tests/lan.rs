//! Two practices on one LAN (two network namespaces joined by a veth) pair by id alone —
//! `peer add ID` with no address — find each other by mDNS and sync; each accepts the
//! other's connection from an address it was never given, by the pinned practice id.
//! Needs root and iproute2; skips with a message otherwise.

use chartmesh_tests::netns::{Lab, unavailable};
use chartmesh_tests::*;
use std::time::Duration;

#[test]
fn practices_on_one_lan_pair_by_id_alone() {
    if let Some(why) = unavailable(&["ip"]) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::lan();
    let a = Practice::new_in_netns("Valley Clinic", &lab.ns("la"), &[]);
    let b = Practice::new_in_netns("Ridge Cardiology", &lab.ns("lb"), &[]);
    a.import_first(50);
    let (id_a, id_b) = (a.id(), b.id());
    a.cli_ok(&["peer", "add", &id_b, "--name", "Ridge"]);
    b.cli_ok(&["peer", "add", &id_a, "--name", "Valley"]);
    wait_connected(&a, &b);
    wait_connected(&b, &a);
    let path = |p: &Practice, id: &str| {
        p.get("/sync")["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["id"] == id).cloned())
            .map(|v| v["path"].clone())
    };
    // The side that accepted sees the connection from an address it was never given; the
    // side that dialled used the address announced on the LAN.
    let paths = [path(&a, &id_b), path(&b, &id_a)];
    assert!(
        paths.iter().any(|p| p.as_ref().is_some_and(|p| p == "lan")),
        "one side dialled the announced LAN address: {paths:?}"
    );
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    wait_until("B to hold the 50 charts", Duration::from_secs(60), || {
        b.get("/status")["charts"].as_u64() == Some(50)
    });
    a.sync_wait(&b, 60);
    assert_eq!(set_checksum(&b.export_all()), set_checksum(&a.export_all()));
}
