//! The burrow server: REST + WebSocket API, the control layer, and the local node, in one process
//! with an embedded SQLite database (DESIGN.md §9, embedded default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use burrow_node::namespace::{NamespaceBackend, NamespaceConfig};
use burrow_store::Store;
use burrow_types::{Plan, PoolSpec};
use tracing::info;

pub mod api;
pub mod auth;
pub mod callback;
pub mod control;
pub mod pool;

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
    /// Warm pools to keep, by name (created or resized at start; the API can change them later).
    pub pools: Vec<(String, PoolSpec)>,
    /// Paused sandboxes hibernate early while the host has less memory available than this
    /// (MiB); a twentieth of the host's memory when unset.
    pub hibernate_below_mib: Option<u64>,
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
    #[error("start-up reconcile")]
    Reconcile(#[from] control::ControlError),
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
    state: api::AppState,
}

impl Server {
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        let dir_err = |source| ServerError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dir_err)?;
        let store = Arc::new(Store::open(&cfg.data_dir.join("burrow.db"))?);
        let bootstrap = bootstrap_admin(&store, cfg.admin_key.as_deref())?;
        let backend = NamespaceBackend::new(NamespaceConfig::new(cfg.data_dir.clone()))?;
        let mut plans = Plan::defaults();
        for p in cfg.plans {
            plans.retain(|d| d.name != p.name);
            plans.push(p);
        }
        let callback_key = callback_key(&cfg.data_dir).map_err(dir_err)?;
        let mut control = Control::new(store, Arc::new(backend), plans)
            .with_hot_window(cfg.hot_window)
            .with_callback_key(callback_key);
        if let Some(mib) = cfg.hibernate_below_mib {
            control = control.with_hibernate_below_mib(mib);
        }
        let control = Arc::new(control);
        let report = control.reconcile().await?;
        for (name, spec) in cfg.pools {
            control.put_pool(&name, spec)?;
        }
        info!(
            adopted = report.adopted.len(),
            hibernated = report.hibernated.len(),
            lost = report.lost.len(),
            interrupted = report.interrupted.len(),
            cleaned = report.cleaned.len(),
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
        Ok(Server {
            bootstrap,
            local_addr,
            listener,
            state: api::AppState { control },
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
        let app = api::router(self.state);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        enforcer.abort();
        replenisher.abort();
        served
    }
}

/// The key that signs run callbacks: made once, kept in the data directory (readable by root
/// only) so receivers can be configured with it.
fn callback_key(data_dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("callback.key");
    match std::fs::read_to_string(&path) {
        Ok(k) => return Ok(k.trim().as_bytes().to_vec()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let key = hex::encode(rand::random::<[u8; 32]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(key.as_bytes())?;
    f.sync_all()?;
    Ok(key.into_bytes())
}

fn bootstrap_admin(store: &Store, admin_key: Option<&str>) -> Result<Bootstrap, ServerError> {
    if let Some(k) = admin_key {
        if k.len() < auth::MIN_KEY_LEN {
            return Err(ServerError::AdminKeyTooShort);
        }
    }
    let admin = match store.user_by_name("admin")? {
        Some(u) => u,
        None => store.create_user(&auth::new_id(16), "admin", "free", true)?,
    };
    // An operator-given key is (re)registered on every start, so automation can rely on it.
    if let Some(k) = admin_key {
        if store.user_by_key_hash(&auth::hash_key(k))?.is_none() {
            store.add_api_key(
                &auth::new_id(16),
                &admin.id,
                &auth::hash_key(k),
                &auth::key_display_prefix(k),
            )?;
        }
        return Ok(Bootstrap {
            generated_admin_key: None,
        });
    }
    if store.has_api_keys(&admin.id)? {
        return Ok(Bootstrap {
            generated_admin_key: None,
        });
    }
    let key = auth::generate_key();
    store.add_api_key(
        &auth::new_id(16),
        &admin.id,
        &auth::hash_key(&key),
        &auth::key_display_prefix(&key),
    )?;
    Ok(Bootstrap {
        generated_admin_key: Some(key),
    })
}
