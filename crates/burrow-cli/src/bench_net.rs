//! `burrow bench` rows for networking: create with a network → first command, and the exec round
//! trip of a `curl` from inside a sandbox. The curl target is given with `--net-url` and must be a
//! host the operator owns (the network tests' fake internet, e.g. `http://203.0.113.10/`); without it
//! only the create row runs, and neither runs on a server without `--network`.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use burrow_client::Client;
use burrow_types::{CreateSandbox, ExecRequest};
use clap::Args;

#[derive(Args, Clone, Default)]
pub struct NetBenchArgs {
    /// URL that sandboxes `curl` for the network round trip (a host you own).
    #[arg(long)]
    net_url: Option<String>,
}

/// Samples for each network measure; empty when the server gives sandboxes no network.
pub async fn run(
    client: &Client,
    args: &NetBenchArgs,
    plan: Option<String>,
    runs: usize,
) -> Result<Vec<(&'static str, Vec<Duration>)>> {
    let create = CreateSandbox {
        plan,
        ..Default::default()
    };
    let first = ExecRequest {
        cmd: vec!["true".into()],
        ..Default::default()
    };
    let (mut created, mut ids) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let sb = client.create(&create).await?;
        client.exec(&sb.id, &first).await?;
        created.push(t.elapsed());
        let has_net = sb.network.is_some();
        ids.push(sb.id);
        if !has_net {
            for id in ids {
                client.delete(&id).await?;
            }
            return Ok(Vec::new());
        }
    }
    let mut rows = vec![("net create -> first command", created)];
    if let Some(url) = &args.net_url {
        let curl = ExecRequest {
            cmd: [
                "curl",
                "-sS",
                "-f",
                "-o",
                "/dev/null",
                "--max-time",
                "10",
                url,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..Default::default()
        };
        let mut trips = Vec::new();
        for _ in 0..runs.max(20) {
            let t = Instant::now();
            let r = client.exec(&ids[0], &curl).await?;
            if r.exit_code != Some(0) {
                bail!("curl {url} from a sandbox failed: {}", r.stderr.trim());
            }
            trips.push(t.elapsed());
        }
        rows.push(("net exec round trip (curl)", trips));
    }
    for id in ids {
        client.delete(&id).await?;
    }
    Ok(rows)
}
