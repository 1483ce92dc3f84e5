//! The console, against real daemons.
//!
//! - Its guards over HTTP: loopback `Host` only, same-origin `Origin` only, the session
//!   cookie's flags, the CSRF token on every change made with the cookie, the CSP header,
//!   the acting user recorded from the session.
//! - The whole "Done means" flow in headless Chromium driven over the DevTools protocol
//!   (`headless_chrome`), by clicks and typing: practice A pairs B by pasting its id, B sees
//!   A's "wants to connect" prompt and accepts, A shares a chart and refers it, B accepts the
//!   referral and writes a consult note; then what both daemons hold is checked through the
//!   API. A screenshot of each page is taken (1366×768); with `CONSOLE_SCREENSHOTS=DIR` they
//!   are kept in DIR (the README's images come from `CONSOLE_SCREENSHOTS=docs/console`).

use chartmesh_tests::*;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn root(p: &Practice) -> String {
    let addr = std::fs::read_to_string(p.dir.join("api.addr")).unwrap();
    format!("http://{}", addr.trim())
}

/// Opens a console session with the token: (the `name=value` cookie, the Set-Cookie header,
/// the CSRF token).
fn open_session(p: &Practice, user: &str) -> (String, String, String) {
    let mut r = agent()
        .post(format!("{}/session", p.base()))
        .header("Authorization", format!("Bearer {}", p.token()))
        .send_json(json!({ "user": user }))
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let set = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.body_mut().read_json().unwrap();
    assert_eq!(v["user"], user);
    let cookie = set.split(';').next().unwrap().to_string();
    (cookie, set, v["csrf"].as_str().unwrap().to_string())
}

#[test]
fn the_console_session_is_guarded_against_other_sites() {
    let a = Practice::new("Guarded Clinic");
    let origin = root(&a);
    let ag = agent();
    let (cookie, set, csrf) = open_session(&a, "Nurse Kim");

    // The cookie: HttpOnly, SameSite=Strict, per daemon port, no token in it.
    let port = origin.rsplit(':').next().unwrap();
    assert!(
        set.starts_with(&format!("chartmesh_session_{port}=")),
        "{set}"
    );
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{flag} missing: {set}");
    }
    assert!(!set.contains(&a.token()));

    // GET /session with the cookie gives the page its user and CSRF token.
    let mut r = ag
        .get(format!("{}/session", a.base()))
        .header("Cookie", &cookie)
        .call()
        .unwrap();
    let v: Value = r.body_mut().read_json().unwrap();
    assert_eq!(
        (v["user"].as_str(), v["csrf"].as_str()),
        (Some("Nurse Kim"), Some(&csrf[..]))
    );

    // A change with the cookie: refused without the CSRF token, with a wrong one, without
    // an Origin, or from another origin (another loopback port included); accepted with
    // all of them.
    let change = |origin: Option<&str>, token: Option<&str>| {
        let mut req = ag
            .post(format!("{}/charts", a.base()))
            .header("Cookie", &cookie);
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if let Some(t) = token {
            req = req.header("X-Chartmesh-Csrf", t);
        }
        let mut r = req
            .send_json(json!({ "patient": { "mrn": "G-1", "name": { "family": "Guard", "given": ["Ann"] }, "birthDate": "1970-01-01" } }))
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            r.body_mut().read_json::<Value>().unwrap_or_default(),
        )
    };
    let other_port = format!("http://127.0.0.1:{}", port.parse::<u16>().unwrap() ^ 1);
    for (o, t, why) in [
        (Some(origin.as_str()), None, "no CSRF token"),
        (
            Some(origin.as_str()),
            Some("0".repeat(64).as_str()),
            "a wrong CSRF token",
        ),
        (None, Some(csrf.as_str()), "no Origin"),
        (
            Some("http://attacker.example"),
            Some(csrf.as_str()),
            "a foreign origin",
        ),
        (
            Some(other_port.as_str()),
            Some(csrf.as_str()),
            "another loopback port",
        ),
    ] {
        let (s, body) = change(o, t);
        assert_eq!(s, 403, "{why}: {body}");
    }
    assert_eq!(
        a.get("/charts?q=G-1")["charts"].as_array().unwrap().len(),
        0,
        "a refused change wrote nothing"
    );
    let (s, body) = change(Some(&origin), Some(&csrf));
    assert_eq!(s, 201, "{body}");
    // Recorded under the session's user.
    let entries = a.get("/audit/search?action=create");
    assert_eq!(entries["entries"][0]["actor"], "Nurse Kim", "{entries}");

    // A foreign Host (DNS rebinding) is refused, even with the session cookie.
    let r = ag
        .get(format!("{}/practice", a.base()))
        .header("Host", format!("rebind.example:{port}"))
        .header("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);
    // A GET from a foreign origin is refused too (its answer would not be readable, but
    // reads are audited).
    let r = ag
        .get(format!("{}/practice", a.base()))
        .header("Origin", "http://attacker.example")
        .header("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Every answer, the API's included, carries the strict policy.
    for path in ["/", "/console.js", "/api/v1/practice", "/login?code=x"] {
        let r = ag
            .get(format!("{origin}{path}"))
            .header("Cookie", &cookie)
            .call()
            .unwrap();
        let csp = r
            .headers()
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self'")
                && csp.contains("frame-ancestors 'none'")
                && !csp.contains("unsafe"),
            "{path}: {csp}"
        );
    }

    // The acting user can be changed (with the CSRF token), and signing out ends the session.
    let post = |path: &str, body: Value| {
        ag.post(format!("{}{path}", a.base()))
            .header("Cookie", &cookie)
            .header("Origin", &origin)
            .header("X-Chartmesh-Csrf", &csrf)
            .send_json(body)
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post("/session/user", json!({ "user": "Dr. Osei" })), 200);
    assert_eq!(
        post("/session/user", json!({ "user": "bad\u{202e}name" })),
        422
    );
    // A session never mints sign-in links.
    assert_eq!(post("/session/link", json!({})), 401);
    assert_eq!(post("/session/end", json!({})), 200);
    let r = ag
        .get(format!("{}/practice", a.base()))
        .header("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

// ---- the browser ----

/// Headless Chromium with its profile directory. Dropped, it stops the browser, then every
/// process the browser started (its helpers outlive it by a moment and write into the
/// profile as they exit: once a profile directory was left in /tmp), waits until they are
/// gone, and only then removes the profile.
struct Chromium {
    browser: Option<Browser>,
    profile: Option<tempfile::TempDir>,
}

impl Chromium {
    fn new(profile: tempfile::TempDir, options: impl FnOnce(&Path) -> LaunchOptions) -> Chromium {
        let browser = Browser::new(options(profile.path())).expect("headless Chromium starts");
        Chromium {
            browser: Some(browser),
            profile: Some(profile),
        }
    }
}

impl std::ops::Deref for Chromium {
    type Target = Browser;
    fn deref(&self) -> &Browser {
        self.browser.as_ref().expect("browser")
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let helpers = self
            .browser
            .as_ref()
            .and_then(|b| b.get_process_id())
            .map(descendants)
            .unwrap_or_default();
        // Kills the browser process and waits for it; its helpers then exit on their own
        // (given 10 s, so they remove their own files), or are killed.
        drop(self.browser.take());
        let gone_within = |secs: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(secs);
            while helpers.iter().any(|p| running(*p)) {
                if std::time::Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            true
        };
        if !gone_within(10) {
            for pid in helpers.iter().filter(|p| running(**p)) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            gone_within(5);
        }
        drop(self.profile.take());
    }
}

/// The processes below `pid` (children, their children, ...), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let parent_of = |p: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(all.iter().filter(|c| parent_of(**c) == Some(p)));
        i += 1;
    }
    found.remove(0);
    found
}

/// Whether `pid` is still a live process (not gone, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s[s.rfind(')')? + 1..].trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

const WAIT: Duration = Duration::from_secs(60);

fn chromium() -> Option<PathBuf> {
    std::env::var_os("CHROMIUM").map(PathBuf::from).or_else(|| {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    })
}

/// Evaluates `expr` (a JS expression) in the page and returns its value as JSON.
fn js(tab: &Tab, expr: &str) -> Value {
    let r = tab
        .evaluate(&format!("JSON.stringify(({expr}))"), false)
        .unwrap_or_else(|e| panic!("evaluating {expr}: {e}"));
    r.value
        .and_then(|v| v.as_str().map(str::to_string))
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

/// Waits until the JS expression is true in the page.
fn wait_js(tab: &Tab, what: &str, expr: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while js(tab, expr) != Value::Bool(true) {
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; the page shows: {} / error: {}",
                js(
                    tab,
                    "document.getElementById('view').textContent.slice(0, 600)"
                ),
                text(tab, "#error")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The text of the element `selector`, or "" when there is none.
fn text(tab: &Tab, selector: &str) -> String {
    js(
        tab,
        &format!("(document.querySelector({selector:?}) || {{}}).textContent || ''"),
    )
    .as_str()
    .unwrap_or("")
    .to_string()
}

/// Brings the tab to the front: a background tab's input events are not processed.
fn front(tab: &Tab) {
    tab.bring_to_front().unwrap();
}

fn click(tab: &Tab, selector: &str) {
    front(tab);
    let mut last = None;
    for _ in 0..5 {
        match tab.wait_for_element(selector).and_then(|el| {
            el.click()?;
            Ok(())
        }) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("clicking {selector}: {last:?}");
}

/// Clicks into a text field and types into it, as a person would. A live update may redraw
/// the page between finding the field and typing: then it is found again.
fn type_into(tab: &Tab, selector: &str, text: &str) {
    front(tab);
    let check = format!("(document.querySelector({selector:?}) || {{}}).value === {text:?}");
    for _ in 0..5 {
        let typed = tab
            .wait_for_element(selector)
            .and_then(|el| {
                el.click()?;
                el.type_into(text)?;
                Ok(())
            })
            .is_ok();
        if typed && js(tab, &check) == Value::Bool(true) {
            return;
        }
        js(
            tab,
            &format!("((document.querySelector({selector:?}) || {{}}).value = '', true)"),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("could not type into {selector}");
}

/// Goes to a console page (`#/…`) and waits until its title is shown.
fn open(tab: &Tab, hash: &str, title: &str) {
    js(tab, &format!("location.hash = {hash:?}"));
    wait_js(
        tab,
        &format!("the page {title:?}"),
        &format!(
            "(document.getElementById('view-title') || {{}}).textContent === {title:?} && !document.querySelector('#view .loading')"
        ),
    );
}

fn shot(tab: &Tab, dir: &Path, name: &str) {
    front(tab);
    js(tab, "(window.scrollTo(0, 0), true)");
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{name}: not a screenshot"
    );
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

fn referral_of(p: &Practice, direction: &str) -> Value {
    p.get(&format!("/referrals?direction={direction}"))["referrals"][0].clone()
}

#[test]
fn two_practices_pair_share_refer_and_consult_in_the_browser() {
    let Some(exe) = chromium() else {
        println!(
            "SKIPPED: headless Chromium is needed: install Debian's chromium package (apt install chromium) or set CHROMIUM"
        );
        return;
    };
    let a = Practice::new("Northside Family Practice");
    let b = Practice::new("Riverside Sleep Clinic");
    a.import_first(12);
    let chart = "chart-000002";
    let kept = std::env::var_os("CONSOLE_SCREENSHOTS").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = kept.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();

    let profile = tempfile::tempdir().unwrap();
    let browser = Chromium::new(profile, |profile| LaunchOptions {
        headless: true,
        sandbox: false,
        path: Some(exe),
        window_size: Some((1366, 768)),
        user_data_dir: Some(profile.to_path_buf()),
        // Its shared-memory files (--disable-dev-shm-usage) go into the profile too.
        process_envs: Some(std::collections::HashMap::from([(
            "TMPDIR".to_string(),
            profile.display().to_string(),
        )])),
        idle_browser_timeout: Duration::from_secs(300),
        args: vec![
            OsStr::new("--disable-dev-shm-usage"),
            OsStr::new("--hide-scrollbars"),
        ],
        ..LaunchOptions::default()
    });
    let ta = browser.new_tab().unwrap();
    let tb = browser.new_tab().unwrap();
    for t in [&ta, &tb] {
        t.set_default_timeout(WAIT);
    }

    // A signs in with the single-use link `chartmesh console` prints, as Nurse Adams.
    let link = a.cli_json(&["--user", "Nurse Adams", "console"])["url"]
        .as_str()
        .unwrap()
        .to_string();
    ta.navigate_to(&link)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_js(
        &ta,
        "A signed in",
        "document.getElementById('actor').textContent === 'Nurse Adams'",
    );
    // Any Content-Security-Policy violation from here on is collected and fails the test.
    js(
        &ta,
        "(window.cspViolations = [], document.addEventListener('securitypolicyviolation', (e) => window.cspViolations.push(e.violatedDirective)), true)",
    );
    open(&ta, "#/practice", "This practice");
    assert_eq!(text(&ta, "#practice-id"), a.id());
    wait_js(
        &ta,
        "the QR code",
        "document.querySelector('img.qr').complete && document.querySelector('img.qr').naturalWidth > 100",
    );
    // This practice's reachability: the sync address (loopback only in this test), no
    // relay, LAN discovery off (it needs a non-loopback address).
    assert!(
        text(&ta, "#reach-listen").contains("loopback only"),
        "{}",
        text(&ta, "#reach-listen")
    );
    assert!(
        text(&ta, "#reach-relay").starts_with("none configured"),
        "{}",
        text(&ta, "#reach-relay")
    );
    assert!(
        text(&ta, "#reach-lan").starts_with("off"),
        "{}",
        text(&ta, "#reach-lan")
    );
    shot(&ta, &dir, "practice");
    // The QR code as the other practice would photograph it: a picture of what the console
    // shows.
    let qr_png = ta
        .wait_for_element("img.qr")
        .unwrap()
        .capture_screenshot(CaptureScreenshotFormatOption::Png)
        .unwrap();
    let qr_file = tmp.path().join("practice-a-qr.png");
    std::fs::write(&qr_file, &qr_png).unwrap();

    // B signs in with the form: its user's name and the API token.
    tb.navigate_to(&root(&b))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_js(
        &tb,
        "the sign-in form",
        "!document.getElementById('login').hidden",
    );
    type_into(&tb, "#login-user", "Dr. Rivera");
    type_into(&tb, "#token", &b.token());
    shot(&tb, &dir, "sign-in");
    click(&tb, "#sign-in");
    wait_js(
        &tb,
        "B signed in",
        "document.getElementById('actor').textContent === 'Dr. Rivera'",
    );
    assert_eq!(
        js(&tb, "document.getElementById('token').value"),
        "",
        "the token stays in the form"
    );
    js(
        &tb,
        "(window.cspViolations = [], document.addEventListener('securitypolicyviolation', (e) => window.cspViolations.push(e.violatedDirective)), true)",
    );
    open(&tb, "#/peers", "Peers");
    // B scans A's QR code (the picture uploaded): the pairing form's id field is filled,
    // decoded in the page by the vendored jsQR.
    tb.wait_for_element("#qr-file")
        .unwrap()
        .set_input_files(&[qr_file.to_str().unwrap()])
        .unwrap();
    wait_js(
        &tb,
        "the id read from the QR code",
        &format!(
            "document.querySelector('#pair-form input[name=id]').value === {:?}",
            a.id()
        ),
    );
    assert!(
        text(&tb, "#qr-result").starts_with("Read the ID"),
        "{}",
        text(&tb, "#qr-result")
    );
    // Not submitted here: B pairs from A's prompt below. The field is cleared so the page
    // follows live updates again.
    js(
        &tb,
        "(document.querySelector('#pair-form input[name=id]').value = '', true)",
    );

    // A pairs B by pasting its id and sync address.
    open(&ta, "#/peers", "Peers");
    type_into(&ta, "#pair-form input[name=id]", &b.id());
    type_into(&ta, "#pair-form input[name=addr]", &b.sync_addr());
    type_into(&ta, "#pair-form input[name=name]", "Riverside Sleep Clinic");
    click(&ta, "#pair-form button[type=submit]");
    wait_until("A holds B as a peer", WAIT, || {
        a.get("/peers")["peers"].as_array().unwrap().len() == 1
    });

    // A dials B, which refuses it (not paired) and shows the prompt live.
    wait_js(
        &tb,
        "B's prompt for A",
        &format!(
            "[...document.querySelectorAll('.pending-id')].some((e) => e.textContent === {:?})",
            a.id()
        ),
    );
    wait_js(
        &tb,
        "the pending badge",
        "!document.getElementById('pending-badge').hidden",
    );
    shot(&tb, &dir, "peers-pending");
    type_into(
        &tb,
        "form[id^=accept-] input[name=name]",
        "Northside Family Practice",
    );
    click(&tb, "form[id^=accept-] button[type=submit]");
    wait_js(
        &tb,
        "A listed among B's peers",
        "(document.getElementById('peers') || {}).textContent.includes('Northside Family Practice') && !document.querySelector('.pending-id')",
    );
    let peers = b.get("/peers")["peers"].clone();
    assert_eq!(peers[0]["id"], a.id());
    assert_eq!(
        peers[0]["addr"],
        a.sync_addr(),
        "the address its attempt came from"
    );
    assert_eq!(peers[0]["addedBy"], "Dr. Rivera");
    assert!(
        b.get("/peers/pending")["pending"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    wait_connected(&a, &b);
    // The peer's clock is measured at its first pull of A.
    wait_until("the peer's clock measured", WAIT, || {
        a.get("/sync")["peers"][0]["clockSkewMs"].is_i64()
    });
    open(&ta, "#/practice", "This practice");
    open(&ta, "#/peers", "Peers");
    // B connected, with the path, round trip and clock skew (both clocks are this machine's).
    wait_js(
        &ta,
        "B connected, its path and clock",
        "(t => t.includes('connected') && t.includes('direct, ') && t.includes(' ms') && t.includes('in step'))((document.getElementById('peers') || {}).textContent || '')",
    );
    shot(&ta, &dir, "peers");

    // A finds the chart, shares it for continuity of care, and refers it.
    open(&ta, "#/charts", "Charts");
    type_into(&ta, "#search-form input[name=q]", chart);
    click(&ta, "#search-form button[type=submit]");
    wait_js(
        &ta,
        "the search result",
        &format!("!!document.querySelector('#view a[href=\"#/chart/{chart}\"]')"),
    );
    shot(&ta, &dir, "charts");
    click(&ta, &format!("#view a[href=\"#/chart/{chart}\"]"));
    wait_js(
        &ta,
        "the chart page",
        &format!("(document.getElementById('view-title') || {{}}).textContent === 'Chart {chart}'"),
    );
    click(&ta, "#share-chart button[type=submit]");
    wait_js(
        &ta,
        "the share among the disclosures",
        "(document.getElementById('disclosures') || {}).textContent.includes('share')",
    );
    let grant = a.get("/shares")["shares"][0].clone();
    assert_eq!(
        (
            grant["chartId"].as_str(),
            grant["peer"].as_str(),
            grant["purpose"].as_str(),
            grant["recordedBy"].as_str()
        ),
        (
            Some(chart),
            Some(b.id().as_str()),
            Some("continuity"),
            Some("Nurse Adams")
        ),
        "{grant}"
    );
    type_into(
        &ta,
        "#refer-form input[name=reason]",
        "suspected sleep apnoea",
    );
    type_into(&ta, "#refer-form input[name=specialty]", "sleep medicine");
    click(&ta, "#refer-form button[type=submit]");
    wait_js(
        &ta,
        "the referral on the chart",
        "(document.getElementById('chart-referrals') || {}).textContent.includes('suspected sleep apnoea')",
    );
    let out = referral_of(&a, "outgoing");
    assert_eq!(out["status"], "requested");
    assert_eq!(out["requestedBy"], "Nurse Adams");
    // A note added through the chart's form.
    type_into(
        &ta,
        "#note-form textarea",
        "Snores loudly; daytime sleepiness.",
    );
    click(&ta, "#note-form button[type=submit]");
    wait_js(
        &ta,
        "the note",
        "[...document.querySelectorAll('.note-text')].some((e) => e.textContent.includes('daytime sleepiness'))",
    );
    // The chart's history: the note, by whom and where, named by section (not quoted).
    let history = text(&ta, "#history");
    let first_row = js(
        &ta,
        "[...document.querySelectorAll('#history tbody tr')[0].cells].map((c) => c.textContent)",
    );
    assert_eq!(
        (
            first_row[1].as_str(),
            first_row[2].as_str(),
            first_row[3].as_str()
        ),
        (Some("this practice"), Some("Nurse Adams"), Some("add note")),
        "{history}"
    );
    assert!(!history.contains("daytime sleepiness"), "{history}");
    shot(&ta, &dir, "chart");
    open(&ta, "#/consent", "Consent");
    // The referral's grant (read-write, purpose referral) took the place of the share's.
    wait_js(
        &ta,
        "the grants",
        "(document.getElementById('grants') || {textContent: ''}).textContent.includes('read-writereferral')",
    );
    shot(&ta, &dir, "consent");

    // B sees the referral once the chart has synced, accepts it and writes a consult note.
    open(&tb, "#/work", "Work lists");
    wait_until("the referral reaches B's work list", WAIT, || {
        if js(
            &tb,
            "(document.getElementById('referrals') || {textContent: ''}).textContent.includes('suspected sleep apnoea')",
        ) == Value::Bool(true)
        {
            return true;
        }
        js(
            &tb,
            "(document.getElementById('refresh') && document.getElementById('refresh').click(), false)",
        );
        std::thread::sleep(Duration::from_millis(500));
        false
    });
    click(&tb, "button[aria-label^='Accept referral']");
    wait_js(
        &tb,
        "accepted",
        "[...document.querySelectorAll('#referrals .ref-status')].some((e) => e.textContent === 'accepted')",
    );
    type_into(
        &tb,
        "form[id^=consult-] input[name=text]",
        "Polysomnography booked; CPAP trial likely.",
    );
    click(&tb, "form[id^=consult-] button[type=submit]");
    wait_js(
        &tb,
        "the consult note",
        "(document.getElementById('referrals') || {}).textContent.includes('Polysomnography booked')",
    );
    shot(&tb, &dir, "work-lists");

    // What the daemons hold: B's referral accepted with Dr. Rivera's consult note, and the
    // same on A's side once it has synced back.
    let inc = referral_of(&b, "incoming");
    assert_eq!(inc["status"], "accepted", "{inc}");
    assert_eq!(inc["consultNotes"][0]["author"], "Dr. Rivera", "{inc}");
    wait_until("the consult note reaches A", WAIT, || {
        let r = referral_of(&a, "outgoing");
        r["status"] == "accepted"
            && r["consultNotes"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains("Polysomnography booked"))
    });
    let acted: Vec<String> = b.get("/audit/search?actor=Dr.%20Rivera&limit=500")["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert!(acted.iter().any(|x| x == "pair"), "{acted:?}");

    // The audit page, searched by user, and its chain verified.
    open(&ta, "#/audit", "Audit log (newest first)");
    type_into(&ta, "#audit-form input[name=actor]", "Nurse Adams");
    click(&ta, "#audit-form button[type=submit]");
    wait_js(
        &ta,
        "the search by user",
        "location.hash.includes('actor=Nurse') && (document.querySelector('#view table') || {}).textContent.includes('refer')",
    );
    click(&ta, "#verify");
    wait_js(
        &ta,
        "the chain verified",
        "document.getElementById('verify-result').textContent.startsWith('The chain is intact')",
    );
    shot(&ta, &dir, "audit");

    for (who, t) in [("A", &ta), ("B", &tb)] {
        assert_eq!(
            js(t, "window.cspViolations"),
            json!([]),
            "{who}: CSP violations"
        );
        assert_eq!(text(t, "#error"), "", "{who}: an error was shown");
    }
    if let Some(k) = kept {
        println!("screenshots kept in {}", k.display());
    }
}
