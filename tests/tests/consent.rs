//! Pairing and consent grants through the real CLI and daemon.

use chartmesh_tests::*;

#[test]
fn pairing_sharing_and_revoking_are_recorded_and_audited() {
    let a = Practice::new("Valley Clinic");
    let b = Practice::new("Ridge Cardiology");
    let c = Practice::new("Lake Clinic");
    let file = bench_data().join("charts-1000.jsonl");
    let first: String = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .take(12)
        .collect::<Vec<_>>()
        .join("\n");
    let small = a.dir.with_extension("12.jsonl");
    std::fs::write(&small, first).unwrap();
    a.cli_ok(&["import", small.to_str().unwrap()]);
    let id_b = b.cli_json(&["id"])["id"].as_str().unwrap().to_string();
    let id_c = c.cli_json(&["id"])["id"].as_str().unwrap().to_string();
    let id_a = a.cli_json(&["id"])["id"].as_str().unwrap().to_string();
    assert!(
        a.cli_ok(&["id"]).contains('█'),
        "the id is also shown as a QR code"
    );

    // Sharing needs pairing first; pairing checks the id and address.
    let out = a.cli(&["share", "chart-000001", "--with", &id_b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer add"));
    assert_eq!(
        a.cli(&["peer", "add", &id_a, "--addr", "127.0.0.1:9"])
            .status
            .code(),
        Some(1),
        "not with itself"
    );
    assert_eq!(
        a.cli(&["peer", "add", "NOT-AN-ID", "--addr", "127.0.0.1:9"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        a.cli(&["peer", "add", &id_b, "--addr", "no-port"])
            .status
            .code(),
        Some(1)
    );
    a.cli_ok(&[
        "peer",
        "add",
        &id_b,
        "--addr",
        "127.0.0.1:7999",
        "--name",
        "Ridge Cardiology",
    ]);
    let peers = a.cli_json(&["peer", "list"]);
    assert_eq!(peers["peers"][0]["id"], id_b.as_str());

    // 10 charts read, 1 read-write.
    let ten: Vec<String> = (1..=10).map(|i| format!("chart-{i:06}")).collect();
    let mut args = vec!["share"];
    args.extend(ten.iter().map(String::as_str));
    args.extend(["--with", &id_b, "--purpose", "continuity"]);
    a.cli_ok(&args);
    a.cli_ok(&[
        "share",
        "chart-000011",
        "--with",
        &id_b,
        "--access",
        "read-write",
        "--purpose",
        "referral",
        "--expires",
        "2099-01-01T00:00:00Z",
    ]);
    assert_eq!(
        a.cli(&["share", "no-such-chart", "--with", &id_b])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(
        a.cli(&[
            "share",
            "chart-000001",
            "--with",
            &id_b,
            "--expires",
            "2001-01-01T00:00:00Z"
        ])
        .status
        .code(),
        Some(1)
    );
    let shares = a.cli_json(&["shares"]);
    let list = shares["shares"].as_array().unwrap();
    assert_eq!(list.len(), 11);
    assert!(list.iter().all(|g| g["active"] == true
        && g["peer"] == id_b.as_str()
        && g["recordedBy"] == "test-user"));
    let rw: Vec<_> = list
        .iter()
        .filter(|g| g["access"] == "read-write")
        .collect();
    assert_eq!(rw.len(), 1);
    assert_eq!(rw[0]["chartId"], "chart-000011");
    assert!(
        list.iter().all(|g| g["peer"] != id_c.as_str()),
        "nothing is shared with C"
    );

    // Revoke one; then everything.
    assert_eq!(
        a.cli_json(&["revoke", "chart-000001", "--from", &id_b])["revoked"],
        1
    );
    let shares = a.cli_json(&["shares"]);
    let revoked: Vec<_> = shares["shares"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["active"] == false)
        .collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["chartId"], "chart-000001");
    assert_eq!(
        a.cli_json(&["revoke", "--all", "--from", &id_b])["revoked"],
        10
    );

    // Every share and revocation is in the audit log.
    let audit = a.cli_json(&["audit"]);
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(
        entries.iter().filter(|e| e["action"] == "share").count(),
        11
    );
    assert_eq!(
        entries.iter().filter(|e| e["action"] == "revoke").count(),
        2
    );
    assert!(entries.iter().any(|e| e["action"] == "pair"));

    // Sharing all charts (a replica), then unpairing revokes it.
    a.cli_ok(&["share", "--all", "--with", &id_b, "--purpose", "replica"]);
    assert_eq!(a.get("/status")["shares"], 1);
    a.cli_ok(&["peer", "remove", &id_b]);
    assert_eq!(a.get("/status")["shares"], 0);
    assert_eq!(a.cli(&["peer", "remove", &id_b]).status.code(), Some(4));
    a.cli_ok(&["audit", "verify"]);
}
