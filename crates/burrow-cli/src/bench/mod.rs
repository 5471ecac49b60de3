//! `burrow bench`: the figures an agent platform lives on, measured through the public API of a
//! running server, then the peers (`crun`, `podman`, `bwrap`) side by side on the same rootfs.
//! Benchmarks are not tests: nothing here asserts a number. Whatever the bench creates, it removes,
//! also on an error or Ctrl-C.
//!
//! - `burrow.rs`: burrow's rows (lifecycle latencies, warm pool, noisy neighbour, throughput,
//!   density)
//! - `peers.rs`, `oci.rs`: the peers and the OCI config given to `crun`
//! - `stats.rs`, `table.rs`: percentiles and the printed tables
//! - `cleanup.rs`: what to remove at the end

use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use burrow_client::Client;
use clap::Args;

use crate::config;

mod breakdown;
mod burrow;
mod cleanup;
mod oci;
mod peers;
mod stats;
mod table;

use cleanup::Cleanup;
use table::Report;

#[derive(Args)]
pub struct BenchArgs {
    /// Samples per measurement (the exec round trip takes at least 50).
    #[arg(long, visible_alias = "runs", default_value_t = 20)]
    iterations: usize,
    /// Image of the sandboxes created.
    #[arg(long, default_value = "system")]
    image: String,
    /// Plan of the sandboxes created (the warm pool's plan too; `free` if not given).
    #[arg(long)]
    plan: Option<String>,
    /// Sandboxes created for the throughput figure (0 skips it).
    #[arg(long, default_value_t = 40)]
    throughput: usize,
    /// Creates in flight at once for the throughput and density figures (on the 2-core
    /// development machine throughput levels off from about 8).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Idle sandboxes kept up for the density figure (0 skips it).
    #[arg(long, default_value_t = 20)]
    density: usize,
    /// Run the peers side by side (the default).
    #[arg(long, overrides_with = "no_peers")]
    peers: bool,
    /// Measure burrow only.
    #[arg(long, overrides_with = "peers")]
    no_peers: bool,
    /// Also print where each operation's time goes inside the server (its stages and CPU time
    /// per request, from `Server-Timing`; `--json` always has them).
    #[arg(long)]
    breakdown: bool,
    #[command(flatten)]
    net: crate::bench_net::NetBenchArgs,
    /// Plan with `"isolation": "gvisor"` for the gVisor warm-create row (skipped without one).
    #[arg(long)]
    gvisor_plan: Option<String>,
    /// Skip the gVisor rows.
    #[arg(long)]
    no_gvisor: bool,
}

pub async fn run(args: BenchArgs, json: bool) -> Result<()> {
    let client = config::client()?;
    let cleanup = Cleanup::new();
    // A signal does not drop the measurement mid-request (a create cut off half-way is the
    // server's to untangle): it asks it to stop at its next step. A second one quits at once.
    let stop = cleanup.stop.clone();
    let watcher = tokio::spawn(async move {
        let signal = interrupted().await;
        stop.store(true, Ordering::SeqCst);
        eprintln!("burrow bench: {signal}: stopping and cleaning up (again to quit at once, leaving things behind)");
        interrupted().await;
        std::process::exit(130);
    });
    let mut outcome = measure(&args, &client, &cleanup).await;
    if cleanup.stop.swap(true, Ordering::SeqCst) {
        // The peers end early with a partial table rather than an error: still an interruption.
        outcome = outcome.and_then(|_| Err(anyhow::anyhow!("interrupted")));
    }
    let left = cleanup.finish(&client).await;
    watcher.abort();
    for what in &left {
        eprintln!("burrow bench: could not remove {what}");
    }
    let report = outcome?;
    if json {
        crate::print_json(&report)?;
    } else {
        print!("{}", render(&report));
        if args.breakdown {
            print!("\n{}", breakdown::render(&report.breakdown));
        }
    }
    if !left.is_empty() {
        bail!("the bench left {} things behind (above)", left.len());
    }
    Ok(())
}

async fn measure(args: &BenchArgs, client: &Client, cleanup: &Cleanup) -> Result<Report> {
    client
        .health()
        .await
        .with_context(|| format!("is a burrow server up at {}?", client.base_url()))?;
    let iterations = args.iterations.max(1);
    let concurrency = args.concurrency.max(1);
    let stages = breakdown::Breakdown::default();
    let ctx = burrow::Ctx {
        client,
        cleanup,
        iterations,
        image: args.image.clone(),
        plan: args.plan.clone(),
        isolation: None,
        breakdown: &stages,
    };

    progress("cold create, exec, pause, resume, hibernate, cold resume, destroy");
    let life = burrow::lifecycle(&ctx).await?;
    let mut rows = life.rows;
    progress("warm create (pool)");
    rows.insert(1, burrow::warm(&ctx).await?);
    progress("exec next to a noisy neighbour");
    rows.extend(burrow::noisy_neighbour(&ctx).await?);
    // Density before throughput, though printed after it: its host reading is the more fragile.
    let mut density_rows = Vec::new();
    if args.density > 0 {
        progress("idle density");
        density_rows = burrow::density(&ctx, args.density, concurrency).await?;
    }
    if args.throughput > 0 {
        progress("create throughput");
        rows.extend(burrow::throughput(&ctx, args.throughput, concurrency).await?);
    }
    rows.extend(density_rows);
    rows.extend(burrow::net_rows(&ctx, &args.net).await?);
    if !args.no_gvisor {
        progress("gVisor: cold create, warm create, exec, checkpoint, restore");
        rows.extend(burrow::gvisor_rows(&ctx, args.gvisor_plan.clone()).await?);
    }

    // `--peers` and `--no-peers` override each other (the last one wins); peers run by default.
    let run_peers = args.peers || !args.no_peers;
    let peers = if !run_peers {
        Vec::new()
    } else {
        progress("peers: crun, podman, bwrap");
        let work = cleanup.blocking_work();
        let stop = cleanup.stop.clone();
        let burrow_p50 = life.cold.p50_ms();
        tokio::task::spawn_blocking(move || {
            let _work = work;
            peers::run(iterations, &stop, burrow_p50)
        })
        .await?
    };
    Ok(Report {
        server: client.base_url().to_string(),
        iterations,
        rows,
        burrow_cold: life.cold,
        peers,
        breakdown: stages.report(),
    })
}

fn render(report: &Report) -> String {
    let mut out = format!(
        "burrow bench: {} iterations against {}\n\n",
        report.iterations, report.server
    );
    out.push_str(&table::render_rows(&report.rows));
    if !report.peers.is_empty() {
        out.push('\n');
        out.push_str(&table::render_peers(&report.burrow_cold, &report.peers));
    }
    out
}

fn progress(what: &str) {
    eprintln!("burrow bench: measuring {what}…");
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
