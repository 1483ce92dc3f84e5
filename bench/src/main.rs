//! `cargo run --release -p chartmesh-bench -- --n 1000 --reps 3 --json results.json`

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "The standard chartmesh benchmark on real daemons")]
struct Args {
    /// Charts: 1000 or 10000 (the bench-data sets), or any smaller N (a prefix of the 1000 set).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Write the per-rep results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The bench-data directory.
    #[arg(long, default_value = "../shared/bench-data")]
    data: PathBuf,
    /// Use the binaries already built next to this one instead of building them.
    #[arg(long)]
    no_build: bool,
    /// The link between the two practices: `clean` (loopback, the standard run) or `rural`
    /// (15 % loss and 80 ms delay each way, 2 % duplicates, made by the bench's UDP relay).
    #[arg(long, default_value = "clean", value_parser = ["clean", "rural"])]
    link: String,
    /// `direct` (the standard run) or `relay`: through a Syncthing relay server on loopback
    /// (`strelaysrv`, Debian package syncthing-relaysrv), paired by id alone.
    #[arg(long, default_value = "direct", value_parser = ["direct", "relay"])]
    via: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    if !args.no_build {
        let release = bin_dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--locked",
            "-p",
            "chartmesh-daemon",
            "-p",
            "chartmesh-cli",
        ]);
        if release {
            cmd.arg("--release");
        }
        anyhow::ensure!(
            cmd.status()?.success(),
            "building chartmeshd and chartmesh failed"
        );
    }
    let ds = chartmesh_bench::dataset(&args.data, args.n)?;
    let opts = chartmesh_bench::Options {
        incremental: ds.incremental,
        rep: 0,
        bin_dir,
        charts: ds.charts,
        expected_checksum: ds.checksum,
        n: args.n,
        reps: args.reps,
        link: (args.link == "rural").then(|| chartmesh_bench::relay::Impairment::rural(1)),
        via_relay: args.via == "relay",
    };
    let reps = chartmesh_bench::run(&opts)?;
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&reps)?)?;
    }
    println!(
        "N = {}, {} rep(s)\n\n{}",
        args.n,
        args.reps,
        chartmesh_bench::table(&reps, args.n)
    );
    Ok(())
}
