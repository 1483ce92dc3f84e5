//! `chartmesh service install | uninstall | status`: runs chartmeshd as a systemd service,
//! either a system unit (as the `chartmesh` system user, data in /var/lib/chartmesh) or a
//! user unit (as you, data in your data directory, kept running after you log out by
//! lingering). The unit is `Type=notify` (the daemon says when it is ready) with a watchdog,
//! and the daemon logs to the journal (`journalctl -u chartmeshd`).
//!
//! systemd is Linux only; on other systems these commands say what to do instead
//! (docs/OPERATIONS.md). The unit text is made here and nowhere else.

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;
use std::path::{Path, PathBuf};

use crate::client::CliError;

pub const UNIT_NAME: &str = "chartmeshd.service";
/// The data directory of the system service.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/chartmesh";
pub const SYSTEM_USER: &str = "chartmesh";

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Install and start chartmeshd as a systemd service (root: a system service running as
    /// the `chartmesh` user on /var/lib/chartmesh; --user-service: yours, on your data directory).
    Install {
        /// A service of your own (a systemd user unit, no root needed); it keeps running
        /// after you log out (lingering).
        #[arg(long)]
        user_service: bool,
        /// Print the unit and do nothing else.
        #[arg(long)]
        print: bool,
        /// The practice's name, for a data directory the service creates on first start.
        #[arg(long)]
        name: Option<String>,
        /// The chartmeshd program to run (default: the one beside this chartmesh).
        #[arg(long, value_name = "PATH")]
        daemon: Option<PathBuf>,
    },
    /// Stop and remove the service. The data directory is kept.
    Uninstall {
        /// The user service (installed with --user-service).
        #[arg(long)]
        user_service: bool,
    },
    /// Whether the service is installed, enabled and running.
    Status {
        /// The user service (installed with --user-service).
        #[arg(long)]
        user_service: bool,
    },
}

/// What goes into the unit.
pub struct UnitOptions {
    pub daemon: PathBuf,
    pub data_dir: PathBuf,
    /// None for a user unit (it runs as the user).
    pub run_as: Option<String>,
    pub name: Option<String>,
}

/// The unit file's text.
pub fn unit(o: &UnitOptions) -> String {
    let mut exec = format!(
        "{} --data-dir {}",
        quote(&o.daemon.display().to_string()),
        quote(&o.data_dir.display().to_string())
    );
    if let Some(n) = &o.name {
        exec.push_str(&format!(" --name {}", quote(n)));
    }
    let system = o.run_as.is_some();
    let mut u = String::new();
    u.push_str(
        "# Made by `chartmesh service install`; remove with `chartmesh service uninstall`.\n\
         [Unit]\n\
         Description=chartmesh daemon: the practice's charts, synced peer-to-peer with consent\n\
         Documentation=man:chartmesh(1)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\n\
         [Service]\n\
         # The daemon tells systemd when it serves, and pings the watchdog while its store answers.\n\
         Type=notify\n\
         NotifyAccess=main\n\
         WatchdogSec=60\n",
    );
    if let Some(user) = &o.run_as {
        u.push_str(&format!("User={user}\nGroup={user}\n"));
    }
    u.push_str(&format!(
        "Environment=CHARTMESH_DATA_DIR={}\n\
         ExecStart={exec}\n\
         # SIGTERM: chartmeshd stops accepting work, commits queued writes and exits.\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=30\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         # Logs go to the journal: journalctl {}-u chartmeshd\n\
         StandardOutput=journal\n\
         StandardError=journal\n\
         UMask=0077\n",
        quote(&o.data_dir.display().to_string()),
        if system { "" } else { "--user " }
    ));
    if system {
        u.push_str(&format!(
            "# Hardening: the daemon only needs its data directory.\n\
             NoNewPrivileges=true\n\
             ProtectSystem=strict\n\
             ProtectHome=true\n\
             PrivateTmp=true\n\
             ReadWritePaths={}\n",
            o.data_dir.display()
        ));
    }
    u.push_str(&format!(
        "\n[Install]\nWantedBy={}\n",
        if system {
            "multi-user.target"
        } else {
            "default.target"
        }
    ));
    u
}

/// systemd's quoting for a word of ExecStart or Environment.
fn quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:+@,".contains(c))
    {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Where the unit file goes.
fn unit_path(user: bool) -> Result<PathBuf> {
    if user {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .ok_or_else(|| CliError::Failed("cannot tell your home directory ($HOME)".into()))?;
        Ok(base.join("systemd/user").join(UNIT_NAME))
    } else {
        Ok(Path::new("/etc/systemd/system").join(UNIT_NAME))
    }
}

/// The chartmeshd beside this program (as `cargo install` and the release archive put them).
fn default_daemon() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot tell where chartmesh is")?;
    let d = exe.with_file_name(if cfg!(windows) {
        "chartmeshd.exe"
    } else {
        "chartmeshd"
    });
    if !d.is_file() {
        return Err(CliError::Failed(format!(
            "{} is not there: give the daemon's path with --daemon PATH",
            d.display()
        ))
        .into());
    }
    Ok(d)
}

pub fn run(cmd: ServiceCmd, data_dir: &Path, explicit_dir: bool, j: bool) -> Result<()> {
    match cmd {
        ServiceCmd::Install {
            user_service: user,
            print,
            name,
            daemon,
        } => {
            let daemon = match daemon {
                Some(d) => std::path::absolute(d)?,
                None => default_daemon()?,
            };
            let dir = if user || explicit_dir {
                std::path::absolute(data_dir)?
            } else {
                PathBuf::from(SYSTEM_DATA_DIR)
            };
            let opts = UnitOptions {
                daemon,
                data_dir: dir.clone(),
                run_as: (!user).then(|| SYSTEM_USER.to_string()),
                name,
            };
            let text = unit(&opts);
            if print {
                if j {
                    println!(
                        "{}",
                        json!({ "unit": text, "path": unit_path(user)?.display().to_string() })
                    );
                } else {
                    print!("{text}");
                }
                return Ok(());
            }
            install(user, &opts, &text, j)
        }
        ServiceCmd::Uninstall { user_service } => uninstall(user_service, j),
        ServiceCmd::Status { user_service } => status(user_service, j),
    }
}

#[cfg(target_os = "linux")]
fn systemctl(user: bool, args: &[&str]) -> Result<std::process::Output> {
    let mut c = std::process::Command::new("systemctl");
    if user {
        c.arg("--user");
    }
    c.args(args)
        .output()
        .with_context(|| "cannot run systemctl: is this a systemd system?".to_string())
}

#[cfg(target_os = "linux")]
fn must(user: bool, args: &[&str]) -> Result<()> {
    let out = systemctl(user, args)?;
    if !out.status.success() {
        return Err(CliError::Failed(format!(
            "systemctl {}{} failed: {}",
            if user { "--user " } else { "" },
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .into());
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn install(user: bool, o: &UnitOptions, text: &str, j: bool) -> Result<()> {
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        return Err(CliError::Failed(
            "systemd is not running on this computer: run chartmeshd another way (docs/OPERATIONS.md, \"Running as a service\"), or print the unit with --print".into(),
        )
        .into());
    }
    let root = unsafe_is_root();
    if !user && !root {
        return Err(CliError::Usage(
            "a system service needs root: sudo chartmesh service install (or --user-service for a service of your own)".into(),
        )
        .into());
    }
    if !user {
        // The system user the daemon runs as, with the data directory as its home.
        let exists = std::process::Command::new("id")
            .arg(SYSTEM_USER)
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            let st = std::process::Command::new("useradd")
                .args([
                    "--system",
                    "--home-dir",
                    SYSTEM_DATA_DIR,
                    "--create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SYSTEM_USER,
                ])
                .status()
                .context("cannot run useradd")?;
            if !st.success() {
                return Err(CliError::Failed(format!("useradd {SYSTEM_USER} failed")).into());
            }
        }
    }
    if !user && (o.daemon.starts_with("/home") || o.daemon.starts_with("/root")) {
        return Err(CliError::Usage(format!(
            "{} is in a home directory, which the system service cannot see (ProtectHome): install it first, e.g. sudo install -m 0755 {} /usr/local/bin/, then sudo /usr/local/bin/chartmesh service install",
            o.daemon.display(),
            o.daemon.display()
        ))
        .into());
    }
    let path = unit_path(user)?;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    must(user, &["daemon-reload"])?;
    must(user, &["enable", "--now", UNIT_NAME])?;
    let mut linger = None;
    if user {
        let me = std::env::var("USER").unwrap_or_default();
        let ok = std::process::Command::new("loginctl")
            .args(["enable-linger", &me])
            .status()
            .is_ok_and(|s| s.success());
        linger = Some(ok);
    }
    let v = json!({
        "installed": path.display().to_string(),
        "dataDir": o.data_dir.display().to_string(),
        "user": user,
        "lingering": linger,
    });
    crate::print(j, &v, |_| {
        println!("Installed {} and started it.", path.display());
        println!("Data directory: {}", o.data_dir.display());
        if user {
            if linger == Some(true) {
                println!("It keeps running after you log out (lingering is on).");
            } else {
                println!(
                    "Lingering could not be turned on: it stops when you log out (ask an admin: loginctl enable-linger {}).",
                    std::env::var("USER").unwrap_or_default()
                );
            }
            println!("Logs: journalctl --user -u chartmeshd -f");
        } else {
            println!("Logs: journalctl -u chartmeshd -f");
            println!(
                "Staff use it with: export CHARTMESH_DATA_DIR={} (access: docs/OPERATIONS.md, \"Staff access\")",
                o.data_dir.display()
            );
        }
        println!("Next: chartmesh --data-dir {} doctor", o.data_dir.display());
    });
    Ok(())
}

#[cfg(target_os = "linux")]
fn uninstall(user: bool, j: bool) -> Result<()> {
    let path = unit_path(user)?;
    if !path.exists() {
        return Err(
            CliError::NotFound(format!("no service installed at {}", path.display())).into(),
        );
    }
    let _ = systemctl(user, &["disable", "--now", UNIT_NAME]);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    let _ = systemctl(user, &["daemon-reload"]);
    let v = json!({ "removed": path.display().to_string() });
    crate::print(j, &v, |_| {
        println!(
            "Stopped and removed {}. The data directory is kept.",
            path.display()
        )
    });
    Ok(())
}

#[cfg(target_os = "linux")]
fn status(user: bool, j: bool) -> Result<()> {
    let path = unit_path(user)?;
    let word = |args: &[&str]| {
        systemctl(user, args)
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let installed = path.exists();
    let active = word(&["is-active", UNIT_NAME]);
    let enabled = word(&["is-enabled", UNIT_NAME]);
    let v = json!({ "installed": installed, "unit": path.display().to_string(), "active": active, "enabled": enabled });
    crate::print(j, &v, |_| {
        if installed {
            println!("{}: {active}, {enabled}", path.display());
        } else {
            println!(
                "Not installed ({} does not exist): chartmesh service install",
                path.display()
            );
        }
    });
    if !installed {
        return Err(CliError::Reported(4).into());
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(not(target_os = "linux"))]
fn install(_: bool, _: &UnitOptions, _: &str, _: bool) -> Result<()> {
    Err(not_here())
}
#[cfg(not(target_os = "linux"))]
fn uninstall(_: bool, _: bool) -> Result<()> {
    Err(not_here())
}
#[cfg(not(target_os = "linux"))]
fn status(_: bool, _: bool) -> Result<()> {
    Err(not_here())
}
#[cfg(not(target_os = "linux"))]
fn not_here() -> anyhow::Error {
    CliError::Failed(
        "`chartmesh service` manages systemd services (Linux); on this system see docs/OPERATIONS.md, \"Running as a service\"".into(),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_and_user_units_differ_where_they_must() {
        let sys = unit(&UnitOptions {
            daemon: "/usr/local/bin/chartmeshd".into(),
            data_dir: "/var/lib/chartmesh".into(),
            run_as: Some("chartmesh".into()),
            name: Some("Valley \"Family\" Practice".into()),
        });
        assert!(sys.contains("Type=notify\n") && sys.contains("WatchdogSec="));
        assert!(sys.contains("User=chartmesh\n") && sys.contains("ProtectSystem=strict"));
        assert!(
            sys.contains("--name \"Valley \\\"Family\\\" Practice\""),
            "{sys}"
        );
        assert!(sys.contains("WantedBy=multi-user.target"));
        let user = unit(&UnitOptions {
            daemon: "/home/a/.cargo/bin/chartmeshd".into(),
            data_dir: "/home/a/.local/share/chartmesh".into(),
            run_as: None,
            name: None,
        });
        assert!(!user.contains("User=") && !user.contains("ProtectHome"));
        assert!(user.contains("WantedBy=default.target"));
    }

    /// dist/chartmeshd.service (for installing by hand) is the unit `service install` writes.
    #[test]
    fn the_shipped_unit_is_the_generated_one() {
        let generated = unit(&UnitOptions {
            daemon: "/usr/local/bin/chartmeshd".into(),
            data_dir: SYSTEM_DATA_DIR.into(),
            run_as: Some(SYSTEM_USER.into()),
            name: None,
        });
        assert_eq!(
            include_str!("../../dist/chartmeshd.service"),
            generated,
            "regenerate it: chartmesh service install --print --daemon /usr/local/bin/chartmeshd > dist/chartmeshd.service"
        );
    }
}
