//! `chartmesh`: the command line for staff and admins. It talks to the running daemon
//! through the local API; `init` and the `--offline` reads work on the data directory itself.
//!
//! Exit codes: 0 ok · 1 error · 2 usage · 3 daemon unreachable · 4 not found ·
//! 5 refused by consent or policy · 6 verification failed.

mod client;
mod doctor;
mod fhir;
mod import;
mod offline;
mod output;
mod service;
mod workflow;

use anyhow::Result;
use chartmesh_datadir::datadir::{self, InitOptions};
use clap::{Args, Parser, Subcommand};
use client::{CliError, Client};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "chartmesh",
    version,
    about = "chartmesh: patient charts that travel with the patient, offline-first"
)]
struct Cli {
    /// Data directory of the practice (default: $CHARTMESH_DATA_DIR, else the platform's data directory).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Your name, recorded in the audit log and as the author of changes.
    #[arg(long, global = true, env = "CHARTMESH_USER")]
    user: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: the practice identity, API token and config. No daemon needed.
    Init {
        /// The practice's name, shown to the practices it pairs with (asked for on a
        /// terminal when not given).
        #[arg(long)]
        name: Option<String>,
        /// Address of the local API (loopback only), e.g. 127.0.0.1:7360.
        #[arg(long)]
        api: Option<std::net::SocketAddr>,
        /// UDP address for peer sync, e.g. 127.0.0.1:7361.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// A relay server (HOST:PORT of a Syncthing relay) to reach practices behind NAT.
        #[arg(long)]
        relay: Option<String>,
        /// The relay's id (from its relay://...?id= URI), so no other server can pose as it.
        #[arg(long, requires = "relay")]
        relay_id: Option<String>,
        /// A STUN server (HOST:PORT, e.g. coturn on 3478) telling this practice its public
        /// address, so practices behind NAT can switch from the relay to a direct connection.
        #[arg(long)]
        stun: Option<String>,
    },
    /// Show the practice's id (and a QR code), for pairing with another practice.
    Id,
    /// Pair with, list or remove partner practices.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Record consent: share charts (or --all) with a paired practice.
    Share {
        chart_ids: Vec<String>,
        #[arg(long, conflicts_with = "chart_ids")]
        all: bool,
        /// The paired practice's id.
        #[arg(long = "with", value_name = "PEER_ID")]
        with: String,
        #[arg(long, default_value = "read", value_parser = ["read", "read-write"])]
        access: String,
        #[arg(long, default_value = "continuity", value_parser = ["referral", "continuity", "emergency", "replica"])]
        purpose: String,
        /// When the consent ends, RFC 3339 (e.g. 2026-12-31T23:59:00Z).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Withdraw consent: stop sharing charts (or --all) with a practice.
    Revoke {
        chart_ids: Vec<String>,
        #[arg(long, conflicts_with = "chart_ids")]
        all: bool,
        #[arg(long = "from", value_name = "PEER_ID")]
        from: String,
    },
    /// List consent grants: what is shared with whom.
    Shares,
    /// The daemon's state: practice, charts, peers.
    Status,
    /// Import charts: JSONL files (one chart per line) or FHIR R4 JSON (a Bundle or a single
    /// resource). The kind is told by the extension (.jsonl / .json) or the content.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// auto (default), jsonl or fhir.
        #[arg(long, default_value = "auto", value_parser = ["auto", "jsonl", "fhir"])]
        format: String,
        /// Author recorded for the imported charts (default: --user).
        #[arg(long)]
        author: Option<String>,
    },
    /// Export charts (all, or the listed ones): JSONL, or FHIR R4 (one Bundle file per chart
    /// in the -o directory).
    Export {
        chart_ids: Vec<String>,
        /// jsonl (default), fhir (one Bundle per chart) or ndjson (FHIR Bulk Data: one
        /// Type.ndjson file per resource type).
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "fhir", "ndjson"])]
        format: String,
        /// The output file (jsonl; default stdout) or directory (fhir, required).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Read the data directory directly instead of asking the daemon.
        #[arg(long)]
        offline: bool,
        /// The patient's own copy of one chart: a readable HTML page (summary.html) and an
        /// International Patient Summary FHIR document (ips.json), written into -o DIR.
        #[arg(long, value_name = "CHART", conflicts_with_all = ["chart_ids", "offline"])]
        patient_copy: Option<String>,
    },
    /// Show, search or create charts.
    #[command(subcommand)]
    Chart(ChartCmd),
    /// Add a clinical note.
    #[command(subcommand)]
    Note(NoteCmd),
    /// Add a medication.
    #[command(subcommand)]
    Med(MedCmd),
    /// Add an allergy.
    #[command(subcommand)]
    Allergy(AllergyCmd),
    /// Add an observation (a vital sign or lab result).
    #[command(subcommand)]
    Obs(ObsCmd),
    /// Who changed a chart, where and when.
    History { chart: String },
    /// The audit log, and its verification.
    Audit(AuditArgs),
    /// Patients due or overdue for checks, tests and vaccines (rules in docs/CLINICAL.md).
    Due {
        /// Also list what falls due within this many days.
        #[arg(long, default_value_t = 0)]
        within: u32,
        /// The day to evaluate for, YYYY-MM-DD (default: today).
        #[arg(long)]
        today: Option<String>,
    },
    /// Reports over the practice's charts.
    #[command(subcommand)]
    Report(ReportCmd),
    /// Medication alerts standing in a chart (or in every chart): allergies, interactions,
    /// duplicate therapy. The tables are illustrative, not clinical-grade (docs/CLINICAL.md).
    Alerts { chart: Option<String> },
    /// Write a consistent copy of the store to FILE (online, while the daemon runs), then
    /// verify it. The copy stays encrypted with the store key: keep a copy of store.key apart
    /// from your backups. `chartmesh backup verify FILE` checks a backup.
    Backup(BackupArgs),
    /// Check this practice: daemon and service, ports, disk space, permissions, store
    /// integrity, audit chain, certificate, last backup, peers. Each problem says what to do.
    /// Exit 0 when nothing failed (warnings allowed), 1 when something did.
    Doctor,
    /// Replace the store with a backup (stop the daemon first). The backup is verified first,
    /// what the restore would drop (practices, grants, charts written since the backup) is
    /// listed and must be confirmed; the replaced store is kept beside it.
    Restore {
        file: PathBuf,
        /// Go on without asking (in scripts); without it, a terminal is asked and anything
        /// else is refused.
        #[arg(long)]
        yes: bool,
    },
    /// The store's encryption key.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Print a single-use sign-in link to the console page, to open in a browser.
    Console,
    /// Sync with paired practices.
    #[command(subcommand)]
    Sync(SyncCmd),
    /// Refer a patient to a paired practice: the referral is written into the chart, which is
    /// shared read-write with that practice for it.
    Refer(workflow::ReferArgs),
    /// Referrals made by this practice and made to it, with their status and consult notes.
    Referrals(workflow::ReferralsArgs),
    /// Answer or cancel a referral.
    #[command(subcommand)]
    Referral(workflow::ReferralCmd),
    /// The clinical conflict inbox: risky concurrent edits merged by sync, for review.
    Conflicts(workflow::ConflictsArgs),
    /// Emergency ("break-glass") access to a patient's chart at a paired practice.
    #[command(subcommand)]
    Emergency(workflow::EmergencyCmd),
    /// Run chartmeshd as a systemd service: install, uninstall, status.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Print a shell completion script, e.g. `chartmesh completions bash >
    /// /etc/bash_completion.d/chartmesh` (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), or with --dir write one page per command there
    /// (`chartmesh.1`, `chartmesh-peer-add.1`, …), e.g. for /usr/local/share/man/man1.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BackupArgs {
    #[command(subcommand)]
    cmd: Option<BackupCmd>,
    /// The new backup file (an absolute path outside the data directory).
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Check a backup without restoring it: every page's encryption HMAC and structure
    /// (SQLCipher's cipher_integrity_check, integrity_check), its charts, its audit chain.
    /// Exit 0 when good, 6 when not.
    Verify { file: PathBuf },
}

#[derive(Subcommand)]
enum SyncCmd {
    /// Wait until every paired practice that is not paused (or each --peer) is connected and
    /// in sync both ways. Exit 0 when in sync; on timeout exit 1 naming who is offline or
    /// not in sync yet.
    Wait {
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// A peer that must be connected and in sync (repeatable).
        #[arg(long = "peer", value_name = "PEER_ID")]
        peers: Vec<String>,
        /// Only the peers connected now (do not wait for offline ones to come back).
        #[arg(long, conflicts_with = "peers")]
        connected: bool,
    },
    /// Stop syncing with a peer (work offline from it) until `sync resume`.
    Pause {
        #[arg(long = "peer", value_name = "PEER_ID")]
        peer: String,
    },
    /// Resume syncing with a paused peer; connects at once.
    Resume {
        #[arg(long = "peer", value_name = "PEER_ID")]
        peer: String,
    },
}

#[derive(Subcommand)]
enum PeerCmd {
    /// Pair with a practice: only paired practices can connect (both sides must add each other).
    Add {
        peer_id: String,
        /// Its sync address, HOST:PORT. Without it, the practice is reached through the
        /// relay (sync.relay in config.toml) by its id.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    List,
    /// Unpair: its connections are refused from now on and its grants are revoked.
    Remove {
        peer_id: String,
    },
}

#[derive(Subcommand)]
enum ChartCmd {
    /// Show one chart.
    Show {
        id: String,
        /// Read the data directory directly instead of asking the daemon.
        #[arg(long)]
        offline: bool,
    },
    /// Find charts by MRN, name (prefix) or birth date (YYYY-MM-DD).
    Search {
        query: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Create a chart for a new patient.
    Create {
        #[arg(long)]
        mrn: String,
        #[arg(long)]
        family: String,
        #[arg(long)]
        given: Vec<String>,
        /// YYYY-MM-DD
        #[arg(long)]
        birth_date: String,
        #[arg(long, value_parser = ["male", "female", "other", "unknown"])]
        sex: Option<String>,
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum NoteCmd {
    Add {
        chart: String,
        #[arg(long)]
        author: Option<String>,
        #[arg(long)]
        text: String,
        /// Note id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// When the note was written, RFC 3339 (default: now).
        #[arg(long)]
        date: Option<String>,
    },
}

#[derive(Subcommand)]
enum MedCmd {
    Add {
        chart: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        dose: String,
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        frequency: Option<String>,
        /// RxNorm code.
        #[arg(long)]
        code: Option<String>,
        /// Add it even though it raises alerts (allergy, interaction, duplicate therapy); the
        /// reason is recorded in the chart.
        #[arg(long = "override", value_name = "REASON")]
        override_reason: Option<String>,
    },
    /// Stop an active medication (its entry stays, with status stopped).
    Stop {
        chart: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AllergyCmd {
    Add {
        chart: String,
        #[arg(long)]
        substance: String,
        #[arg(long)]
        reaction: Option<String>,
        #[arg(long, value_parser = ["mild", "moderate", "severe"])]
        severity: Option<String>,
    },
    /// Remove an allergy recorded in error (the chart's history keeps it).
    Remove {
        chart: String,
        #[arg(long)]
        substance: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ObsCmd {
    Add {
        chart: String,
        /// LOINC code, e.g. 8480-6.
        #[arg(long)]
        code: String,
        #[arg(long)]
        value: String,
        #[arg(long)]
        unit: String,
        #[arg(long)]
        display: Option<String>,
        #[arg(long, value_parser = ["vital-signs", "laboratory"])]
        category: Option<String>,
        /// When it was measured, RFC 3339 (default: now).
        #[arg(long)]
        date: Option<String>,
    },
}

#[derive(Args)]
struct AuditArgs {
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
    #[arg(long)]
    chart: Option<String>,
    /// RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    limit: Option<usize>,
    /// Print the entries as a FHIR R4 Bundle of AuditEvent resources.
    #[arg(long)]
    fhir: bool,
}

#[derive(Subcommand)]
enum ReportCmd {
    /// Charts by active condition and patients by due item.
    Population {
        /// The day to evaluate for, YYYY-MM-DD (default: today).
        #[arg(long)]
        today: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Re-encrypt the store under a new random key (stop the daemon first). The old store and
    /// key are kept in rotated-<time>/ in the data directory until you delete them.
    Rotate,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Recompute the hash chain; exit 6 and name the first bad entry if it was tampered with.
    Verify {
        /// Read the data directory directly (the daemon may be stopped).
        #[arg(long)]
        offline: bool,
    },
}

fn main() {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    let json_out = cli.json;
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let (code, msg) = match e.downcast_ref::<CliError>() {
                Some(c) => (c.exit_code(), c.to_string()),
                None => (1, format!("{e:#}")),
            };
            if matches!(e.downcast_ref::<CliError>(), Some(CliError::Reported(_))) {
                // Already reported.
            } else if json_out {
                println!("{}", json!({ "error": msg, "exitCode": code }));
            } else {
                // Messages may quote stored text (a chart id, a name): escaped.
                eprintln!("chartmesh: {}", output::esc_message(&msg));
            }
            code
        }
    };
    std::process::exit(code);
}

/// Prints `v` as JSON, or in words by `human`, which gets a copy with every string escaped
/// for the terminal (text from the store may hold control or bidi characters).
pub(crate) fn print(json_out: bool, v: &Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).expect("json"));
    } else {
        human(&output::escaped(v));
    }
}

/// When the reader of our output goes away (`chartmesh status | head -1`), stop quietly as
/// other command-line tools do, instead of panicking on the failed write.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; it restores the default
    // disposition of SIGPIPE (terminate), which Rust's runtime sets to ignore.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(not(unix))]
    {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.to_string();
            if msg.contains("failed printing to std") {
                std::process::exit(1);
            }
            default(info)
        }));
    }
}

/// `init` without --name: asks on a terminal; elsewhere (a script) it is a usage error.
fn ask_practice_name() -> Result<String> {
    use std::io::{BufRead, IsTerminal};
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(CliError::Usage(
            "give the practice's name: chartmesh init --name \"Your Practice\"".into(),
        )
        .into());
    }
    loop {
        eprint!("Name of this practice (shown to the practices you pair with): ");
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            return Err(CliError::Usage("no practice name given (--name)".into()).into());
        }
        if !line.trim().is_empty() {
            return Ok(line.trim().to_string());
        }
    }
}

/// `chartmesh completions SHELL` and `chartmesh man`: generated from the same clap
/// definition the parser uses, so they list every command and option there is.
fn generate(cmd: &Cmd) -> Result<bool> {
    use clap::CommandFactory;
    match cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "chartmesh",
                &mut std::io::stdout(),
            );
        }
        Cmd::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
        }
        Cmd::Man { dir: Some(d) } => {
            std::fs::create_dir_all(d)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", d.display()))?;
            let n = write_man_pages(Cli::command(), d)?;
            eprintln!("wrote {n} manual pages into {}", d.display());
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// One page for `cmd` and one for each of its subcommands, named like `git`'s
/// (`chartmesh-peer-add.1`). Returns how many were written.
fn write_man_pages(cmd: clap::Command, dir: &std::path::Path) -> Result<usize> {
    fn count(cmd: &clap::Command) -> usize {
        1 + cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(count)
            .sum::<usize>()
    }
    let n = count(&cmd);
    clap_mangen::generate_to(cmd, dir).map_err(|e| {
        anyhow::anyhow!("cannot write the manual pages into {}: {e}", dir.display())
    })?;
    Ok(n)
}

fn run(cli: Cli) -> Result<()> {
    if generate(&cli.cmd)? {
        return Ok(());
    }
    let dir = datadir::resolve(cli.data_dir.clone());
    let user = cli
        .user
        .clone()
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "staff".into()));
    let j = cli.json;
    match cli.cmd {
        Cmd::Init {
            name,
            api,
            listen,
            relay,
            relay_id,
            stun,
        } => {
            if let Some(problem) = datadir::unreadable(&dir) {
                return Err(CliError::Failed(problem).into());
            }
            let name = match name.filter(|n| !n.trim().is_empty()) {
                Some(n) => n.trim().to_string(),
                None => ask_practice_name()?,
            };
            let id = datadir::init(
                &dir,
                InitOptions {
                    name: name.clone(),
                    api,
                    listen,
                    relay,
                    relay_id,
                    stun,
                },
            )?;
            let config = chartmesh_datadir::config::Config::load(&dir.join(datadir::CONFIG))?;
            let v = json!({
                "dataDir": dir.display().to_string(),
                "practice": { "id": id.id.to_string(), "checkedId": id.id.checked(), "name": name },
                "sync": { "listen": config.sync.listen.to_string(), "loopbackOnly": config.sync.listen.ip().is_loopback() },
            });
            print(j, &v, |_| {
                print!("{}", datadir::first_run_guide(&dir, &name, &id.id, &config));
            });
        }
        Cmd::Due { within, today } => {
            let mut q = format!("/due?within={within}");
            if let Some(t) = &today {
                q.push_str(&format!("&today={}", enc(t)));
            }
            let v = Client::connect(&dir, &user)?.get(&q)?;
            print(j, &v, |v| {
                let patients = v["patients"].as_array().cloned().unwrap_or_default();
                for p in &patients {
                    println!(
                        "{}  {}",
                        p["chart"].as_str().unwrap_or(""),
                        p["patient"].as_str().unwrap_or("")
                    );
                    for i in p["items"].as_array().into_iter().flatten() {
                        println!(
                            "  {} {}  {} ({})",
                            if i["overdue"] == true {
                                "OVERDUE"
                            } else {
                                "due    "
                            },
                            i["due"].as_str().unwrap_or(""),
                            i["title"].as_str().unwrap_or(""),
                            i["why"].as_str().unwrap_or("")
                        );
                    }
                }
                println!(
                    "{} of {} patients due or overdue (as of {}, looking {} days ahead)",
                    patients.len(),
                    v["charts"],
                    v["today"].as_str().unwrap_or(""),
                    v["withinDays"]
                );
            });
        }
        Cmd::Report(ReportCmd::Population { today }) => {
            // Counts only: no patient is listed (nor disclosed) for a population report.
            let q = today
                .as_ref()
                .map(|t| format!("&today={}", enc(t)))
                .unwrap_or_default();
            let mut v = Client::connect(&dir, &user)?.get(&format!("/due?patients=false{q}"))?;
            if let Some(o) = v.as_object_mut() {
                o.remove("patients");
            }
            print(j, &v, |v| {
                println!(
                    "Population report: {} charts, as of {}",
                    v["charts"],
                    v["today"].as_str().unwrap_or("")
                );
                println!("\nActive conditions                                         patients");
                for (c, n) in v["conditions"].as_object().into_iter().flatten() {
                    println!("  {c:<56} {n:>6}");
                }
                println!(
                    "\nDue items                                                 due  overdue"
                );
                for r in v["rules"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<54} {:>5} {:>8}",
                        r["title"].as_str().unwrap_or(""),
                        r["due"].as_u64().unwrap_or(0),
                        r["overdue"].as_u64().unwrap_or(0)
                    );
                }
            });
        }
        Cmd::Refer(a) => workflow::refer(&Client::connect(&dir, &user)?, a, j)?,
        Cmd::Referrals(a) => workflow::referrals(&Client::connect(&dir, &user)?, a, j)?,
        Cmd::Referral(c) => workflow::referral(&Client::connect(&dir, &user)?, c, j)?,
        Cmd::Conflicts(a) => workflow::conflicts(&Client::connect(&dir, &user)?, a, j)?,
        Cmd::Emergency(c) => workflow::emergency(&Client::connect(&dir, &user)?, c, j)?,
        Cmd::Med(MedCmd::Stop {
            chart,
            name,
            reason,
        }) => workflow::correct(
            &Client::connect(&dir, &user)?,
            &chart,
            "medications",
            "stop",
            &name,
            &reason,
            j,
        )?,
        Cmd::Allergy(AllergyCmd::Remove {
            chart,
            substance,
            reason,
        }) => workflow::correct(
            &Client::connect(&dir, &user)?,
            &chart,
            "allergies",
            "remove",
            &substance,
            &reason,
            j,
        )?,
        Cmd::Alerts { chart } => {
            let q = chart
                .as_ref()
                .map(|c| format!("?chart={}", enc(c)))
                .unwrap_or_default();
            let v = Client::connect(&dir, &user)?.get(&format!("/alerts{q}"))?;
            print(j, &v, |v| {
                let charts = v["charts"].as_array().cloned().unwrap_or_default();
                if charts.is_empty() {
                    println!("No medication alerts.");
                }
                for c in charts {
                    println!(
                        "{}  {}",
                        c["chart"].as_str().unwrap_or(""),
                        c["patient"].as_str().unwrap_or("")
                    );
                    for a in c["alerts"].as_array().into_iter().flatten() {
                        println!(
                            "  {:<8} {:<17} {}: {}",
                            a["severity"].as_str().unwrap_or(""),
                            a["kind"].as_str().unwrap_or(""),
                            a["medication"].as_str().unwrap_or(""),
                            a["message"].as_str().unwrap_or("")
                        );
                    }
                }
            });
        }
        Cmd::Doctor => doctor::run(&dir, &user, j)?,
        Cmd::Service(c) => {
            let explicit = cli.data_dir.is_some()
                || std::env::var_os("CHARTMESH_DATA_DIR").is_some_and(|v| !v.is_empty());
            service::run(c, &dir, explicit, j)?
        }
        Cmd::Backup(BackupArgs {
            cmd: Some(BackupCmd::Verify { file }),
            ..
        }) => {
            let c = datadir::verify_backup(&dir, &file).map_err(store_file_error)?;
            let v = json!({ "ok": true, "check": c });
            print(j, &v, |_| {
                println!(
                    "{} is a good backup: {} pages verified, {} charts, audit log intact ({} entries).",
                    output::esc(&c.file),
                    c.pages,
                    c.charts,
                    c.audit_entries
                )
            });
        }
        Cmd::Backup(BackupArgs { file: None, .. }) => {
            return Err(CliError::Usage(
                "give the backup file: chartmesh backup /media/usb/chartmesh-DATE.db (or: chartmesh backup verify FILE)".into(),
            )
            .into());
        }
        Cmd::Backup(BackupArgs {
            file: Some(file), ..
        }) => {
            let file = std::path::absolute(&file)?;
            let v = if datadir::daemon_running(&dir) {
                let client = Client::connect(&dir, &user)?;
                let spin = output::spinner("writing and verifying the backup");
                let r = client.post_json(
                    "/backup",
                    &serde_json::to_value(chartmesh_api::BackupRequest { path: file.clone() })?,
                );
                spin.finish_and_clear();
                r?
            } else {
                datadir::check_backup_target(&dir, &file).map_err(CliError::Failed)?;
                let off = offline::Offline::open(&dir, &user, "a backup")?;
                off.audit([("backup".to_string(), None, "backup".to_string())])?;
                let bytes = off.store.backup_to(&file)?;
                drop(off);
                datadir::verify_backup(&dir, &file).map_err(store_file_error)?;
                let _ = datadir::record_backup(
                    &dir,
                    &datadir::LastBackup {
                        time_ms: chartmesh_datadir::now_ms(),
                        path: file.display().to_string(),
                        bytes,
                    },
                );
                json!({ "path": file.display().to_string(), "bytes": bytes })
            };
            print(j, &v, |v| {
                println!(
                    "Backup written to {} ({} bytes) and verified, encrypted with this practice's store key.",
                    v["path"].as_str().unwrap_or(""),
                    v["bytes"]
                );
                println!(
                    "Keep a copy of {} somewhere safe, apart from the backups.",
                    dir.join(datadir::STORE_KEY).display()
                );
            });
        }
        Cmd::Restore { file, yes } => {
            if datadir::daemon_running(&dir) {
                return Err(store_file_error(datadir::RestoreError::Running(
                    dir.display().to_string(),
                ))
                .into());
            }
            let plan = datadir::restore_plan(&dir, &file).map_err(store_file_error)?;
            if !j {
                print_restore_plan(&file, &plan);
            }
            let go = if yes || !plan.drops_anything() {
                true
            } else if std::io::IsTerminal::is_terminal(&std::io::stdin())
                && std::io::IsTerminal::is_terminal(&std::io::stderr())
            {
                eprint!("Restore this backup and drop what is listed above? [y/N] ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES")
            } else {
                let msg = "nothing was changed: a restore drops what is listed; run it from a terminal to be asked, or add --yes";
                if j {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &json!({ "restored": false, "plan": plan, "error": msg, "exitCode": 2 })
                        )?
                    );
                    return Err(CliError::Reported(2).into());
                }
                return Err(CliError::Usage(msg.into()).into());
            };
            if !go {
                return Err(
                    CliError::Failed("restore cancelled; nothing was changed".into()).into(),
                );
            }
            let r = datadir::restore(&dir, &file).map_err(store_file_error)?;
            let v = json!({ "restored": true, "charts": r.charts, "auditEntries": r.audit_entries, "previous": r.previous, "plan": plan });
            print(j, &v, |_| {
                println!(
                    "Restored {} charts; audit log verified ({} entries).",
                    r.charts, r.audit_entries
                );
                if let Some(p) = &r.previous {
                    println!("The store it replaced is kept as {}.", output::esc(p));
                }
            });
        }
        Cmd::Key(KeyCmd::Rotate) => {
            let r = datadir::rotate_key(&dir).map_err(store_file_error)?;
            let v = serde_json::to_value(&r)?;
            print(j, &v, |_| {
                println!(
                    "The store ({} charts, audit log verified: {} entries) is now encrypted with a new key in {}.",
                    r.charts,
                    r.audit_entries,
                    dir.join(datadir::STORE_KEY).display()
                );
                println!(
                    "Back up the new key now. The old store and key are in {}: delete that directory once",
                    r.previous
                );
                println!(
                    "you have a backup made under the new key (backups made before stay readable with the old key only)."
                );
            });
        }
        Cmd::Id => {
            // The identity file is the daemon's own (0600); staff ask the running daemon.
            let id = match chartmesh_datadir::identity::Identity::load(&dir) {
                Ok(i) => i.id,
                Err(e) => {
                    let client = Client::connect(&dir, &user).map_err(|c| match c {
                        CliError::Unreachable(_) => anyhow::anyhow!("{e}"),
                        other => other.into(),
                    })?;
                    let v = client.get("/status")?;
                    v["practice"]["id"]
                        .as_str()
                        .and_then(|s| s.parse::<chartmesh_core::PracticeId>().ok())
                        .ok_or_else(|| CliError::Failed("the daemon did not say its id".into()))?
                }
            };
            let v = json!({ "id": id.to_string(), "checkedId": id.checked() });
            print(j, &v, |_| {
                println!("{}", id.checked());
                if let Ok(code) = qrcode::QrCode::new(id.checked().as_bytes()) {
                    let art = code
                        .render::<qrcode::render::unicode::Dense1x2>()
                        .quiet_zone(true)
                        .build();
                    println!("\n{art}");
                }
                println!(
                    "Read it aloud or scan it at the other practice: chartmesh peer add <this id> --addr HOST:PORT"
                );
            });
        }
        Cmd::Peer(PeerCmd::Add {
            peer_id,
            addr,
            name,
        }) => {
            let mut body = json!({ "id": peer_id, "addr": addr.unwrap_or_default() });
            if let Some(n) = name {
                body["name"] = n.into();
            }
            let v = Client::connect(&dir, &user)?.post_json("/peers", &body)?;
            print(j, &v, |v| {
                println!(
                    "Paired with {} ({}) at {}",
                    v["name"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or(""),
                    v["addr"].as_str().unwrap_or("")
                )
            });
        }
        Cmd::Peer(PeerCmd::List) => {
            let v = Client::connect(&dir, &user)?.get("/peers")?;
            print(j, &v, |v| {
                let peers = v["peers"].as_array().cloned().unwrap_or_default();
                if peers.is_empty() {
                    println!(
                        "No paired practices. Pair with: chartmesh peer add PEER_ID --addr HOST:PORT"
                    );
                }
                let mut t = output::table(&["name", "address", "id"]);
                for p in peers {
                    let id = p["id"]
                        .as_str()
                        .and_then(|i| i.parse::<chartmesh_core::PracticeId>().ok())
                        .map(|i| i.checked())
                        .unwrap_or_default();
                    t.add_row(vec![
                        p["name"].as_str().unwrap_or("").to_string(),
                        p["addr"].as_str().unwrap_or("").to_string(),
                        id,
                    ]);
                }
                if t.row_count() > 0 {
                    println!("{t}");
                }
            });
        }
        Cmd::Peer(PeerCmd::Remove { peer_id }) => {
            let v = Client::connect(&dir, &user)?.delete(&format!("/peers/{}", enc(&peer_id)))?;
            print(j, &v, |_| {
                println!("Unpaired {peer_id}; its grants are revoked")
            });
        }
        Cmd::Share {
            chart_ids,
            all,
            with,
            access,
            purpose,
            expires,
        } => {
            let body = json!({ "charts": chart_ids, "all": all, "peer": with, "access": access, "purpose": purpose, "expires": expires });
            let v = Client::connect(&dir, &user)?.post_json("/shares", &body)?;
            print(j, &v, |v| {
                let n = v["granted"].as_array().map(|a| a.len()).unwrap_or(0);
                if all {
                    println!("Shared all charts with {with} ({access}, {purpose})");
                } else {
                    println!("Shared {n} chart(s) with {with} ({access}, {purpose})");
                }
            });
        }
        Cmd::Revoke {
            chart_ids,
            all,
            from,
        } => {
            let body = json!({ "charts": chart_ids, "all": all, "peer": from });
            let v = Client::connect(&dir, &user)?.post_json("/revoke", &body)?;
            print(j, &v, |v| {
                println!("Revoked {} grant(s) of {from}", v["revoked"]);
                let not: Vec<&str> = v["notShared"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str())
                    .collect();
                if !not.is_empty() {
                    println!(
                        "Not shared with {from}, nothing to revoke: {}",
                        not.join(", ")
                    );
                }
            });
        }
        Cmd::Shares => {
            let v = Client::connect(&dir, &user)?.get("/shares")?;
            print(j, &v, |v| {
                let shares = v["shares"].as_array().cloned().unwrap_or_default();
                if shares.is_empty() {
                    println!("Nothing is shared.");
                }
                let mut t =
                    output::table(&["chart", "access", "purpose", "state", "with", "recorded by"]);
                for g in shares {
                    let state = if g["active"].as_bool() == Some(true) {
                        "active"
                    } else if g["revokedMs"].is_number() {
                        "revoked"
                    } else {
                        "expired"
                    };
                    t.add_row(vec![
                        g["chartId"].as_str().unwrap_or("").to_string(),
                        g["access"].as_str().unwrap_or("").to_string(),
                        g["purpose"].as_str().unwrap_or("").to_string(),
                        state.to_string(),
                        g["peer"]
                            .as_str()
                            .map(|p| p.chars().take(9).collect::<String>())
                            .unwrap_or_default(),
                        g["recordedBy"].as_str().unwrap_or("").to_string(),
                    ]);
                }
                if t.row_count() > 0 {
                    println!("{t}");
                }
            });
        }
        Cmd::Status => {
            let v = Client::connect(&dir, &user)?.get("/status")?;
            print(j, &v, |v| {
                println!(
                    "Practice:   {} ({})",
                    v["practice"]["name"].as_str().unwrap_or(""),
                    v["practice"]["id"].as_str().unwrap_or("")
                );
                println!("Charts:     {}", v["charts"]);
                println!("Data dir:   {}", v["dataDir"].as_str().unwrap_or(""));
                println!("API:        {}", v["api"].as_str().unwrap_or(""));
                println!("Sync:       {}", v["sync"]["listen"].as_str().unwrap_or(""));
                let pm = &v["sync"]["portMapping"];
                match (pm["protocol"].as_str(), pm["external"].as_str()) {
                    (Some(protocol), Some(external)) => println!(
                        "Mapped:     {external} by the router ({protocol}, lease {} min left)",
                        pm["leaseLeftS"].as_u64().unwrap_or(0) / 60
                    ),
                    _ => {
                        if let Some(why) = pm["reason"].as_str() {
                            println!("Mapped:     no port mapping: {why}");
                        }
                    }
                }
                let peers = v["peers"].as_array().cloned().unwrap_or_default();
                println!("Peers:      {}", peers.len());
                for p in &peers {
                    let state = if p["inSync"].as_bool() == Some(true) {
                        "in sync"
                    } else if p["connected"].as_bool() == Some(true) {
                        "syncing"
                    } else {
                        "offline"
                    };
                    let last = p["lastSyncMs"]
                        .as_i64()
                        .map(chartmesh_datadir::rfc3339)
                        .unwrap_or_else(|| "never".into());
                    // How the live connection reaches it: direct, lan or relayed, with
                    // its round-trip time and loss.
                    let path = match p["path"].as_str() {
                        Some(path) => format!(
                            " ({path}, RTT {} ms, loss {}%)",
                            p["rttMs"].as_u64().unwrap_or(0),
                            p["lossPct"].as_f64().unwrap_or(0.0)
                        ),
                        None => String::new(),
                    };
                    println!(
                        "  {} ({}) at {}: {state}{path}; last sync {last}; shared to it {}, from it {}; pending {}{}",
                        p["name"].as_str().unwrap_or(""),
                        &p["id"].as_str().unwrap_or("")
                            [..9.min(p["id"].as_str().unwrap_or("").len())],
                        p["addr"].as_str().unwrap_or(""),
                        p["sharedTo"],
                        p["sharedFrom"],
                        p["pendingChanges"],
                        p["lastError"]
                            .as_str()
                            .map(|e| format!("; last error: {e}"))
                            .unwrap_or_default(),
                    );
                    let mut link = Vec::new();
                    if let Some(path) = p["path"].as_str() {
                        link.push(match p["rttMs"].as_u64() {
                            Some(ms) => format!("{path}, {ms} ms round trip"),
                            None => path.to_string(),
                        });
                    }
                    if let Some(ms) = p["clockSkewMs"].as_i64() {
                        link.push(format!(
                            "clock {:+.1} s{}",
                            ms as f64 / 1000.0,
                            if ms.abs() > doctor::CLOCK_SKEW_LIMIT_MS {
                                " (off: see chartmesh doctor)"
                            } else {
                                ""
                            }
                        ));
                    }
                    link.push(format!(
                        "{} sent, {} received",
                        output::bytes(p["bytesSent"].as_u64().unwrap_or(0)),
                        output::bytes(p["bytesReceived"].as_u64().unwrap_or(0))
                    ));
                    println!("    {}", link.join("; "));
                }
                println!("Shares:     {} active consent grant(s)", v["shares"]);
            });
        }
        Cmd::Import {
            files,
            format,
            author,
        } => {
            let client = Client::connect(&dir, &user)?;
            let author = author.unwrap_or_else(|| user.clone());
            let (fhir_files, jsonl): (Vec<PathBuf>, Vec<PathBuf>) =
                files.into_iter().partition(|f| match format.as_str() {
                    "fhir" => true,
                    "jsonl" => false,
                    _ => fhir::is_fhir_file(f),
                });
            if !fhir_files.is_empty() && !jsonl.is_empty() {
                return Err(CliError::Usage(
                    "import FHIR files and JSONL files in separate commands".into(),
                )
                .into());
            }
            if !fhir_files.is_empty() {
                fhir::import(&client, &fhir_files, &author, j)?;
            } else {
                import::run(&client, &jsonl, &author, j)?;
            }
        }
        Cmd::Export {
            chart_ids,
            format,
            output,
            offline,
            patient_copy,
        } => {
            if let Some(chart) = patient_copy {
                let Some(out_dir) = output else {
                    return Err(CliError::Usage(
                        "--patient-copy writes summary.html and ips.json: give the directory with -o DIR".into(),
                    )
                    .into());
                };
                let v = workflow::patient_copy(&Client::connect(&dir, &user)?, &chart, &out_dir)?;
                print(j, &v, |v| {
                    println!(
                        "The patient copy of {chart} is in {}: {} (open it in a browser) and {}",
                        out_dir.display(),
                        v["html"].as_str().unwrap_or(""),
                        v["ips"].as_str().unwrap_or("")
                    )
                });
                return Ok(());
            }
            if format == "fhir" || format == "ndjson" {
                let Some(out_dir) = output else {
                    return Err(CliError::Usage(
                        "--format fhir writes one Bundle file per chart: give the directory with -o DIR".into(),
                    )
                    .into());
                };
                if offline {
                    return Err(CliError::Usage(
                        "--format fhir needs the running daemon (drop --offline)".into(),
                    )
                    .into());
                }
                let client = Client::connect(&dir, &user)?;
                let n = if format == "ndjson" {
                    fhir::export_ndjson(&client, &chart_ids, &out_dir)?
                } else {
                    fhir::export(&client, &chart_ids, &out_dir)?
                };
                let v = json!({ "exported": n, "dir": out_dir.display().to_string() });
                print(j, &v, |_| {
                    println!(
                        "exported {n} chart(s) as FHIR R4 Bundles into {}",
                        out_dir.display()
                    )
                });
                return Ok(());
            }
            // Offline: the store is opened (and the export audited) before the file is made.
            let off = if offline {
                Some(offline::Offline::open(&dir, &user, "an export")?)
            } else {
                None
            };
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    output::create_private(p)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let n = if let Some(off) = &off {
                offline_export(off, &chart_ids, &mut out)?
            } else {
                let client = Client::connect(&dir, &user)?;
                // A bar on the terminal while a file is written (never over data on stdout).
                let bar = if output.is_some() {
                    let total = if chart_ids.is_empty() {
                        client.get("/status")?["charts"].as_u64().unwrap_or(0)
                    } else {
                        chart_ids.len() as u64
                    };
                    output::progress(total, "exporting")
                } else {
                    indicatif::ProgressBar::hidden()
                };
                let n = client.export_lines(&chart_ids, "jsonl", &mut |line| {
                    out.write_all(line)?;
                    out.write_all(b"\n")?;
                    bar.inc(1);
                    Ok(())
                })?;
                bar.finish_and_clear();
                n
            };
            out.flush()?;
            if let Some(p) = &output {
                if j {
                    println!(
                        "{}",
                        json!({ "exported": n, "path": p.display().to_string() })
                    );
                } else {
                    eprintln!("exported {n} charts");
                }
            }
        }
        Cmd::Chart(ChartCmd::Show { id, offline }) => {
            let (v, custody) = if offline {
                (offline_chart(&dir, &user, &id)?, None)
            } else {
                let client = Client::connect(&dir, &user)?;
                let v = client.get(&format!("/charts/{}", enc(&id)))?;
                // Whose chart this is, and what this practice may do with it.
                let custody = if j { None } else { custody_line(&client, &id) };
                (v, custody)
            };
            print(j, &v, |v| {
                if let Some(c) = &custody {
                    println!("{}\n", output::esc(c));
                }
                print_chart(v)
            });
        }
        Cmd::Chart(ChartCmd::Search { query, limit }) => {
            let v = Client::connect(&dir, &user)?
                .get(&format!("/charts?q={}&limit={limit}", enc(&query)))?;
            print(j, &v, |v| {
                let charts = v["charts"].as_array().cloned().unwrap_or_default();
                if charts.is_empty() {
                    println!("No chart matches {query:?}.");
                }
                let mut t = output::table(&["chart", "patient", "born", "MRN"]);
                for c in &charts {
                    t.add_row(vec![
                        c["id"].as_str().unwrap_or("").to_string(),
                        format!(
                            "{}, {}",
                            c["family"].as_str().unwrap_or(""),
                            c["given"].as_str().unwrap_or("")
                        ),
                        c["birth_date"].as_str().unwrap_or("").to_string(),
                        c["mrn"].as_str().unwrap_or("").to_string(),
                    ]);
                }
                if !charts.is_empty() {
                    println!("{t}");
                }
            });
        }
        Cmd::Chart(ChartCmd::Create {
            mrn,
            family,
            given,
            birth_date,
            sex,
            id,
        }) => {
            let mut patient = json!({ "mrn": mrn, "name": { "given": given, "family": family }, "birthDate": birth_date });
            if let Some(s) = sex {
                patient["sex"] = s.into();
            }
            let mut body = json!({ "patient": patient });
            if let Some(id) = id {
                body["id"] = id.into();
            }
            let v = Client::connect(&dir, &user)?.post_json("/charts", &body)?;
            print(j, &v, |v| {
                println!("Created chart {}", v["id"].as_str().unwrap_or(""))
            });
        }
        Cmd::Note(NoteCmd::Add {
            chart,
            author,
            text,
            id,
            date,
        }) => {
            let mut entry = json!({ "text": text });
            if let Some(i) = id {
                entry["id"] = i.into();
            }
            if let Some(d) = date {
                entry["date"] = d.into();
            }
            if let Some(a) = &author {
                entry["author"] = a.clone().into();
            }
            add(&dir, &user, j, &chart, "notes", entry, author)?;
        }
        Cmd::Med(MedCmd::Add {
            chart,
            name,
            dose,
            route,
            frequency,
            code,
            override_reason,
        }) => {
            let mut entry = json!({ "name": name, "dose": dose });
            if let Some(c) = code {
                entry["code"] = c.into();
                entry["system"] = "RxNorm".into();
            }
            if let Some(r) = route {
                entry["route"] = r.into();
            }
            if let Some(f) = frequency {
                entry["frequency"] = f.into();
            }
            let mut body = json!({ "author": user, "entry": entry });
            if let Some(r) = &override_reason {
                body["override"] = r.clone().into();
            }
            let v = match Client::connect(&dir, &user)?
                .post_json(&format!("/charts/{}/medications", enc(&chart)), &body)
            {
                Ok(v) => v,
                Err(CliError::Api(chartmesh_api::ErrorKind::Alerts, msg)) => {
                    return Err(CliError::Refused(format!(
                        "{msg}\nNot added. To add it anyway: chartmesh med add {chart} --name {name:?} --dose ... --override \"REASON\""
                    ))
                    .into());
                }
                Err(e) => return Err(e.into()),
            };
            print(j, &v, |_| {
                println!("Added to {chart} (medications)");
                if override_reason.is_some() {
                    println!(
                        "The overridden alerts and your reason are recorded in the chart as a note."
                    );
                }
            });
        }
        Cmd::Allergy(AllergyCmd::Add {
            chart,
            substance,
            reaction,
            severity,
        }) => {
            let mut entry = json!({ "substance": substance });
            if let Some(r) = reaction {
                entry["reaction"] = r.into();
            }
            if let Some(s) = severity {
                entry["severity"] = s.into();
            }
            add(&dir, &user, j, &chart, "allergies", entry, None)?;
        }
        Cmd::Obs(ObsCmd::Add {
            chart,
            code,
            value,
            unit,
            display,
            category,
            date,
        }) => {
            let value: serde_json::Number = value.parse().map_err(|_| {
                CliError::Usage(format!(
                    "--value {value:?} is not a number (e.g. 131 or 36.6)"
                ))
            })?;
            let mut entry = json!({ "code": code, "value": value, "unit": unit });
            if let Some(d) = display {
                entry["display"] = d.into();
            }
            if let Some(c) = category {
                entry["category"] = c.into();
            }
            if let Some(d) = date {
                entry["date"] = d.into();
            }
            add(&dir, &user, j, &chart, "observations", entry, None)?;
        }
        Cmd::History { chart } => {
            let v =
                Client::connect(&dir, &user)?.get(&format!("/charts/{}/history", enc(&chart)))?;
            print(j, &v, |v| {
                for c in v["changes"].as_array().cloned().unwrap_or_default() {
                    let t = chartmesh_datadir::rfc3339(c["time_ms"].as_i64().unwrap_or(0));
                    let practice = c["practice"]
                        .as_str()
                        .map(|p| p.chars().take(9).collect::<String>())
                        .unwrap_or_else(|| "?".into());
                    println!(
                        "{t}  {:<24} {:<22} practice {practice}",
                        c["author"].as_str().unwrap_or("?"),
                        c["action"].as_str().unwrap_or("?")
                    );
                }
            });
        }
        Cmd::Sync(cmd @ (SyncCmd::Pause { .. } | SyncCmd::Resume { .. })) => {
            let (path, peer) = match cmd {
                SyncCmd::Pause { peer } => ("/sync/pause", peer),
                SyncCmd::Resume { peer } => ("/sync/resume", peer),
                SyncCmd::Wait { .. } => unreachable!(),
            };
            let v = Client::connect(&dir, &user)?
                .post_json(path, &serde_json::json!({ "peer": peer }))?;
            print(j, &v, |v| {
                println!(
                    "sync with {} {}",
                    v["peer"].as_str().unwrap_or(""),
                    if v["paused"].as_bool() == Some(true) {
                        "paused"
                    } else {
                        "resumed"
                    }
                )
            });
        }
        Cmd::Sync(SyncCmd::Wait {
            timeout,
            peers,
            connected,
        }) => {
            let client = Client::connect(&dir, &user)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(timeout);
            // Each --peer as its canonical id (a name, a short id or the checked form may be given).
            let peers: Vec<String> = {
                let known = client.get("/peers")?;
                peers
                    .iter()
                    .map(|r| peer_ref(&known, r))
                    .collect::<Result<_, _>>()?
            };
            let same = |x: &str, id: &str| x == id;
            loop {
                let v = client.get("/sync")?;
                let list = v["peers"].as_array().cloned().unwrap_or_default();
                let is = |p: &Value, k: &str| p[k].as_bool() == Some(true);
                // Who must be connected and in sync: the named peers; else every paired peer
                // not paused (or, with --connected, those connected now).
                let mut must: Vec<&Value> = Vec::new();
                for id in &peers {
                    match list
                        .iter()
                        .find(|p| p["id"].as_str().is_some_and(|x| same(x, id)))
                    {
                        Some(p) => must.push(p),
                        None => {
                            return Err(CliError::Usage(format!(
                                "practice {} is not paired (chartmesh peer list)",
                                output::esc(id)
                            ))
                            .into());
                        }
                    }
                }
                if peers.is_empty() {
                    must = list
                        .iter()
                        .filter(|p| {
                            if connected {
                                is(p, "connected")
                            } else {
                                !is(p, "paused")
                            }
                        })
                        .collect();
                }
                let behind: Vec<&Value> = must
                    .into_iter()
                    .filter(|p| !(is(p, "connected") && is(p, "inSync")))
                    .collect();
                if behind.is_empty() {
                    print(j, &v, |_| println!("in sync"));
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    let names: Vec<String> = behind
                        .iter()
                        .map(|p| {
                            let name = output::esc(p["name"].as_str().unwrap_or("")).into_owned();
                            let id: String =
                                p["id"].as_str().unwrap_or("").chars().take(9).collect();
                            let state = if is(p, "connected") {
                                "connected, not in sync yet".to_string()
                            } else {
                                match p["lastError"].as_str() {
                                    Some(e) => format!("offline: {}", output::esc(e)),
                                    None => "offline".to_string(),
                                }
                            };
                            format!("{name} ({id}): {state}")
                        })
                        .collect();
                    if j {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&json!({
                                "inSync": false,
                                "waitingFor": behind,
                            }))?
                        );
                        return Err(CliError::Reported(1).into());
                    }
                    return Err(CliError::Failed(format!(
                        "not in sync after {timeout}s: {}",
                        names.join("; ")
                    ))
                    .into());
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        Cmd::Audit(a) => {
            match a.cmd {
                Some(AuditCmd::Verify { offline }) => {
                    let v = if offline {
                        chartmesh_datadir::audit_verify_report(&offline_store(&dir)?)?
                    } else {
                        Client::connect(&dir, &user)?.get("/audit/verify")?
                    };
                    print(j, &v, |v| {
                        if v["ok"].as_bool() == Some(true) {
                            println!("audit log verified: {} entries, chain intact", v["entries"]);
                        } else {
                            println!(
                                "audit log FAILED verification at entry {}: {}",
                                v["firstBadSeq"],
                                v["reason"].as_str().unwrap_or("")
                            );
                        }
                    });
                    if v["ok"].as_bool() != Some(true) {
                        if j {
                            // The JSON report above is the whole output.
                            return Err(CliError::Reported(6).into());
                        }
                        return Err(
                            CliError::Verification("the audit log does not verify".into()).into(),
                        );
                    }
                }
                None => {
                    let client = Client::connect(&dir, &user)?;
                    let mut q = Vec::new();
                    if let Some(c) = &a.chart {
                        q.push(format!("chart={}", enc(c)));
                    }
                    if let Some(s) = a.since {
                        q.push(format!("since={}", enc(&s)));
                    }
                    if let Some(l) = a.limit {
                        q.push(format!("limit={l}"));
                    }
                    if a.fhir {
                        q.push("format=fhir".into());
                        let v = client.get(&format!("/audit?{}", q.join("&")))?;
                        println!("{}", serde_json::to_string_pretty(&v)?);
                        return Ok(());
                    }
                    let v = client.get(&format!("/audit?{}", q.join("&")))?;
                    print(j, &v, |v| {
                        for e in v["entries"].as_array().cloned().unwrap_or_default() {
                            // An entry for a list names its charts: the one asked about, or
                            // how many (`--json` has them all).
                            let charts = e["charts_named"]
                                .as_u64()
                                .unwrap_or(e["charts"].as_array().map_or(0, |c| c.len() as u64));
                            let chart = match (e["chart_id"].as_str(), &a.chart) {
                                (Some(c), _) => c.to_string(),
                                (None, _) if charts == 0 => "-".to_string(),
                                (None, Some(c)) => c.clone(),
                                (None, None) => format!("{charts} charts"),
                            };
                            println!(
                                "{:>6} {}  {:<14} {:<20} {} {}",
                                e["seq"],
                                chartmesh_datadir::rfc3339(e["time_ms"].as_i64().unwrap_or(0)),
                                e["action"].as_str().unwrap_or(""),
                                e["actor"].as_str().unwrap_or(""),
                                chart,
                                e["detail"].as_str().unwrap_or("")
                            );
                        }
                    });
                }
            }
        }
        Cmd::Completions { .. } | Cmd::Man { .. } => unreachable!("handled by generate"),
        Cmd::Console => {
            // A single-use sign-in link (valid two minutes): the page then holds an HttpOnly
            // session cookie, never the API token.
            let client = Client::connect(&dir, &user)?;
            let v = client.post_json("/session/link", &json!({}))?;
            let addr = datadir::api_address(&dir).ok_or_else(|| {
                CliError::Unreachable(format!("no daemon configured in {}", dir.display()))
            })?;
            let url = format!("http://{addr}{}", v["path"].as_str().unwrap_or("/"));
            print(
                j,
                &json!({ "url": url, "expiresInSeconds": v["expiresInSeconds"] }),
                |_| {
                    println!("{url}");
                    eprintln!(
                        "Open it in a browser on this computer within {} seconds; it works once.",
                        v["expiresInSeconds"]
                    );
                },
            );
        }
    }
    Ok(())
}

fn add(
    dir: &std::path::Path,
    user: &str,
    j: bool,
    chart: &str,
    section: &str,
    entry: Value,
    author: Option<String>,
) -> Result<()> {
    let body = json!({ "author": author.unwrap_or_else(|| user.to_string()), "entry": entry });
    let v = Client::connect(dir, user)?
        .post_json(&format!("/charts/{}/{section}", enc(chart)), &body)?;
    print(j, &v, |_| println!("Added to {chart} ({section})"));
    Ok(())
}

/// The canonical id of the paired practice `reference` names (its id in either form, its
/// name, or a unique prefix of its id), from a `/peers` answer.
pub(crate) fn peer_ref(peers: &Value, reference: &str) -> Result<String, CliError> {
    let list: Vec<(chartmesh_core::PracticeId, String)> = peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["id"].as_str()?.parse().ok()?,
                p["name"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect();
    chartmesh_core::ids::match_peer(reference, list.iter().map(|(i, n)| (*i, n.as_str())))
        .map(|id| id.to_string())
        // A peer that is not paired is a usage error (exit 2), said at once.
        .map_err(|e| CliError::Usage(e.to_string()))
}

pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_chart(v: &Value) {
    let p = &v["patient"];
    let given: Vec<&str> = p["name"]["given"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    println!(
        "{}  {}, {}",
        v["id"].as_str().unwrap_or(""),
        p["name"]["family"].as_str().unwrap_or(""),
        given.join(" ")
    );
    println!(
        "MRN {}  born {}  {}",
        p["mrn"].as_str().unwrap_or(""),
        p["birthDate"].as_str().unwrap_or(""),
        p["sex"].as_str().unwrap_or("")
    );
    let section = |title: &str, key: &str, f: &dyn Fn(&Value) -> String| {
        let items = v[key].as_array().cloned().unwrap_or_default();
        println!("\n{title} ({})", items.len());
        for i in items {
            println!("  {}", f(&i));
        }
    };
    let s = |x: &Value| x.as_str().unwrap_or("").to_string();
    section("Problems", "conditions", &|c| {
        format!(
            "{} {} [{}]",
            s(&c["code"]),
            s(&c["display"]),
            s(&c["status"])
        )
    });
    section("Allergies", "allergies", &|a| {
        format!(
            "{} — {} ({})",
            s(&a["substance"]),
            s(&a["reaction"]),
            s(&a["severity"])
        )
    });
    section("Medications", "medications", &|m| {
        format!(
            "{} {} {} {} [{}]",
            s(&m["name"]),
            s(&m["dose"]),
            s(&m["route"]),
            s(&m["frequency"]),
            s(&m["status"])
        )
    });
    // Observations: grouped by what was measured (by name), each group oldest first, so a
    // trend reads down the list; a code recorded without a name gets its LOINC name.
    let obs_name = |o: &Value| -> String {
        match o["display"].as_str().filter(|d| !d.trim().is_empty()) {
            Some(d) => d.to_string(),
            None => chartmesh_core::loinc::name(o["code"].as_str().unwrap_or(""))
                .map(str::to_string)
                .unwrap_or_else(|| format!("LOINC {}", s(&o["code"]))),
        }
    };
    let mut obs = v["observations"].as_array().cloned().unwrap_or_default();
    obs.sort_by_cached_key(|o| (obs_name(o).to_lowercase(), s(&o["date"])));
    println!("\nObservations ({})", obs.len());
    for o in &obs {
        let value = match &o["value"] {
            Value::Null => o["components"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .map(|x| x["value"].to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default(),
            Value::String(t) => t.clone(),
            other => other.to_string(),
        };
        println!(
            "  {:<26} {:<20} {} {}",
            obs_name(o),
            s(&o["date"]),
            value,
            s(&o["unit"])
        );
    }
    section("Immunizations", "immunizations", &|i| {
        format!("{} {}", s(&i["date"]), s(&i["vaccine"]))
    });
    section("Notes", "notes", &|n| {
        format!("{} {}: {}", s(&n["date"]), s(&n["author"]), s(&n["text"]))
    });
}

/// One line saying whose chart this is when it is not this practice's own: received from
/// another practice (read-only or read-write), or revoked / expired there and kept here
/// read-only. None for this practice's own charts (or when the daemon cannot tell).
fn custody_line(client: &Client, id: &str) -> Option<String> {
    let c = client.get(&format!("/charts/{}/custody", enc(id))).ok()?;
    let custodian = c["custodian"].as_str()?;
    let name = client
        .get("/peers")
        .ok()
        .and_then(|p| {
            p["peers"].as_array().and_then(|list| {
                list.iter()
                    .find(|x| x["id"].as_str() == Some(custodian))
                    .and_then(|x| x["name"].as_str().map(str::to_string))
            })
        })
        .unwrap_or_else(|| "another practice".to_string());
    let short: String = custodian.chars().take(9).collect();
    let from = format!("{name} ({short})");
    let when = |k: &str| {
        c[k].as_i64()
            .map(chartmesh_datadir::rfc3339)
            .unwrap_or_default()
    };
    Some(match c["status"].as_str().unwrap_or("") {
        "revoked" => format!(
            "REVOKED COPY: received from {from}, whose consent was withdrawn {}; kept here read-only and hidden from search.",
            when("revokedMs")
        ),
        "expired" => format!(
            "EXPIRED COPY: received from {from}; the consent ended {}; kept here read-only.",
            when("expiresMs")
        ),
        _ if c["access"].as_str() == Some("read-write") => format!(
            "RECEIVED from {from}, shared read-write: your changes go back to it{}.",
            c["expiresMs"]
                .as_i64()
                .map(|_| format!(" (until {})", when("expiresMs")))
                .unwrap_or_default()
        ),
        _ => format!(
            "RECEIVED from {from}, READ-ONLY: changes are made at {name}{}.",
            c["expiresMs"]
                .as_i64()
                .map(|_| format!(" (shared until {})", when("expiresMs")))
                .unwrap_or_default()
        ),
    })
}

/// Says what a restore would drop (ids and names escaped; long lists cut with a count).
fn print_restore_plan(file: &std::path::Path, p: &datadir::RestorePlan) {
    fn list(items: &[String]) -> String {
        let shown: Vec<String> = items
            .iter()
            .take(20)
            .map(|i| output::esc(i).into_owned())
            .collect();
        if items.len() > shown.len() {
            format!(
                "{} and {} more",
                shown.join(", "),
                items.len() - shown.len()
            )
        } else {
            shown.join(", ")
        }
    }
    println!(
        "{} is a good backup: {} charts, audit log verified ({} entries).",
        file.display(),
        p.backup_charts,
        p.backup_audit_entries
    );
    if let Some(e) = &p.current_unreadable {
        println!(
            "The store now cannot be read ({}), so what the restore drops cannot be listed.",
            output::esc(e)
        );
        return;
    }
    if !p.drops_anything() {
        println!("The store now holds nothing the backup does not: nothing is dropped.");
        return;
    }
    println!("Restoring it drops what was written since the backup:");
    if !p.peers_dropped.is_empty() {
        let peers: Vec<String> = p
            .peers_dropped
            .iter()
            .map(|(id, name)| format!("{name} ({})", id.chars().take(9).collect::<String>()))
            .collect();
        println!(
            "  paired practices ({}): {} (pair again after the restore)",
            peers.len(),
            list(&peers)
        );
    }
    if !p.grants_changed.is_empty() {
        let grants: Vec<String> = p
            .grants_changed
            .iter()
            .map(|g| {
                format!(
                    "{} with {} ({}, {}{})",
                    g.chart_id,
                    g.peer.chars().take(9).collect::<String>(),
                    g.access,
                    g.purpose,
                    if g.revoked_ms.is_some() {
                        ", revoked"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        println!(
            "  consent grants recorded, changed or revoked ({}): {}",
            grants.len(),
            list(&grants)
        );
    }
    if !p.charts_created.is_empty() {
        println!(
            "  charts created or received ({}): {}",
            p.charts_created.len(),
            list(&p.charts_created)
        );
    }
    if !p.charts_changed.is_empty() {
        println!(
            "  charts changed, back to their state in the backup ({}): {}",
            p.charts_changed.len(),
            list(&p.charts_changed)
        );
    }
    if p.audit_entries_since > 0 {
        println!("  audit log entries: {}", p.audit_entries_since);
    }
    println!(
        "Nothing is deleted: the store now is kept beside the restored one (store.db.before-restore-<time>)."
    );
}

/// Exit codes for restore and key rotation: 6 a backup that does not verify, 5 a running daemon.
fn store_file_error(e: datadir::RestoreError) -> CliError {
    match e {
        datadir::RestoreError::BadBackup { .. } => CliError::Verification(e.to_string()),
        datadir::RestoreError::Running(_) => CliError::Refused(e.to_string()),
        other => CliError::Failed(other.to_string()),
    }
}

fn offline_store(dir: &std::path::Path) -> Result<chartmesh_store::Store> {
    let path = datadir::store_path(dir);
    let key = datadir::store_key(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    chartmesh_store::Store::open_read_only(&path, &key).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `chart show --offline`: read, audited, then shown.
fn offline_chart(dir: &std::path::Path, user: &str, id: &str) -> Result<Value> {
    let off = offline::Offline::open(dir, user, "a chart read")?;
    let json = match off.store.get(id)? {
        Some(rec) => rec.doc.to_json()?,
        None => return Err(CliError::NotFound(format!("chart {id} not found")).into()),
    };
    off.audit([(
        "read".to_string(),
        Some(id.to_string()),
        "chart".to_string(),
    )])?;
    Ok(json)
}

/// `export --offline`: every chart to export is audited before the first line is written.
fn offline_export(off: &offline::Offline, ids: &[String], out: &mut dyn Write) -> Result<usize> {
    let store = &off.store;
    let ids: Vec<String> = if ids.is_empty() {
        store.chart_ids()?
    } else {
        for id in ids {
            if store.chart_origin(id)?.is_none() {
                return Err(CliError::NotFound(format!("chart {id} not found")).into());
            }
        }
        ids.to_vec()
    };
    off.audit(ids.iter().map(|id| {
        (
            "export".to_string(),
            Some(id.clone()),
            "format=jsonl".to_string(),
        )
    }))?;
    let mut n = 0;
    let mut write_err = None;
    let r = store.for_each_chart(Some(&ids), &mut |rec| {
        let json = rec.doc.to_json()?;
        let mut line = chartmesh_core::canonical::to_canonical(&json);
        line.push('\n');
        if let Err(e) = out.write_all(line.as_bytes()) {
            write_err = Some(e);
            return Err(chartmesh_store::StoreError::Closed);
        }
        n += 1;
        Ok(())
    });
    if let Some(e) = write_err {
        return Err(e.into());
    }
    match r {
        Err(chartmesh_store::StoreError::NotFound(id)) => {
            Err(CliError::NotFound(format!("chart {id} not found")).into())
        }
        other => {
            other?;
            Ok(n)
        }
    }
}
