//! `burrow bench`: latency of the operations an agent platform lives on, measured through the
//! public API of a running server, printed as p50/p99 tables. Benchmarks are not tests: nothing
//! here asserts a number.

use std::time::{Duration, Instant};

use anyhow::Result;
use burrow_types::{CreateSandbox, ExecRequest};
use clap::Args;
use serde::Serialize;

use crate::config;

#[derive(Args)]
pub struct BenchArgs {
    /// Samples per measurement.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Plan of the sandboxes created.
    #[arg(long)]
    plan: Option<String>,
    #[command(flatten)]
    net: crate::bench_net::NetBenchArgs,
}

#[derive(Serialize)]
struct Row {
    measure: &'static str,
    runs: usize,
    p50_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

fn row(measure: &'static str, mut samples: Vec<Duration>) -> Row {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pick = |q: f64| ms(samples[((samples.len() as f64 - 1.0) * q).round() as usize]);
    Row {
        measure,
        runs: samples.len(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        min_ms: ms(samples[0]),
        max_ms: ms(samples[samples.len() - 1]),
    }
}

pub async fn run(args: BenchArgs, json: bool) -> Result<()> {
    let client = config::client()?;
    let runs = args.runs.max(1);
    let create = CreateSandbox {
        plan: args.plan.clone(),
        ..Default::default()
    };
    let truecmd = ExecRequest {
        cmd: vec!["true".into()],
        ..Default::default()
    };
    let (mut cold, mut destroy) = (Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let sb = client.create(&create).await?;
        client.exec(&sb.id, &truecmd).await?;
        cold.push(t.elapsed());
        ids.push(sb.id);
    }
    let probe = ids[0].clone();
    let mut exec = Vec::new();
    for _ in 0..runs.max(50) {
        let t = Instant::now();
        client.exec(&probe, &truecmd).await?;
        exec.push(t.elapsed());
    }
    for id in ids {
        let t = Instant::now();
        client.delete(&id).await?;
        destroy.push(t.elapsed());
    }
    let mut rows = vec![
        row("cold create -> first command", cold),
        row("exec round trip (true)", exec),
        row("destroy", destroy),
    ];
    rows.extend(
        crate::bench_net::run(&client, &args.net, args.plan.clone(), runs)
            .await?
            .into_iter()
            .map(|(m, s)| row(m, s)),
    );
    if json {
        return crate::print_json(&rows);
    }
    println!(
        "{:<32} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "measure", "runs", "p50 ms", "p99 ms", "min ms", "max ms"
    );
    for r in rows {
        println!(
            "{:<32} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            r.measure, r.runs, r.p50_ms, r.p99_ms, r.min_ms, r.max_ms
        );
    }
    Ok(())
}
