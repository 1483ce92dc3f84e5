//! `chartmeshd`: runs a practice's daemon in the foreground. On first start with a new data
//! directory it initialises one (identity, token, config) so one command gives a working node.

use anyhow::{Context, Result, bail};
use chartmesh_daemon::config::Config;
use chartmesh_daemon::datadir::{self, InitOptions};
use chartmesh_daemon::identity::Identity;
use chartmesh_daemon::node::Node;
use chartmesh_store::{Store, StoreOptions};
use clap::Parser;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "chartmeshd",
    version,
    about = "chartmesh daemon: a practice's charts, offline-first, synced peer-to-peer with consent"
)]
struct Args {
    /// Data directory (default: $CHARTMESH_DATA_DIR, else the platform's data directory).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The practice's name, shown to the practices it pairs with: used when the data
    /// directory is created on first start (asked for on a terminal when not given).
    #[arg(long)]
    name: Option<String>,
}

/// The name of a new practice: `--name`, else asked for on a terminal, else a placeholder
/// the operator is told how to change.
fn first_start_name(given: Option<String>) -> Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    if let Some(n) = given.filter(|n| !n.trim().is_empty()) {
        return Ok(n.trim().to_string());
    }
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        loop {
            eprint!("Name of this practice (shown to the practices you pair with): ");
            std::io::stderr().flush().ok();
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line)? == 0 {
                bail!("no practice name given: start again with --name \"Your Practice\"");
            }
            if !line.trim().is_empty() {
                return Ok(line.trim().to_string());
            }
        }
    }
    eprintln!(
        "chartmeshd: no --name given: the practice is called \"My Practice\"; change practice.name in config.toml and restart to rename it"
    );
    Ok("My Practice".into())
}

/// glibc serves allocations above a threshold with their own mmap, returned to the system
/// on free; after the first such free it raises that threshold (up to 32 MB), so sync
/// messages (up to ~0.5 MB each, thousands per initial sync) then come from the heap arenas
/// and leave them fragmented. A fixed 128 KB threshold keeps large buffers out of the heap.
/// Measured on the 10,000-chart bench (docs/PERFORMANCE.md): peak RSS of the receiving
/// daemon ~62 → ~52 MB, of the sender ~49 → ~41 MB, import rate unchanged. (Capping the
/// number of arenas instead also lowered RSS but stalled some imports.)
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists; mallopt only sets
    // a tunable of the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chartmeshd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log file or the journal gets plain text (NO_COLOR too).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    if config.log.format == "json" {
        builder.json().init();
    } else if std::env::var_os("JOURNAL_STREAM").is_some() {
        // Under systemd stderr goes to the journal, which stamps each line itself.
        builder.without_time().init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> Result<()> {
    let dir = datadir::resolve(args.data_dir);
    if let Some(problem) = datadir::unreadable(&dir) {
        bail!("{problem}");
    }
    let created = if !datadir::is_initialized(&dir) {
        let name = first_start_name(args.name.clone())?;
        let id = datadir::init(
            &dir,
            InitOptions {
                name: name.clone(),
                api: None,
                listen: None,
                relay: None,
                relay_id: None,
                stun: None,
            },
        )
        .with_context(|| format!("creating data directory {}", dir.display()))?;
        Some((id.id, name))
    } else {
        None
    };
    let config = Config::load(&dir.join(datadir::CONFIG))?;
    init_logging(&config);
    if let Some((id, name)) = created {
        tracing::info!(data_dir = %dir.display(), practice = %id, "created a new data directory");
        eprint!("{}", datadir::first_run_guide(&dir, &name, &id, &config));
    }

    let lock = datadir::try_lock(&dir)
        .with_context(|| format!("opening {}", dir.join(datadir::LOCK).display()))?;
    let Some(lock) = lock else {
        bail!(
            "another chartmeshd is already running on {} (or an offline chartmesh command is reading it); stop it first (one daemon per data directory)",
            dir.display()
        );
    };

    let identity = Identity::load(&dir)?;
    let key = datadir::daemon_store_key(&dir).context("loading the store key")?;
    // Damaged pages or lost commits stop the start: nothing corrupt is served or sent
    // (chartmesh_store::integrity, docs/RELIABILITY.md). The check runs on the connection
    // that then becomes the writer's.
    let (store, checked) =
        Store::open_checked(&datadir::store_path(&dir), &key, StoreOptions::default())
            .context("opening the chart store")?;
    if let Some(r) = checked {
        tracing::info!(
            pages = r.pages,
            scanned = r.scanned,
            ms = r.millis,
            "store checked"
        );
    }
    let token = datadir::read_token(&dir)
        .context("reading the API token (api-token in the data directory)")?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the local API: is the port in use? change api.listen in config.toml", config.api.listen))?;
    let api_addr = listener.local_addr()?;
    datadir::write_public(
        &dir.join(datadir::API_ADDR),
        api_addr.to_string().as_bytes(),
    )?;

    let practice = identity.id;
    let mut config = config;
    config.api.listen = api_addr;
    let node = Node::new(store.clone(), identity, config.clone(), dir.clone());
    let metrics = chartmesh_daemon::metrics::Metrics::new(node.clone());
    let app = chartmesh_daemon::api::router(node.clone(), &token)
        .layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            chartmesh_daemon::metrics::time_writes,
        ))
        .merge(chartmesh_daemon::metrics::router(metrics));

    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        });
    }
    let sync = chartmesh_daemon::sync::SyncService::start(
        node.clone(),
        config.sync.listen,
        shutdown.clone(),
    )
    .with_context(|| format!("starting sync on {} (UDP)", config.sync.listen))?;
    let _ = node.sync.set(sync.clone());
    tokio::spawn(node.clone().emergency_expiry_loop(shutdown.clone()));
    if let Some((every_ms, backup_dir, keep)) =
        config.backup.schedule().map_err(anyhow::Error::msg)?
    {
        tokio::spawn(chartmesh_daemon::backups::run(
            node.clone(),
            every_ms,
            backup_dir,
            keep,
            shutdown.clone(),
        ));
    }
    datadir::write_public(
        &dir.join(datadir::SYNC_ADDR),
        sync.local_addr().to_string().as_bytes(),
    )?;
    tracing::info!(practice = %practice, name = %config.practice.name, api = %api_addr, sync = %sync.local_addr(), data_dir = %dir.display(), "chartmeshd ready");
    service_ready(&node, shutdown.clone());
    let serve = axum::serve(listener, app).with_graceful_shutdown({
        let s = shutdown.clone();
        async move { s.cancelled().await }
    });
    let result = serve.await;
    #[cfg(target_os = "linux")]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    sync.close().await;
    // Drain queued writes before exiting.
    let closed = tokio::task::spawn_blocking(move || store.close()).await;
    if closed.is_ok() {
        // The next start may skip the page scan if nothing touches the files meanwhile.
        chartmesh_store::integrity::record_clean_close(&datadir::store_path(&dir));
    }
    let _ = std::fs::remove_file(dir.join(datadir::API_ADDR));
    let _ = std::fs::remove_file(dir.join(datadir::SYNC_ADDR));
    drop(lock);
    result.context("serving the local API")?;
    tracing::info!("stopped");
    Ok(())
}

/// Under systemd (`Type=notify`): says the daemon is ready once it serves, and while the
/// unit has a watchdog, pings it at half its interval as long as the store answers (a hung
/// store stops the pings and systemd restarts the daemon). Does nothing elsewhere.
fn service_ready(node: &std::sync::Arc<Node>, shutdown: CancellationToken) {
    #[cfg(target_os = "linux")]
    {
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "could not tell systemd the daemon is ready");
        }
        if let Some(every) = sd_notify::watchdog_enabled() {
            let node = node.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(every / 2) => {}
                    }
                    let n = node.clone();
                    let alive = tokio::time::timeout(
                        every / 2,
                        tokio::task::spawn_blocking(move || n.store.count().is_ok()),
                    )
                    .await;
                    if matches!(alive, Ok(Ok(true))) {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    } else {
                        tracing::error!("the store did not answer: watchdog not pinged");
                    }
                }
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (node, shutdown);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
