//! The console page, rendered by headless Chromium against a real daemon: it signs in with
//! the single-use link `chartmesh console` prints (a session cookie, never the token in the
//! page), and shows the practice, its work lists (referrals, the conflict inbox, who is
//! due) as the API reports them.

use chartmesh_tests::*;

#[test]
fn the_console_shows_the_practice_and_its_work_lists() {
    let a = Practice::new("Console Clinic");
    let b = Practice::new("Console Specialist");
    pair(&a, &b);
    a.import_first(30);
    a.cli_ok(&[
        "refer",
        "chart-000002",
        "--to",
        &b.id(),
        "--reason",
        "suspected sleep apnoea",
    ]);
    let addr = std::fs::read_to_string(a.dir.join("api.addr")).unwrap();
    let page = format!("http://{}/", addr.trim());
    let link = a.cli_json(&["console"])["url"]
        .as_str()
        .unwrap()
        .to_string();
    let dom = chromium_dom_url(&link);
    assert!(
        dom.contains("Console Clinic"),
        "the practice name is missing"
    );
    assert!(
        dom.contains("suspected sleep apnoea"),
        "the referral is missing"
    );
    assert!(dom.contains("requested") && dom.contains("outgoing"));
    assert!(dom.contains("Nothing to review."));
    // The due list of the 30 bench charts is not empty, and is shown.
    let due = a.get("/due?within=30");
    let first = due["patients"][0]["patient"].as_str().unwrap();
    assert!(dom.contains(first), "due patient {first} missing");
    // Without a session (a fresh browser, or the used link again) the page shows the
    // sign-in box, not data.
    let dom = chromium_dom_url(&page);
    assert!(!dom.contains("suspected sleep apnoea"));
    assert!(dom.contains("Not signed in"), "{dom}");
    let dom = chromium_dom_url(&link);
    assert!(!dom.contains("suspected sleep apnoea"));
    assert!(dom.contains("already used or has expired"), "{dom}");
}
