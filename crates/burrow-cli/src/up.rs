//! `burrow up`: the server, the local node and the embedded database in one process.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::config;

#[derive(Args)]
pub struct UpArgs {
    /// Where the database, images and sandbox disks live.
    #[arg(long, env = "BURROW_DATA_DIR", default_value_os_t = crate::default_data_dir())]
    data_dir: PathBuf,
    /// Address of the API (loopback by default: put a TLS proxy in front to expose it).
    #[arg(long, env = "BURROW_LISTEN", default_value_t = crate::default_listen())]
    listen: SocketAddr,
    /// A JSON file of extra plans: `[{"name": "tiny", "limits": {...}}]` (same name replaces a default).
    #[arg(long, env = "BURROW_PLANS")]
    plans: Option<PathBuf>,
    /// Seconds a paused sandbox keeps its processes before it hibernates (files only).
    #[arg(long, env = "BURROW_HOT_WINDOW", default_value_t = 8 * 3600)]
    hot_window: u64,
    #[command(flatten)]
    net: crate::net::NetArgs,
    /// A JSON file of warm pools: `{"default": {"image": "system", "plan": "free", "size": 10}}`.
    #[arg(long, env = "BURROW_POOLS")]
    pools: Option<PathBuf>,
    /// Paused sandboxes hibernate early while the host has less memory available than this
    /// (MiB; default a twentieth of the host's memory).
    #[arg(long, env = "BURROW_HIBERNATE_BELOW_MIB")]
    hibernate_below_mib: Option<u64>,
    /// Refuse creates and uploads (507, with Retry-After) while the data filesystem has less
    /// free than this, in MiB (default: 5% of it, between 256 MiB and 10 GiB).
    #[arg(long, env = "BURROW_MIN_FREE_MIB")]
    min_free_mib: Option<u64>,
    /// Sandbox disks are sparse: together they may promise this many times the data
    /// filesystem's size (default 20: 5,000 disks of 1 GiB on 256 GiB).
    #[arg(long, env = "BURROW_DISK_OVERCOMMIT", value_parser = positive_ratio)]
    disk_overcommit: Option<f64>,
    /// A range run callbacks may reach although the callback rules refuse it (loopback, private
    /// ranges, link-local, the server's own addresses), as a CIDR (`127.0.0.0/8`, `fd00::/8`;
    /// repeatable). The sandboxes' range can never be opened.
    #[arg(
        long = "callback-allow",
        env = "BURROW_CALLBACK_ALLOW",
        value_delimiter = ','
    )]
    callback_allow: Vec<ipnet::IpNet>,
    /// A PEM file of CA certificates trusted for `https://` callbacks besides the system's roots.
    #[arg(long, env = "BURROW_CALLBACK_CA")]
    callback_ca: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Where sandboxes' volumes live: `btrfs` (one pool, a subvolume per sandbox with a simple
    /// quota), `ext4` (an image per sandbox, cloned from a blank one), or `auto`: btrfs where a
    /// pool is at hand or --storage-pool-size is given, ext4 otherwise (docs/storage.md). A data
    /// directory keeps its first choice.
    #[arg(long, env = "BURROW_STORAGE", default_value = "auto")]
    storage: burrow_node::storage::StorageChoice,
    /// Size of a new btrfs pool image at `<data>/pool.img`, preallocated on the data
    /// filesystem (`20G`, `512M`; default half its free space, at most 1 TiB).
    #[arg(long, env = "BURROW_STORAGE_POOL_SIZE", value_parser = burrow_node::storage::parse_size)]
    storage_pool_size: Option<u64>,
}

/// How the API bounds its clients, and the host's pid budget (docs/api.md, "Limits").
#[derive(Args)]
struct LimitArgs {
    /// Seconds a client has to send a request's headers (also how long a kept-alive connection
    /// may sit idle).
    #[arg(long, env = "BURROW_HEADER_TIMEOUT", default_value_t = 15)]
    header_timeout: u64,
    /// Seconds a request body has to start; after that it must keep up --body-min-rate.
    #[arg(long, env = "BURROW_BODY_TIMEOUT", default_value_t = 30)]
    body_timeout: u64,
    /// Bytes per second a request body must average after --body-timeout.
    #[arg(long, env = "BURROW_BODY_MIN_RATE", default_value_t = 500)]
    body_min_rate: u64,
    /// Open API connections in all (default: the open-files limit minus a quarter, at least
    /// 1024, kept for the server's own work).
    #[arg(long, env = "BURROW_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Open API connections from one client address (default: a quarter of --max-connections).
    #[arg(long, env = "BURROW_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// Requests on one kept-alive connection before the server closes it.
    #[arg(
        long,
        env = "BURROW_MAX_REQUESTS_PER_CONNECTION",
        default_value_t = 1000
    )]
    max_requests_per_connection: u64,
    /// Pids kept for the host: sandboxes' pid limits may add up to kernel.pid_max minus this
    /// (default an eighth of pid_max, at least 2048).
    #[arg(long, env = "BURROW_PID_RESERVE")]
    pid_reserve: Option<u64>,
}

impl LimitArgs {
    fn serve_limits(&self) -> burrow_server::serve::ServeLimits {
        let mut l = burrow_server::serve::ServeLimits::from_open_files(
            burrow_server::serve::raise_open_files_limit(),
        );
        l.header_timeout = std::time::Duration::from_secs(self.header_timeout.max(1));
        l.body_timeout = std::time::Duration::from_secs(self.body_timeout.max(1));
        l.body_min_rate = self.body_min_rate;
        if let Some(n) = self.max_connections {
            l.max_connections = n.max(1);
            l.max_connections_per_ip = (l.max_connections / 4).max(1);
        }
        if let Some(n) = self.max_connections_per_ip {
            l.max_connections_per_ip = n.max(1);
        }
        l.max_requests_per_connection = self.max_requests_per_connection.max(1);
        l
    }
}

fn positive_ratio(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path, what: &str) -> Result<T> {
    serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not {what}", path.display()))
}

pub async fn run(args: UpArgs) -> Result<()> {
    // Colour only for a person at a terminal: a log file or journal gets plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("BURROW_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!(
            "burrow up must run as root: it creates namespaces, cgroups and loop devices"
        );
    }
    // The binary owns the process's metrics recorder; the libraries only count into it.
    let exporter = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    burrow_server::api::pools::serve_exporter(exporter);
    let admin_key = std::env::var("BURROW_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let server = burrow_server::Server::start(burrow_server::ServerConfig {
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        admin_key: admin_key.clone(),
        hot_window: std::time::Duration::from_secs(args.hot_window),
        network: args.net.config()?,
        domain: args.net.domain.clone(),
        plans: match &args.plans {
            Some(p) => read_json(p, "a JSON list of plans")?,
            None => Vec::new(),
        },
        pools: match &args.pools {
            Some(p) => {
                let map: std::collections::BTreeMap<String, burrow_types::PoolSpec> =
                    read_json(p, "a JSON object of pools by name")?;
                map.into_iter().collect()
            }
            None => Vec::new(),
        },
        hibernate_below_mib: args.hibernate_below_mib,
        min_free_mib: args.min_free_mib,
        disk_overcommit: args.disk_overcommit,
        serve_limits: Some(args.limits.serve_limits()),
        pid_reserve: args.limits.pid_reserve,
        callback_allow: args.callback_allow.clone(),
        callback_ca: match &args.callback_ca {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        },
        storage: burrow_node::storage::StorageConfig {
            choice: args.storage,
            pool_size: args.storage_pool_size,
        },
    })
    .await
    .context("starting the server")?;
    let url = format!("http://{}", server.local_addr);
    // The CLI on this machine talks to this server without further set-up, through a profile
    // of its own: a second server never silently replaces the first one's URL and key.
    let key = server.bootstrap.generated_admin_key.clone().or(admin_key);
    let saved = config::save_server(
        config::selected().as_deref(),
        &url,
        server.local_addr.port(),
        key,
        &args.data_dir,
    );
    eprintln!(
        "burrow is up at {url} (data in {})",
        args.data_dir.display()
    );
    if let Some(k) = &server.bootstrap.generated_admin_key {
        eprintln!("admin API key (shown once): {k}");
    }
    match saved {
        Ok(s) if s.current == s.name => eprintln!(
            "the CLI on this machine is configured in {} (profile {:?}, the current one){}",
            s.path.display(),
            s.name,
            if s.has_key { "" } else { "; it holds no API key: set BURROW_API_KEY" }
        ),
        Ok(s) => eprintln!(
            "the CLI on this machine is configured in {} as profile {:?}; the current profile is still {:?}: use `burrow --profile {} ...` or `burrow profile use {}`{}",
            s.path.display(),
            s.name,
            s.current,
            s.name,
            s.name,
            if s.has_key { "" } else { "; it holds no API key: set BURROW_API_KEY" }
        ),
        Err(e) => eprintln!("could not write the CLI config: {e:#}"),
    }
    server
        .serve(shutdown_signal())
        .await
        .context("serving the API")?;
    eprintln!("burrow stopped; sandboxes keep running and are adopted at the next start");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
