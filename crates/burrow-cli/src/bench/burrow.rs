//! burrow's own figures, measured through the public API exactly as an agent platform would call
//! it: create → first command (cold, and warm from a pool), exec, pause, resume, hibernate, cold
//! resume, destroy, a quiet sandbox's exec next to a noisy one, create throughput and idle density.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burrow_client::Client;
use burrow_types::{CreateSandbox, ExecRequest, Sandbox};
use futures_util::{stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::breakdown::Breakdown;
use super::cleanup::{self, Cleanup, TAG_KEY};
use super::stats;
use super::table::{Row, Value};

/// What every section needs.
pub struct Ctx<'a> {
    pub client: &'a Client,
    pub cleanup: &'a Cleanup,
    pub iterations: usize,
    pub image: String,
    pub plan: Option<String>,
    /// The tier asked for (`None`: the plan's).
    pub isolation: Option<burrow_types::Isolation>,
    /// The server's stages of the timed requests, per operation.
    pub breakdown: &'a Breakdown,
}

pub const COLD_CREATE: &str = "cold create";
pub const COLD_FIRST_EXEC: &str = "cold create: first exec";
pub const WARM_CREATE: &str = "warm create";
pub const WARM_FIRST_EXEC: &str = "warm create: first exec";
pub const EXEC: &str = "exec";
pub const HOT_RESUME: &str = "hot resume";
pub const COLD_RESUME: &str = "cold resume";
pub const LOADED_CREATE: &str = "create under load (throughput)";

impl Ctx<'_> {
    fn create_request(&self) -> CreateSandbox {
        CreateSandbox {
            image: Some(self.image.clone()),
            plan: self.plan.clone(),
            isolation: self.isolation,
            metadata: [(TAG_KEY.to_string(), self.cleanup.run_id.clone())].into(),
            ..Default::default()
        }
    }

    pub async fn create(&self) -> Result<Sandbox> {
        self.create_as(None).await
    }

    /// A create whose server stages count to operation `op`, if given.
    pub async fn create_as(&self, op: Option<&'static str>) -> Result<Sandbox> {
        self.cleanup.check()?;
        let (sb, stages): (Sandbox, _) = self
            .client
            .timed(Method::POST, "/v1/sandboxes", Some(&self.create_request()))
            .await?;
        self.cleanup.sandbox(&sb.id);
        if let Some(op) = op {
            self.breakdown.add(op, stages);
        }
        Ok(sb)
    }

    pub async fn run_true(&self, id: &str) -> Result<()> {
        self.run_true_as(id, None).await
    }

    /// `true` in sandbox `id`; its server stages count to operation `op`, if given.
    pub async fn run_true_as(&self, id: &str, op: Option<&'static str>) -> Result<()> {
        self.cleanup.check()?;
        let req = ExecRequest {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        let (r, stages): (burrow_types::ExecResult, _) = self
            .client
            .timed(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(&req),
            )
            .await?;
        if let Some(op) = op {
            self.breakdown.add(op, stages);
        }
        if r.exit_code != Some(0) {
            bail!(
                "`true` in sandbox {id} ended with {:?}: {}",
                r.exit_code,
                r.stderr
            );
        }
        Ok(())
    }

    /// Create → first command done, timed.
    async fn create_first_command(&self) -> Result<(Sandbox, Duration)> {
        let t = Instant::now();
        let (sb, stages): (Sandbox, _) = self
            .client
            .timed(Method::POST, "/v1/sandboxes", Some(&self.create_request()))
            .await?;
        self.cleanup.sandbox(&sb.id);
        let (create_op, exec_op) = if sb.warm_hit {
            (WARM_CREATE, WARM_FIRST_EXEC)
        } else {
            (COLD_CREATE, COLD_FIRST_EXEC)
        };
        self.breakdown.add(create_op, stages);
        self.run_true_as(&sb.id, Some(exec_op)).await?;
        Ok((sb, t.elapsed()))
    }

    pub async fn destroy(&self, id: &str) -> Result<()> {
        self.client.delete(id).await?;
        self.cleanup.sandbox_gone(id);
        Ok(())
    }
}

fn latency(samples: &[Duration]) -> Value {
    stats::latency(samples).map_or_else(|| Value::unavailable("no samples"), Value::Latency)
}

/// Timings of each step of one sandbox's life, taken on `iterations` sandboxes (create, destroy)
/// or repeated on one (exec, pause, resume, hibernate, cold resume).
pub struct Lifecycle {
    pub cold: Value,
    pub rows: Vec<Row>,
}

pub async fn lifecycle(ctx: &Ctx<'_>) -> Result<Lifecycle> {
    let n = ctx.iterations;
    let mut cold = Vec::new();
    let mut ids = Vec::new();
    let mut warm_hits = 0;
    for _ in 0..n {
        let (sb, took) = ctx.create_first_command().await?;
        warm_hits += usize::from(sb.warm_hit);
        cold.push(took);
        ids.push(sb.id);
    }
    let probe = ids[0].clone();

    let mut exec = Vec::new();
    for _ in 0..n.max(50) {
        let t = Instant::now();
        ctx.run_true_as(&probe, Some(EXEC)).await?;
        exec.push(t.elapsed());
    }

    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..n {
        ctx.cleanup.check()?;
        let t = Instant::now();
        ctx.client.pause(&probe).await.context("pause")?;
        pause.push(t.elapsed());
        let t = Instant::now();
        let (_, stages): (Sandbox, _) = ctx
            .client
            .timed::<(), _>(Method::POST, &format!("/v1/sandboxes/{probe}/resume"), None)
            .await
            .context("hot resume")?;
        resume.push(t.elapsed());
        ctx.breakdown.add(HOT_RESUME, stages);
    }
    // The sandbox must still answer after the pause/resume cycles.
    ctx.run_true(&probe).await?;

    let (mut hibernate, mut cold_resume) = (Vec::new(), Vec::new());
    for _ in 0..n {
        ctx.cleanup.check()?;
        let t = Instant::now();
        ctx.client.hibernate(&probe).await.context("hibernate")?;
        hibernate.push(t.elapsed());
        let t = Instant::now();
        let (_, stages): (Sandbox, _) = ctx
            .client
            .timed::<(), _>(Method::POST, &format!("/v1/sandboxes/{probe}/resume"), None)
            .await
            .context("cold resume")?;
        ctx.run_true(&probe).await?;
        cold_resume.push(t.elapsed());
        ctx.breakdown.add(COLD_RESUME, stages);
    }

    let mut destroy = Vec::new();
    for id in &ids {
        let t = Instant::now();
        ctx.destroy(id).await?;
        destroy.push(t.elapsed());
    }

    let cold = latency(&cold);
    let mut cold_row =
        Row::new("cold create → first command", cold.clone()).target("p50 < 60 ms, ≤ crun run");
    if warm_hits > 0 {
        cold_row = cold_row.note(format!(
            "{warm_hits} of {n} creates were warm hits (a pool for this image and plan exists)"
        ));
    }
    let rows = vec![
        cold_row,
        Row::new("exec round trip (`true`)", latency(&exec)).target("p50 < 2 ms"),
        Row::new("hot pause", latency(&pause)),
        Row::new("hot resume", latency(&resume)).target("p50 < 10 ms"),
        Row::new("hibernate", latency(&hibernate)),
        Row::new("cold resume → first command", latency(&cold_resume)).target("p50 < 150 ms"),
        Row::new("destroy", latency(&destroy)),
    ];
    Ok(Lifecycle { cold, rows })
}

pub const NEIGHBOUR_IDLE: &str = "exec round trip, neighbour idle";
pub const NEIGHBOUR_LOADED: &str = "exec round trip, neighbour noisy";
/// What the noisy neighbour runs: a busy loop per core and a stream of synchronous 4 KiB writes,
/// each flushed to its disk (`oflag=dsync`), until it is killed.
const NOISE: &str = "for i in $(seq $(nproc)); do (while :; do :; done) & done; \
    while :; do dd if=/dev/zero of=/workspace/.bench-noise bs=4k count=1 oflag=dsync \
    conv=notrunc status=none; done";
/// Samples of each phase taken back to back before switching.
const NEIGHBOUR_BLOCK: usize = 5;

/// The exec round trip of a quiet sandbox while another sandbox of the same plan sits idle, and
/// while it spins every core and flushes its disk in a loop: its quota, its disk throttle and the
/// host's share of the work its I/O causes decide the difference. Quiet and loaded samples
/// alternate in blocks, so a change in the host's own load moves both alike.
pub async fn noisy_neighbour(ctx: &Ctx<'_>) -> Result<Vec<Row>> {
    let quiet = ctx.create().await?;
    let noisy = ctx.create().await?;
    let n = ctx.iterations.max(2 * NEIGHBOUR_BLOCK);
    let (mut idle, mut loaded) = (Vec::new(), Vec::new());
    while idle.len() < n || loaded.len() < n {
        for _ in 0..NEIGHBOUR_BLOCK {
            let t = Instant::now();
            ctx.run_true(&quiet.id).await?;
            idle.push(t.elapsed());
        }
        ctx.cleanup.check()?;
        let req = ExecRequest {
            cmd: vec!["/bin/sh".into(), "-c".into(), NOISE.into()],
            background: true,
            ..Default::default()
        };
        let pid = ctx.client.start_process(&noisy.id, &req).await?;
        // Let the load reach its steady state (every core busy, the disk queue full).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut block = Ok(());
        for _ in 0..NEIGHBOUR_BLOCK {
            let t = Instant::now();
            block = ctx.run_true(&quiet.id).await;
            if block.is_err() {
                break;
            }
            loaded.push(t.elapsed());
        }
        ctx.client.kill(&noisy.id, pid).await?;
        block?;
        // The killed load's last writes drain before the next quiet block.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctx.destroy(&quiet.id).await?;
    ctx.destroy(&noisy.id).await?;
    let note = "a sandbox of the same plan spins every core and flushes 4 KiB writes to its disk \
                in a loop; quiet and loaded samples alternate in blocks of 5";
    Ok(vec![
        Row::new(NEIGHBOUR_IDLE, latency(&idle)),
        Row::new(NEIGHBOUR_LOADED, latency(&loaded)).note(note),
    ])
}

/// The networking rows (`bench_net.rs`: create with a network, a `curl` round trip); none on a
/// server that gives sandboxes no network.
pub async fn net_rows(ctx: &Ctx<'_>, args: &crate::bench_net::NetBenchArgs) -> Result<Vec<Row>> {
    ctx.cleanup.check()?;
    let rows = crate::bench_net::run(ctx.client, args, ctx.plan.clone(), ctx.iterations).await?;
    Ok(rows
        .into_iter()
        .map(|(measure, samples)| Row::new(measure, latency(&samples)))
        .collect())
}

pub const WARM: &str = "warm create → first command";
const WARM_TARGET: &str = "p50 < 10 ms";
/// How long a pool may take to have a ready sandbox.
const POOL_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A pool's status as `GET /v1/pools` lists it (only the fields the bench reads).
#[derive(Debug, Deserialize)]
struct PoolStatus {
    name: String,
    #[serde(default)]
    ready: usize,
}

/// Warm create → first command: a pool of this image and plan, one create per ready sandbox.
/// A server without the pool API gets an "n/a" row rather than a failed bench.
pub async fn warm(ctx: &Ctx<'_>) -> Result<Row> {
    let name = format!("bench-{}", std::process::id());
    let path = format!("/v1/pools/{name}");
    let size = ctx.iterations.min(10);
    let spec = serde_json::json!({
        "image": ctx.image,
        "plan": ctx.plan.as_deref().unwrap_or("free"),
        "size": size,
    });
    let (status, body) = ctx.client.raw(Method::PUT, &path, Some(&spec)).await?;
    if status == StatusCode::NOT_FOUND && is_no_route(&body) {
        return Ok(Row::new(WARM, Value::unavailable("n/a (no pool API)")).target(WARM_TARGET));
    }
    if status == StatusCode::FORBIDDEN {
        let na = Value::unavailable("n/a (pools need an admin key)");
        return Ok(Row::new(WARM, na).target(WARM_TARGET));
    }
    if !status.is_success() {
        bail!(
            "PUT {path}: {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        );
    }
    ctx.cleanup.pool(&name);
    let mut warm = Vec::new();
    let mut misses = 0;
    for _ in 0..ctx.iterations {
        wait_ready(ctx, &name).await?;
        let (sb, took) = ctx.create_first_command().await?;
        if sb.warm_hit {
            warm.push(took);
        } else {
            misses += 1;
        }
        ctx.destroy(&sb.id).await?;
    }
    cleanup::delete_pool(ctx.client, &name).await?;
    ctx.cleanup.pool_gone(&name);
    let mut row = Row::new(WARM, latency(&warm)).target(WARM_TARGET);
    if misses > 0 {
        row = row.note(format!(
            "{misses} of {} creates were cold although the pool had a ready sandbox; they are not in the figure",
            ctx.iterations
        ));
    }
    Ok(row)
}

/// The router's own 404 (no such route), as opposed to a pool route's structured error.
fn is_no_route(body: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => v["code"] == burrow_types::codes::NOT_FOUND,
        Err(_) => true,
    }
}

async fn wait_ready(ctx: &Ctx<'_>, name: &str) -> Result<()> {
    let client = ctx.client;
    let deadline = Instant::now() + POOL_READY_TIMEOUT;
    loop {
        ctx.cleanup.check()?;
        let (status, body) = client.raw::<()>(Method::GET, "/v1/pools", None).await?;
        if !status.is_success() {
            bail!("GET /v1/pools: {status}");
        }
        let pools: Vec<PoolStatus> =
            serde_json::from_slice(&body).context("GET /v1/pools: not a list of pools")?;
        if pools.iter().any(|p| p.name == name && p.ready > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pool {name} had no ready sandbox after {POOL_READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sandboxes created per second with `concurrency` creates in flight (each create returns a
/// running sandbox); destroyed afterwards, untimed.
pub async fn throughput(ctx: &Ctx<'_>, total: usize, concurrency: usize) -> Result<Vec<Row>> {
    let measure = format!("create throughput ({concurrency} concurrent)");
    settle().await;
    let local = is_local(ctx.client.base_url());
    let cpu_before = if local { busy_cpu_ms() } else { None };
    let t = Instant::now();
    let ids = all_or_first_error(
        stream::iter(0..total)
            .map(|_| async { ctx.create_as(Some(LOADED_CREATE)).await.map(|sb| sb.id) })
            .buffer_unordered(concurrency)
            .collect()
            .await,
    )?;
    let took = t.elapsed();
    let cpu_after = if local { busy_cpu_ms() } else { None };
    destroy_all(ctx, &ids, concurrency).await?;
    let cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Row::new(
            CPU_PER_CREATE,
            Value::PerOp {
                ms: (a - b) / total as f64,
                n: total,
            },
        )
        .note(
            "busy CPU time of the whole host (/proc/stat: user, nice, system, irq, softirq) \
             while the throughput row ran, divided by its creates: every process and kernel \
             thread counts, other users of the host too",
        ),
        _ => Row::new(
            CPU_PER_CREATE,
            Value::unavailable("n/a (server not on this host)"),
        ),
    };
    Ok(vec![
        Row::new(
            measure,
            Value::Rate {
                per_s: total as f64 / took.as_secs_f64(),
                n: total,
                concurrency,
            },
        )
        .target("200 sandboxes/s sustained"),
        cpu.target("≤ 4 ms"),
    ])
}

const CPU_PER_CREATE: &str = "CPU per create, host-wide (throughput)";

/// Busy CPU time of the whole host so far, in milliseconds (`/proc/stat`'s first line).
fn busy_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq (steal: the hypervisor's, not ours).
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    // /proc/stat counts in USER_HZ, which the kernel fixes at 100 for user space.
    Some(busy as f64 * 10.0)
}

/// Waits for the tail of the destroys of earlier rows (frees, unmounts, loop devices) to pass, so
/// throughput and density measure their own sandboxes only.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

async fn destroy_all(ctx: &Ctx<'_>, ids: &[String], concurrency: usize) -> Result<()> {
    all_or_first_error(
        stream::iter(ids)
            .map(|id| ctx.destroy(id))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await,
    )?;
    Ok(())
}

/// Concurrent requests are each let finish (never dropped in flight, see `Cleanup::stop`); then
/// the first error, if any, is the answer.
fn all_or_first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

/// Host memory per idle sandbox with `n` up: the drop of `MemAvailable`, and what the sandboxes'
/// own memory cgroups are charged. Only meaningful when the server runs on this host.
pub async fn density(ctx: &Ctx<'_>, n: usize, concurrency: usize) -> Result<Vec<Row>> {
    const AVAILABLE: &str = "idle density: host MemAvailable drop";
    const CGROUP: &str = "idle density: sandboxes' memory cgroup";
    const TARGET: &str = "< 2 MiB (1,000 on 24 GiB)";
    if !is_local(ctx.client.base_url()) {
        let na = || Value::unavailable("n/a (server not on this host)");
        return Ok(vec![
            Row::new(AVAILABLE, na()).target(TARGET),
            Row::new(CGROUP, na()).target(TARGET),
        ]);
    }
    settle().await;
    let before = mem_available().await;
    let ids = all_or_first_error(
        stream::iter(0..n)
            .map(|_| async {
                let sb = ctx.create().await?;
                ctx.run_true(&sb.id).await?;
                Ok::<_, anyhow::Error>(sb.id)
            })
            .buffer_unordered(concurrency)
            .collect()
            .await,
    )?;
    // Let the guests and the kernel settle (deferred frees, lazily allocated slabs).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = mem_available().await;
    let charged = cgroup_usage(&ids);
    destroy_all(ctx, &ids, concurrency).await?;

    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let per_sandbox = |delta: f64| Value::Memory {
        mib_per_sandbox: mib(delta) / n as f64,
        n,
    };
    let available = match (before, after) {
        (Some(b), Some(a)) => {
            let noise = mib(b.spread.max(a.spread) as f64);
            let row = Row::new(AVAILABLE, per_sandbox(b.median as f64 - a.median as f64));
            let per = noise / n as f64;
            row.note(format!(
                "whole host, medians of {SAMPLES} readings; it moved by up to {noise:.0} MiB \
                 (±{per:.2} MiB/sandbox) within a second on its own, and other processes can move \
                 it far more over the whole measurement: trust it only on a quiet host"
            ))
        }
        _ => Row::new(AVAILABLE, Value::unavailable("n/a (no /proc/meminfo)")),
    };
    let cgroup = match charged {
        Some(total) => Row::new(CGROUP, per_sandbox(total as f64)).note(
            "mean memory.usage_in_bytes of the sandboxes' own memory cgroups (their processes, \
             page cache and kernel memory charged to them)",
        ),
        None => Row::new(
            CGROUP,
            Value::unavailable("n/a (no memory cgroup per sandbox)"),
        ),
    };
    Ok(vec![available.target(TARGET), cgroup.target(TARGET)])
}

fn is_local(url: &str) -> bool {
    let authority = url.split("://").nth(1).unwrap_or(url);
    let host = authority.split(['/', ':']).next().unwrap_or_default();
    authority.starts_with("[::1]") || host == "localhost" || host.starts_with("127.")
}

/// Readings of `MemAvailable` taken this far apart, to see how much the host moves on its own.
const SAMPLES: usize = 5;
const SAMPLE_GAP: Duration = Duration::from_millis(200);

/// Several readings of one figure: their median and how far apart they were.
#[derive(Debug, PartialEq)]
struct Readings {
    median: u64,
    spread: u64,
}

impl Readings {
    fn of(mut v: Vec<u64>) -> Option<Readings> {
        v.sort_unstable();
        Some(Readings {
            median: *v.get(v.len() / 2)?,
            spread: v[v.len() - 1] - v[0],
        })
    }
}

/// `MemAvailable`, read `SAMPLES` times `SAMPLE_GAP` apart.
async fn mem_available() -> Option<Readings> {
    let mut readings = Vec::new();
    for i in 0..SAMPLES {
        if i > 0 {
            tokio::time::sleep(SAMPLE_GAP).await;
        }
        if let Some(v) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| meminfo_field(&s, "MemAvailable"))
        {
            readings.push(v);
        }
    }
    Readings::of(readings)
}

/// Memory charged to these sandboxes' own cgroups, in bytes, summed. Not the shared `burrow`
/// parent: every burrow server on the host (tests, other data directories) puts sandboxes there.
fn cgroup_usage(ids: &[String]) -> Option<u64> {
    let cgroups = burrow_linux::cgroup::Cgroups::host();
    ids.iter()
        .map(|id| {
            // v1: the memory controller's directory; v2: the one directory, `memory.current`.
            cgroups.dirs(id).iter().find_map(|dir| {
                ["memory.usage_in_bytes", "memory.current"]
                    .iter()
                    .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
                    .and_then(|s| s.trim().parse::<u64>().ok())
            })
        })
        .sum()
}

/// A `/proc/meminfo` field in bytes.
fn meminfo_field(meminfo: &str, name: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// The gVisor tier next to native: cold create → first command, warm create (from a pool of
/// `plan`, a plan whose isolation is `gvisor`), the exec round trip, hibernate with a checkpoint
/// and the resume that restores it. A server without the tier gives "n/a" rows.
pub async fn gvisor_rows(ctx: &Ctx<'_>, plan: Option<String>) -> Result<Vec<Row>> {
    const COLD: &str = "gVisor: cold create → first command";
    const WARM_G: &str = "gVisor: warm create → first command (pool)";
    const EXEC: &str = "gVisor: exec round trip (`true`)";
    const CHECKPOINT: &str = "gVisor: hibernate (runsc checkpoint)";
    const RESTORE: &str = "gVisor: resume (runsc restore) → first command";
    let g = Ctx {
        client: ctx.client,
        cleanup: ctx.cleanup,
        iterations: ctx.iterations.min(10),
        image: ctx.image.clone(),
        plan: ctx.plan.clone(),
        isolation: Some(burrow_types::Isolation::Gvisor),
        breakdown: ctx.breakdown,
    };
    let first = match g.create_first_command().await {
        Ok(r) => r,
        Err(e) if format!("{e:#}").contains(burrow_types::codes::ISOLATION_UNAVAILABLE) => {
            let na = || Value::unavailable("n/a (the server has no gVisor tier)");
            return Ok([COLD, WARM_G, EXEC, CHECKPOINT, RESTORE]
                .into_iter()
                .map(|m| Row::new(m, na()))
                .collect());
        }
        Err(e) => return Err(e),
    };
    let mut cold = vec![first.1];
    let probe = first.0.id;
    for _ in 1..g.iterations {
        let (sb, took) = g.create_first_command().await?;
        cold.push(took);
        g.destroy(&sb.id).await?;
    }
    let mut exec = Vec::new();
    for _ in 0..ctx.iterations.max(50) {
        let t = Instant::now();
        g.run_true(&probe).await?;
        exec.push(t.elapsed());
    }
    let (mut checkpoint, mut restore) = (Vec::new(), Vec::new());
    let mut cold_hibernations = 0;
    for _ in 0..g.iterations.min(5) {
        g.cleanup.check()?;
        let t = Instant::now();
        let h = g.client.hibernate(&probe).await.context("hibernate")?;
        checkpoint.push(t.elapsed());
        cold_hibernations += usize::from(h.resume_from.as_deref() != Some("checkpoint"));
        let t = Instant::now();
        g.client.resume(&probe).await.context("resume")?;
        g.run_true(&probe).await?;
        restore.push(t.elapsed());
    }
    g.destroy(&probe).await?;
    let warm = match plan {
        None => Row::new(
            WARM_G,
            Value::unavailable("n/a (name a plan with isolation gvisor: --gvisor-plan)"),
        ),
        Some(plan) => {
            let w = Ctx {
                client: ctx.client,
                cleanup: ctx.cleanup,
                iterations: ctx.iterations,
                image: ctx.image.clone(),
                plan: Some(plan),
                isolation: None,
                breakdown: ctx.breakdown,
            };
            let mut row = warm(&w).await?;
            row.measure = WARM_G.into();
            row
        }
    };
    let mut checkpoint_row = Row::new(CHECKPOINT, latency(&checkpoint));
    if cold_hibernations > 0 {
        checkpoint_row = checkpoint_row.note(format!(
            "{cold_hibernations} hibernations fell back to cold (no checkpoint)"
        ));
    }
    Ok(vec![
        Row::new(COLD, latency(&cold)),
        warm.target("p50 < 20 ms"),
        Row::new(EXEC, latency(&exec)),
        checkpoint_row,
        Row::new(RESTORE, latency(&restore)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let s = "MemTotal:       24598432 kB\nMemFree:         1000 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(meminfo_field(s, "MemAvailable"), Some(2048 * 1024));
        assert_eq!(meminfo_field(s, "MemFree"), Some(1000 * 1024));
        assert_eq!(meminfo_field(s, "Mem"), None);
    }

    #[test]
    fn readings_give_their_median_and_spread() {
        assert_eq!(
            Readings::of(vec![30, 10, 20, 50, 40]),
            Some(Readings {
                median: 30,
                spread: 40
            })
        );
        assert_eq!(Readings::of(vec![]), None);
    }

    #[test]
    fn only_loopback_servers_are_on_this_host() {
        assert!(is_local("http://127.0.0.1:7399"));
        assert!(is_local("http://localhost:7070/"));
        assert!(!is_local("https://burrow.example:443"));
    }

    #[test]
    fn the_routers_404_means_no_pool_api_but_a_pool_error_does_not() {
        assert!(is_no_route(
            br#"{"code":"not_found","message":"no such route"}"#
        ));
        assert!(is_no_route(b""));
        assert!(!is_no_route(
            br#"{"code":"image_not_found","message":"no image x"}"#
        ));
    }
}
