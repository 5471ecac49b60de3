//! The burrow server: REST + WebSocket API, the control layer, and the local node, in one process
//! with an embedded SQLite database (the single-machine default; docs/adr/0005).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use burrow_node::gvisor::{GvisorBackend, GvisorConfig};
use burrow_node::namespace::{NamespaceBackend, NamespaceConfig};
use burrow_node::tiers::Tiers;
use burrow_store::AsyncStore;
use burrow_store_sqlite::SqliteStore;
use burrow_types::{Plan, PoolSpec};
use tracing::info;

pub mod api;
mod dns;
pub mod e2b;
pub mod egress;
pub mod serve;
pub mod server_timing;

// The control layer is its own crate; its modules keep their paths here for the transports.
pub use burrow_control::{auth, callback, control, pool};

use control::Control;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Operator-chosen admin key (`BURROW_ADMIN_KEY`), used on first start instead of a random one.
    pub admin_key: Option<String>,
    /// Plans on top of (or replacing, by name) the defaults.
    pub plans: Vec<Plan>,
    /// How long a paused sandbox stays hot before it hibernates.
    pub hot_window: std::time::Duration,
    /// Sandbox networking; `None`: sandboxes have loopback only.
    pub network: Option<burrow_node::network::NetConfig>,
    /// Ports are reachable at `<port>-<id>.<domain>`.
    pub domain: Option<String>,
    /// Warm pools to keep, by name (created or resized at start; the API can change them later).
    pub pools: Vec<(String, PoolSpec)>,
    /// Paused sandboxes hibernate early while the host has less memory available than this
    /// (MiB); a twentieth of the host's memory when unset.
    pub hibernate_below_mib: Option<u64>,
    /// Creates and uploads are refused (`507`) while the data filesystem has less free than
    /// this (MiB); default 5% of it, between 256 MiB and 10 GiB.
    pub min_free_mib: Option<u64>,
    /// Sandbox disks (sparse) may promise this many times the data filesystem's size.
    pub disk_overcommit: Option<f64>,
    /// Connection caps and timeouts of the API; derived from the open-files limit when unset.
    pub serve_limits: Option<serve::ServeLimits>,
    /// Pids kept for the host: sandboxes' pid limits may add up to `pid_max` minus this (an
    /// eighth of `pid_max`, at least 2048, when unset).
    pub pid_reserve: Option<u64>,
    /// Ranges run callbacks may reach although the callback rules refuse them (loopback, private
    /// ranges, ...); never the sandboxes' range (`burrow up --callback-allow`).
    pub callback_allow: Vec<ipnet::IpNet>,
    /// PEM certificates trusted for `https://` callbacks besides the system's roots
    /// (`burrow up --callback-ca`).
    pub callback_ca: Option<Vec<u8>>,
    /// Where sandboxes' volumes live (`burrow up --storage`, `--storage-pool-size`).
    pub storage: burrow_node::storage::StorageConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("BURROW_ADMIN_KEY must be at least {} characters", auth::MIN_KEY_LEN)]
    AdminKeyTooShort,
    #[error("store")]
    Store(#[from] burrow_store::StoreError),
    #[error("node")]
    Node(#[from] burrow_node::NodeError),
    #[error("image store")]
    Images(#[from] burrow_image::Error),
    #[error("start-up reconcile")]
    Reconcile(#[from] control::ControlError),
    #[error("e2b facade")]
    E2b(#[from] e2b::FacadeError),
    #[error("sandbox network")]
    Network(#[from] burrow_node::network::NetError),
    #[error(
        "{path} is mode {mode:04o}: sandboxes run as unprivileged host users and must be able to \
         pass through every directory above their files; give it search permission for others \
         (at least mode 0711: chmod o+x {path})"
    )]
    DataDirNotTraversable { path: PathBuf, mode: u32 },
    #[error("--callback-ca is not a PEM bundle of certificates")]
    CallbackCa(#[source] reqwest::Error),
    #[error("run callbacks: {0}")]
    Callbacks(String),
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the first start made: the admin key, when it was generated (it is shown once).
pub struct Bootstrap {
    pub generated_admin_key: Option<String>,
}

/// A server ready to serve: store open, node prepared, host reconciled, socket bound.
pub struct Server {
    pub bootstrap: Bootstrap,
    pub local_addr: SocketAddr,
    listener: tokio::net::TcpListener,
    egress: Option<tokio::net::TcpListener>,
    state: api::AppState,
    limits: serve::ServeLimits,
    images: api::images::Images,
}

/// Makes the data directory (mode 0711) or checks an existing one. Sandboxes' root users are
/// unprivileged host uids that must pass through it (and every directory above it) to reach their
/// own files: the data directory itself is given search permission for others if it lacks it
/// (nothing in it becomes listable), and an ancestor without it stops the start with a message
/// naming it, rather than every create failing later with `EACCES`.
fn prepare_data_dir(dir: &std::path::Path) -> Result<(), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| ServerError::DataDir { path, source }
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(err(dir))?;
    }
    let dir = std::fs::canonicalize(dir).map_err(err(dir))?;
    let mode = std::fs::metadata(&dir)
        .map_err(err(&dir))?
        .permissions()
        .mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(
            &dir,
            std::fs::Permissions::from_mode((mode | 0o011) & 0o7777),
        )
        .map_err(err(&dir))?;
        info!(data_dir = %dir.display(), "gave the data directory search permission for others (sandboxes pass through it)");
    }
    for parent in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(parent)
            .map_err(err(parent))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(ServerError::DataDirNotTraversable {
                path: parent.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    Ok(())
}

/// A key made once and kept in the data directory (0600), so what it signs survives restarts:
/// `secret` (raw bytes) signs access tokens and port URLs; `callback.key` (hex) is what each
/// user's callback key is derived from (`callback.rs`).
fn key_file(data_dir: &std::path::Path, name: &str, hex_text: bool) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(name);
    match std::fs::read(&path) {
        Ok(s) if s.len() >= 32 => return Ok(s),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let raw = rand::random::<[u8; 32]>();
    let key = if hex_text {
        hex::encode(raw).into_bytes()
    } else {
        raw.to_vec()
    };
    let tmp = data_dir.join(format!("{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, &key)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(key)
}

impl Server {
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        let dir_err = |source| ServerError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        };
        prepare_data_dir(&cfg.data_dir)?;
        // Opening runs the migrations, which may wait for a lock: off the async workers too.
        let db = cfg.data_dir.join("burrow.db");
        let sqlite = tokio::task::spawn_blocking(move || SqliteStore::open(&db))
            .await
            .map_err(|_| burrow_store::StoreError::Cancelled)??;
        let store = AsyncStore::new(Arc::new(sqlite));
        let bootstrap = bootstrap_admin(&store, cfg.admin_key.as_deref()).await?;
        let native = NamespaceBackend::new(NamespaceConfig {
            storage: cfg.storage.clone(),
            ..NamespaceConfig::new(cfg.data_dir.clone())
        })?;
        let gvisor = GvisorBackend::new(GvisorConfig::new(cfg.data_dir.clone()), &native)
            .map_err(|e| e.to_string());
        if let Err(why) = &gvisor {
            tracing::info!(%why, "no gVisor isolation tier on this node");
        }
        let backend = Tiers::new(cfg.data_dir.clone(), native, gvisor);
        let images = api::images::Images::open(&cfg.data_dir)?;
        let mut plans = Plan::defaults();
        for p in cfg.plans {
            plans.retain(|d| d.name != p.name);
            plans.push(p);
        }
        let secret = key_file(&cfg.data_dir, "secret", false).map_err(dir_err)?;
        let callback_key = key_file(&cfg.data_dir, "callback.key", true).map_err(dir_err)?;
        let pid_budget = control::admission::host_pid_max().map(|pid_max| control::PidBudget {
            pid_max,
            reserve: cfg
                .pid_reserve
                .unwrap_or_else(|| control::admission::default_pid_reserve(pid_max)),
        });
        let sandbox_range = cfg.network.as_ref().and_then(|n| {
            ipnet::Ipv4Net::new(n.range.network(), n.range.prefix)
                .ok()
                .map(ipnet::IpNet::V4)
        });
        let roots = match &cfg.callback_ca {
            Some(pem) => {
                reqwest::Certificate::from_pem_bundle(pem).map_err(ServerError::CallbackCa)?
            }
            None => Vec::new(),
        };
        let callbacks = callback::Callbacks::new(
            callback_key,
            callback::Targets::new(cfg.callback_allow.clone(), sandbox_range),
            roots,
        );
        callbacks.ready().map_err(ServerError::Callbacks)?;
        let mut control = Control::new(store, Arc::new(backend), plans)
            .with_pid_budget(pid_budget)
            .with_hot_window(cfg.hot_window)
            .with_callbacks(callbacks)
            .with_secret(secret)
            .with_domain(cfg.domain.clone());
        if let Some(mib) = cfg.hibernate_below_mib {
            control = control.with_hibernate_below_mib(mib);
        }
        control = control.with_storage(control::storage::StorageGuard::new(
            cfg.data_dir.clone(),
            cfg.min_free_mib,
            cfg.disk_overcommit,
        ));
        // The egress proxy's port is taken before any sandbox could be redirected to it.
        let mut egress = None;
        if let Some(net) = cfg.network.clone() {
            let addr = SocketAddr::from(([0, 0, 0, 0], net.proxy_port));
            egress = Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Listen { addr, source })?,
            );
            info!(
                range = %net.range,
                resolvers = ?net.resolvers,
                conn_limit = net.conn_limit,
                egress_proxy_port = net.proxy_port,
                "sandboxes get a network"
            );
            control = control.with_network(Arc::new(burrow_node::network::Network::new(net)));
        }
        let control = Arc::new(control);
        let e2b = Arc::new(
            e2b::Facade::open(
                control.secret().to_vec(),
                cfg.domain.clone(),
                std::env::var("BURROW_E2B_TEMPLATES").ok().as_deref(),
            )?
            .with_code_interpreter(cfg.data_dir.join("templates")),
        );
        let report = control.reconcile().await?;
        // Creates cut short by the last stop: their keys answer with what reconcile made of the
        // sandbox, or are forgotten if none was made.
        let (kept, dropped) = control.store().settle_idempotency_keys().await?;
        if kept + dropped > 0 {
            info!(
                kept,
                dropped, "settled idempotency keys of interrupted creates"
            );
        }
        for (name, spec) in cfg.pools {
            control.put_pool(&name, spec).await?;
        }
        info!(
            adopted = report.adopted.len(),
            hibernated = report.hibernated.len(),
            lost = report.lost.len(),
            interrupted = report.interrupted.len(),
            cleaned = report.cleaned.len(),
            finished_deletes = report.finished.len(),
            rolled_back = report.rolled_back.len(),
            orphans = report.orphans.len(),
            "reconciled sandboxes with the host"
        );
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let limits = cfg.serve_limits.unwrap_or_else(|| {
            serve::ServeLimits::from_open_files(serve::raise_open_files_limit())
        });
        Ok(Server {
            bootstrap,
            local_addr,
            listener,
            egress,
            state: api::AppState { control, e2b },
            limits,
            images,
        })
    }

    /// Serves until `shutdown` resolves. Sandboxes keep running after the server stops.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        // Idle timeouts and maximum durations are checked once a second.
        let control = self.state.control.clone();
        let enforcer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = control.enforce_limits().await {
                    tracing::warn!(error = %control::error_chain(&e), "checking limits failed");
                }
            }
        });
        let proxy = self
            .egress
            .map(|l| tokio::spawn(egress::serve(l, self.state.control.clone())));
        // The replenisher refills pools after each claim (woken at once) and checks every second.
        let control = self.state.control.clone();
        let replenisher = tokio::spawn(async move {
            loop {
                match control.replenish().await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %control::error_chain(&e), "refilling pools failed")
                    }
                }
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    control.pool_wake.notified(),
                )
                .await;
            }
        });
        let app = api::router(self.state).layer(axum::Extension(self.images));
        let served = serve::serve(self.listener, app, self.limits, shutdown).await;
        enforcer.abort();
        if let Some(p) = proxy {
            p.abort();
        }
        replenisher.abort();
        served
    }
}

async fn bootstrap_admin(
    store: &AsyncStore,
    admin_key: Option<&str>,
) -> Result<Bootstrap, ServerError> {
    if let Some(k) = admin_key {
        if k.len() < auth::MIN_KEY_LEN {
            return Err(ServerError::AdminKeyTooShort);
        }
    }
    let admin = match store.user_by_name("admin").await? {
        Some(u) => u,
        None => {
            store
                .create_user(&auth::new_id(16), "admin", "free", true)
                .await?
        }
    };
    // An operator-given key is (re)registered on every start, so automation can rely on it.
    if let Some(k) = admin_key {
        if store.user_by_key_hash(&auth::hash_key(k)).await?.is_none() {
            store
                .add_api_key(
                    &auth::new_id(16),
                    &admin.id,
                    &auth::hash_key(k),
                    &auth::key_display_prefix(k),
                )
                .await?;
        }
        return Ok(Bootstrap {
            generated_admin_key: None,
        });
    }
    if store.has_api_keys(&admin.id).await? {
        return Ok(Bootstrap {
            generated_admin_key: None,
        });
    }
    let key = auth::generate_key();
    store
        .add_api_key(
            &auth::new_id(16),
            &admin.id,
            &auth::hash_key(&key),
            &auth::key_display_prefix(&key),
        )
        .await?;
    Ok(Bootstrap {
        generated_admin_key: Some(key),
    })
}
