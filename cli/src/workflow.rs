//! The CLI of the workflows across practices (referrals, the conflict inbox, corrections)
//! and of the patient copy.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::Client;
use crate::{enc, print};

#[derive(Args)]
pub struct ReferArgs {
    /// The chart to refer (one of this practice's own charts).
    pub chart: String,
    /// The paired practice's id.
    #[arg(long, value_name = "PEER_ID")]
    pub to: String,
    #[arg(long)]
    pub reason: String,
    #[arg(long)]
    pub specialty: Option<String>,
}

#[derive(Args)]
pub struct ReferralsArgs {
    /// Only referrals made to this practice.
    #[arg(long, conflicts_with = "outgoing")]
    pub incoming: bool,
    /// Only referrals made by this practice.
    #[arg(long)]
    pub outgoing: bool,
}

#[derive(Subcommand)]
pub enum ReferralCmd {
    /// Accept an incoming referral.
    Accept { referral: String },
    /// Decline an incoming referral.
    Decline { referral: String },
    /// Add a consult note to an incoming referral (it is written into the chart).
    Note {
        referral: String,
        #[arg(long)]
        text: String,
    },
    /// Complete an accepted referral, optionally with a final consult note.
    Complete {
        referral: String,
        #[arg(long)]
        text: Option<String>,
    },
    /// Cancel a referral this practice made; the chart is no longer shared for it.
    Cancel { referral: String },
}

#[derive(Args)]
pub struct ConflictsArgs {
    #[command(subcommand)]
    pub cmd: Option<ConflictsCmd>,
    /// Also list resolved conflicts.
    #[arg(long)]
    pub all: bool,
}

#[derive(Subcommand)]
pub enum ConflictsCmd {
    /// Mark a conflict reviewed, saying what was done.
    Resolve {
        id: i64,
        #[arg(long)]
        note: String,
    },
}

pub fn refer(c: &Client, a: ReferArgs, j: bool) -> anyhow::Result<()> {
    let v = c.post_json(
        "/referrals",
        &json!({ "chart": a.chart, "to": a.to, "reason": a.reason, "specialty": a.specialty }),
    )?;
    print(j, &v, |v| {
        println!(
            "Referral {} made: chart {} is shared read-write with the practice for it.",
            v["referral"]["id"].as_str().unwrap_or(""),
            a.chart
        );
    });
    Ok(())
}

pub fn referrals(c: &Client, a: ReferralsArgs, j: bool) -> anyhow::Result<()> {
    let dir = if a.incoming {
        "incoming"
    } else if a.outgoing {
        "outgoing"
    } else {
        "all"
    };
    let v = c.get(&format!("/referrals?direction={dir}"))?;
    print(j, &v, |v| {
        let list = v["referrals"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            println!("No referrals.");
        }
        for r in list {
            let peer = if r["direction"] == "incoming" {
                format!("from {}", short(&r["from"]))
            } else {
                format!("to {}", short(&r["to"]))
            };
            let access = if r["chartAccess"] == "revoked" {
                "  (the chart is no longer shared with us)"
            } else {
                ""
            };
            println!(
                "{}  {:<9} {:<8} {}  {} {}  {}{access}",
                r["referral"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or(""),
                r["direction"].as_str().unwrap_or(""),
                peer,
                r["chart"].as_str().unwrap_or(""),
                r["patient"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or(""),
            );
            for n in r["consultNotes"].as_array().into_iter().flatten() {
                println!(
                    "    consult note by {} ({}): {}",
                    n["author"].as_str().unwrap_or(""),
                    n["date"].as_str().unwrap_or(""),
                    n["text"].as_str().unwrap_or("")
                );
            }
        }
    });
    Ok(())
}

fn short(v: &Value) -> String {
    v.as_str().unwrap_or("").chars().take(9).collect()
}

pub fn referral(c: &Client, cmd: ReferralCmd, j: bool) -> anyhow::Result<()> {
    let (id, step, text) = match cmd {
        ReferralCmd::Accept { referral } => (referral, "accept", None),
        ReferralCmd::Decline { referral } => (referral, "decline", None),
        ReferralCmd::Note { referral, text } => (referral, "note", Some(text)),
        ReferralCmd::Complete { referral, text } => (referral, "complete", text),
        ReferralCmd::Cancel { referral } => (referral, "cancel", None),
    };
    let v = c.post_json(
        &format!("/referrals/{}/{step}", enc(&id)),
        &json!({ "text": text }),
    )?;
    print(j, &v, |v| {
        let status = v["status"].as_str().unwrap_or("");
        if step == "note" {
            println!(
                "Consult note added to referral {id} (the referral stays {status}). The practice on the other side sees it at the next sync."
            );
        } else {
            println!(
                "Referral {id}: {status}. The practice on the other side sees it at the next sync."
            );
        }
    });
    Ok(())
}

pub fn conflicts(c: &Client, a: ConflictsArgs, j: bool) -> anyhow::Result<()> {
    if let Some(ConflictsCmd::Resolve { id, note }) = a.cmd {
        let v = c.post_json(
            &format!("/conflicts/{id}/resolve"),
            &json!({ "resolution": note }),
        )?;
        print(j, &v, |_| println!("Conflict {id} resolved."));
        return Ok(());
    }
    let v = c.get(&format!("/conflicts?all={}", a.all))?;
    print(j, &v, |v| {
        let list = v["conflicts"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            println!("The conflict inbox is empty.");
        }
        for x in list {
            let state = if x["resolvedMs"].is_number() {
                format!(
                    "resolved by {}: {}",
                    x["resolvedBy"].as_str().unwrap_or(""),
                    x["resolution"].as_str().unwrap_or("")
                )
            } else {
                "OPEN".into()
            };
            println!(
                "#{}  {}  {}  {}\n    {}",
                x["id"],
                x["chart"].as_str().unwrap_or(""),
                x["kind"].as_str().unwrap_or(""),
                state,
                x["summary"].as_str().unwrap_or("")
            );
        }
    });
    Ok(())
}

/// `allergy remove` and `med stop`.
pub fn correct(
    c: &Client,
    chart: &str,
    section: &str,
    action: &str,
    target: &str,
    reason: &str,
    j: bool,
) -> anyhow::Result<()> {
    let v = c.post_json(
        &format!("/charts/{}/{section}/{action}", enc(chart)),
        &json!({ "target": target, "reason": reason }),
    )?;
    print(j, &v, |v| {
        let n = v["changed"].as_u64().unwrap_or(0);
        let entries = if n == 1 { "entry" } else { "entries" };
        let target = crate::output::esc(target);
        match section {
            "allergies" => println!("{chart}: removed the allergy to {target} ({n} {entries})."),
            _ => println!(
                "{chart}: stopped {target} ({n} {entries}); the entries stay, marked stopped."
            ),
        }
    });
    Ok(())
}

/// Writes the patient copy of `chart` into `dir` (created if needed): `summary.html` and
/// `ips.json`, each written to a temporary name and renamed, so a file is whole or absent.
pub fn patient_copy(c: &Client, chart: &str, dir: &std::path::Path) -> anyhow::Result<Value> {
    use anyhow::Context;
    let v = c.get(&format!("/charts/{}/patient-copy", enc(chart)))?;
    crate::output::create_private_dir(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let html = dir.join("summary.html");
    let ips = dir.join("ips.json");
    // Readable by this user only: a patient's record.
    let write = |path: &std::path::Path, bytes: &[u8]| -> anyhow::Result<()> {
        crate::output::write_private(path, bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(&html, v["html"].as_str().unwrap_or("").as_bytes())?;
    write(
        &ips,
        serde_json::to_string_pretty(&v["ips"])
            .expect("json")
            .as_bytes(),
    )?;
    Ok(json!({
        "chart": chart,
        "html": html.display().to_string(),
        "ips": ips.display().to_string(),
    }))
}

#[derive(Subcommand)]
pub enum EmergencyCmd {
    /// Ask the connected practices for a patient's chart in an emergency (break-glass). Each
    /// custodian's policy decides; granted access is read-only and ends by itself.
    Request {
        #[arg(long, required_unless_present = "family")]
        mrn: Option<String>,
        #[arg(long, requires = "birth_date", conflicts_with = "mrn")]
        family: Option<String>,
        /// YYYY-MM-DD
        #[arg(long, requires = "family")]
        birth_date: Option<String>,
        #[arg(long)]
        reason: String,
        /// Ask only this practice.
        #[arg(long, value_name = "PEER_ID")]
        peer: Option<String>,
    },
    /// Emergency requests made here and answered here, for review.
    Log,
}

pub fn emergency(c: &Client, cmd: EmergencyCmd, j: bool) -> anyhow::Result<()> {
    match cmd {
        EmergencyCmd::Request {
            mrn,
            family,
            birth_date,
            reason,
            peer,
        } => {
            let v = c.post_json(
                "/emergency/request",
                &json!({ "mrn": mrn, "family": family, "birthDate": birth_date, "reason": reason, "peer": peer }),
            )?;
            let granted = v["answers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["outcome"] == "granted"));
            print(j, &v, |v| {
                for a in v["answers"].as_array().into_iter().flatten() {
                    let p = short(&a["peer"]);
                    match a["outcome"].as_str().unwrap_or("") {
                        "granted" => println!(
                            "{p}: granted, read-only until {}: {}",
                            a["expires"].as_str().unwrap_or(""),
                            a["charts"]
                                .as_array()
                                .map(|c| c
                                    .iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "))
                                .unwrap_or_default()
                        ),
                        "denied" => println!("{p}: denied: {}", a["why"].as_str().unwrap_or("")),
                        "not-found" => println!("{p}: no matching patient"),
                        _ => println!("{p}: no answer: {}", a["why"].as_str().unwrap_or("")),
                    }
                }
            });
            if !granted {
                return Err(crate::client::CliError::Reported(5).into());
            }
            // Granted is not enough: say so when a granted chart has not arrived.
            let missing: Vec<String> = v["answers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["outcome"] == "granted")
                .flat_map(|a| {
                    let arrived = a["arrived"].as_array().cloned().unwrap_or_default();
                    a["charts"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(move |c| !arrived.contains(c))
                        .filter_map(|c| c.as_str().map(str::to_string))
                })
                .collect();
            if !missing.is_empty() {
                let msg = format!(
                    "access was granted but {} has not arrived yet; check `chartmesh status` for the sync with that practice",
                    missing.join(", ")
                );
                if j {
                    return Err(crate::client::CliError::Reported(1).into());
                }
                return Err(crate::client::CliError::Failed(msg).into());
            }
        }
        EmergencyCmd::Log => {
            let v = c.get("/emergency/log")?;
            print(j, &v, |v| {
                let list = v["entries"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("No emergency access requested or answered here.");
                }
                for e in list {
                    println!(
                        "{}  {:<19} {:<12} {}  {}  {}",
                        e["time_ms"]
                            .as_i64()
                            .map(chartmesh_datadir::rfc3339)
                            .unwrap_or_default(),
                        e["action"].as_str().unwrap_or(""),
                        e["actor"].as_str().unwrap_or(""),
                        short(&e["peer"]),
                        e["chart_id"].as_str().unwrap_or("-"),
                        e["detail"].as_str().unwrap_or("")
                    );
                }
            });
        }
    }
    Ok(())
}
