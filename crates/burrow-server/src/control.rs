//! The control layer: the sandbox state machine. Transport handlers turn requests into calls here;
//! this module decides what is allowed, writes the store before touching the host, and drives the
//! backend. It owns no HTTP types.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use burrow_node::guest::{GuestClient, GuestError};
use burrow_node::{Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};
use burrow_store::{now_rfc3339, now_unix, SandboxRecord, Store, StoreError, User};
use burrow_types::{
    codes, CreateSandbox, ErrorReason, OnTimeout, Plan, Sandbox, SandboxState, SetTimeout,
};
use tracing::{info, warn};

use crate::auth::new_id;

pub mod net;

pub const DEFAULT_IMAGE: &str = "system";
pub const DEFAULT_HOT_WINDOW: std::time::Duration = std::time::Duration::from_secs(8 * 3600);
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_ENV_ENTRIES: usize = 256;
const MAX_KV_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("sandbox not found")]
    NotFound,
    #[error("sandbox is {0}, not running")]
    NotRunning(&'static str),
    #[error("sandbox is {state}; {action} needs it {needs}")]
    WrongState {
        state: &'static str,
        action: &'static str,
        needs: &'static str,
    },
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
    #[error("unknown image {0:?}")]
    UnknownImage(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("guest agent")]
    Guest(#[from] GuestError),
    #[error("node")]
    Node(#[from] NodeError),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("sandbox network")]
    Network(#[source] burrow_node::network::NetError),
    #[error("this server gives sandboxes no network (start it with `burrow up --network`)")]
    NoNetwork,
}

/// Serialises lifecycle operations on one sandbox (a delete waits for a create in flight).
#[derive(Default)]
struct SandboxLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl SandboxLocks {
    fn get(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Drop entries nobody holds so the map does not grow with every sandbox ever made.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(id.to_string()).or_default().clone()
    }
}

pub struct Control {
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    plans: BTreeMap<String, Plan>,
    locks: SandboxLocks,
    /// Last API activity per sandbox, for idle timeouts. Kept in memory: a database write per exec
    /// would cost more than the exec; after a restart every idle clock starts again.
    activity: Mutex<HashMap<String, std::time::Instant>>,
    /// How long a paused sandbox keeps its processes before it hibernates (DESIGN.md §3).
    hot_window: std::time::Duration,
    /// Sandbox networking (veth, firewall); `None`: sandboxes have loopback only.
    network: Option<Arc<burrow_node::network::Network>>,
    /// HMAC key of access tokens and signed port URLs.
    secret: Vec<u8>,
    /// Domain of port URLs (`<port>-<id>.<domain>`).
    domain: Option<String>,
}

impl Control {
    pub fn new(store: Arc<Store>, backend: Arc<dyn Backend>, plans: Vec<Plan>) -> Control {
        let plans = plans.into_iter().map(|p| (p.name.clone(), p)).collect();
        Control {
            store,
            backend,
            plans,
            locks: SandboxLocks::default(),
            activity: Mutex::default(),
            hot_window: DEFAULT_HOT_WINDOW,
            network: None,
            secret: rand::random::<[u8; 32]>().to_vec(),
            domain: None,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn with_hot_window(mut self, window: std::time::Duration) -> Control {
        self.hot_window = window;
        self
    }

    pub fn has_plan(&self, name: &str) -> bool {
        self.plans.contains_key(name)
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub async fn create(&self, user: &User, req: CreateSandbox) -> Result<Sandbox, ControlError> {
        let plan_name = req.plan.clone().unwrap_or_else(|| user.plan.clone());
        let plan = self
            .plans
            .get(&plan_name)
            .ok_or_else(|| ControlError::UnknownPlan(plan_name.clone()))?;
        let image = req
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        if image != DEFAULT_IMAGE {
            return Err(ControlError::UnknownImage(image));
        }
        validate_map("env", &req.env, MAX_ENV_ENTRIES, true)?;
        validate_map("metadata", &req.metadata, MAX_METADATA_ENTRIES, false)?;
        let id = new_id(20);
        let hostname = match req.hostname {
            Some(h) => validate_hostname(&h)?,
            None => id.clone(),
        };
        let mut rec = SandboxRecord {
            id: id.clone(),
            owner_id: user.id.clone(),
            state: SandboxState::Starting,
            image,
            plan: plan.name.clone(),
            hostname,
            limits: plan.limits.clone(),
            env: req.env,
            metadata: req.metadata,
            uid_slot: 0,
            runtime: None,
            error: None,
            warm_hit: false,
            created_at: now_rfc3339(),
            timeout_s: req.timeout_s,
            on_timeout: req.on_timeout.unwrap_or_default(),
            started_at: now_unix(),
            paused_at: 0,
            network: self.network_for_create(req.network)?,
        };
        let lock = self.locks.get(&id);
        let _guard = lock.lock().await;
        // The row exists before anything on the host does: a crash from here on is cleaned up by
        // `reconcile` at the next start.
        rec.uid_slot = self.store.insert_sandbox(&rec)?;
        let spec = match self.with_net(spec_of(&rec), &rec) {
            Ok(s) => s,
            Err(e) => {
                self.store
                    .set_error(&id, &reason(codes::INTERNAL, error_chain(&e)))?;
                return Err(e);
            }
        };
        let backend = self.backend.clone();
        let built = tokio::task::spawn_blocking(move || backend.create(&spec)).await?;
        // The sandbox's firewall chain goes in before the API answers; until then the base
        // rules drop everything from its interface.
        let built = match built {
            Ok(runtime) => match self.attach_net(&rec) {
                Ok(()) => Ok(runtime),
                Err(e) => {
                    let _ = self.backend.destroy(&id, Some(&runtime));
                    let _ = self.detach_net(&id);
                    warn!(sandbox_id = %id, error = %error_chain(&e), "create failed");
                    self.store.set_error(
                        &id,
                        &reason(
                            codes::INTERNAL,
                            format!("create failed: {}", error_chain(&e)),
                        ),
                    )?;
                    return Err(e);
                }
            },
            Err(e) => Err(e),
        };
        match built {
            Ok(runtime) => {
                let value = serde_json::to_value(&runtime).map_err(StoreError::from)?;
                self.store.set_running(&id, &value)?;
                rec.state = SandboxState::Running;
                rec.runtime = Some(value);
                info!(sandbox_id = %id, pid = runtime.pid, "sandbox running");
                Ok(self.api(&rec))
            }
            Err(e) => {
                warn!(sandbox_id = %id, error = %error_chain(&e), "create failed");
                let reason = reason(
                    codes::INTERNAL,
                    format!("create failed: {}", error_chain(&e)),
                );
                self.store.set_error(&id, &reason)?;
                Err(e.into())
            }
        }
    }

    /// The caller's sandbox, or `NotFound` — the same answer for another tenant's id as for an id
    /// that never existed (ATTACKS.md A1).
    pub fn record(&self, user: &User, id: &str) -> Result<SandboxRecord, ControlError> {
        match self.store.sandbox(id)? {
            Some(r) if r.owner_id == user.id && r.state != SandboxState::Destroyed => Ok(r),
            _ => Err(ControlError::NotFound),
        }
    }

    pub fn get(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        self.record(user, id).map(|r| self.api(&r))
    }

    pub fn list(&self, user: &User) -> Result<Vec<Sandbox>, ControlError> {
        Ok(self
            .store
            .sandboxes_of(&user.id)?
            .iter()
            .map(|r| self.api(r))
            .collect())
    }

    /// A client for the guest agent of one of the caller's running sandboxes.
    pub fn guest(
        &self,
        user: &User,
        id: &str,
    ) -> Result<(SandboxRecord, GuestClient), ControlError> {
        let rec = self.record(user, id)?;
        if rec.state != SandboxState::Running {
            return Err(ControlError::NotRunning(rec.state.as_str()));
        }
        let runtime = runtime_of(&rec).ok_or(ControlError::NotRunning("starting"))?;
        self.touch(id);
        Ok((rec, GuestClient::new(runtime.guest_socket)))
    }

    fn touch(&self, id: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        a.insert(id.to_string(), std::time::Instant::now());
    }

    fn idle_for(&self, id: &str) -> std::time::Duration {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        a.entry(id.to_string())
            .or_insert_with(std::time::Instant::now)
            .elapsed()
    }

    /// Sets or clears the idle timeout; the idle clock restarts now.
    pub fn set_timeout(
        &self,
        user: &User,
        id: &str,
        req: SetTimeout,
    ) -> Result<Sandbox, ControlError> {
        let mut rec = self.record(user, id)?;
        if req.timeout_s == Some(0) {
            return Err(ControlError::BadRequest(
                "timeout_s must be positive (null turns it off)".into(),
            ));
        }
        rec.timeout_s = req.timeout_s;
        rec.on_timeout = req.on_timeout.unwrap_or(rec.on_timeout);
        self.store.set_timeout(id, rec.timeout_s, rec.on_timeout)?;
        self.touch(id);
        Ok(self.api(&rec))
    }

    /// Applies idle timeouts and the plans' maximum durations; run about once a second.
    pub async fn enforce_limits(&self) -> Result<(), ControlError> {
        for rec in self.store.live_sandboxes()? {
            if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
                continue;
            }
            let ran = now_unix().saturating_sub(rec.started_at).max(0) as u64;
            let result = if ran > rec.limits.max_duration_s {
                let reason = ErrorReason {
                    code: codes::MAX_DURATION_EXCEEDED.into(),
                    message: format!(
                        "the plan allows {} s per run; this one ran {ran} s",
                        rec.limits.max_duration_s
                    ),
                    limit: Some(rec.limits.max_duration_s.into()),
                    observed: Some(ran.into()),
                };
                self.end_with_error(&rec.id, reason).await
            } else if rec.state == SandboxState::Paused
                && now_unix().saturating_sub(rec.paused_at).max(0) as u64
                    >= self.hot_window.as_secs()
            {
                info!(sandbox_id = %rec.id, "hot window over; hibernating");
                let owner = User {
                    id: rec.owner_id.clone(),
                    name: String::new(),
                    plan: String::new(),
                    is_admin: false,
                };
                self.hibernate(&owner, &rec.id).await.map(|_| ())
            } else if let Some(t) = rec.timeout_s.filter(|_| rec.state == SandboxState::Running) {
                if self.idle_for(&rec.id).as_secs() < t {
                    continue;
                }
                info!(sandbox_id = %rec.id, timeout_s = t, action = rec.on_timeout.as_str(), "idle timeout");
                let owner = User {
                    id: rec.owner_id.clone(),
                    name: String::new(),
                    plan: String::new(),
                    is_admin: false,
                };
                match rec.on_timeout {
                    OnTimeout::Pause => self.pause(&owner, &rec.id).await.map(|_| ()),
                    OnTimeout::Destroy => self.destroy(&owner, &rec.id).await,
                }
            } else {
                continue;
            };
            if let Err(e) = result {
                warn!(sandbox_id = %rec.id, error = %error_chain(&e), "enforcing a limit failed; retrying");
            }
        }
        Ok(())
    }

    /// A hard limit was hit: the row says why (`error` with the reason), the computer is destroyed.
    async fn end_with_error(&self, id: &str, reason: ErrorReason) -> Result<(), ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let Some(rec) = self.store.sandbox(id)? else {
            return Ok(());
        };
        warn!(sandbox_id = %id, code = %reason.code, "hard limit hit; destroying the computer");
        self.store.set_error(id, &reason)?;
        self.destroy_on_host(&rec).await
    }

    pub async fn destroy(&self, user: &User, id: &str) -> Result<(), ControlError> {
        self.record(user, id)?;
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        // Re-read under the lock: a concurrent delete may have finished meanwhile.
        let rec = self.record(user, id)?;
        self.destroy_on_host(&rec).await?;
        self.store.set_state(id, SandboxState::Destroyed)?;
        info!(sandbox_id = %id, "sandbox destroyed");
        Ok(())
    }

    /// Hot pause: files are synced to the sandbox's disk, then every process is frozen in place
    /// (memory, open connections and pids stay).
    pub async fn pause(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id)?;
        if rec.state != SandboxState::Running {
            return Err(ControlError::WrongState {
                state: rec.state.as_str(),
                action: "pause",
                needs: "running",
            });
        }
        sync_files(&rec).await?;
        let backend = self.backend.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || backend.pause(&id2)).await??;
        self.store.set_paused(id)?;
        rec.state = SandboxState::Paused;
        info!(sandbox_id = %id, "sandbox paused");
        Ok(self.api(&rec))
    }

    /// Resume: a paused sandbox is thawed (hot: its processes carry on where they were); a
    /// hibernated one starts cold (same id, same files, fresh processes).
    pub async fn resume(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id)?;
        let backend = self.backend.clone();
        match rec.state {
            SandboxState::Paused => {
                let id2 = id.to_string();
                tokio::task::spawn_blocking(move || backend.resume(&id2)).await??;
                self.store.set_state(id, SandboxState::Running)?;
            }
            SandboxState::Hibernated => {
                let spec = self.with_net(spec_of(&rec), &rec)?;
                let runtime = tokio::task::spawn_blocking(move || backend.create(&spec)).await??;
                if let Err(e) = self.attach_net(&rec) {
                    let _ = self.backend.stop(id, Some(&runtime));
                    return Err(e);
                }
                let value = serde_json::to_value(&runtime).map_err(StoreError::from)?;
                self.store.set_running(id, &value)?;
                rec.runtime = Some(value);
                rec.started_at = now_unix();
            }
            other => {
                return Err(ControlError::WrongState {
                    state: other.as_str(),
                    action: "resume",
                    needs: "paused or hibernated",
                })
            }
        }
        rec.state = SandboxState::Running;
        self.touch(id);
        info!(sandbox_id = %id, "sandbox resumed");
        Ok(self.api(&rec))
    }

    /// Hibernate: files are synced and kept, every process ends. A later resume starts cold.
    pub async fn hibernate(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id)?;
        match rec.state {
            SandboxState::Running => sync_files(&rec).await?,
            // Paused sandboxes were synced when they paused and cannot run `sync` now.
            SandboxState::Paused => {}
            other => {
                return Err(ControlError::WrongState {
                    state: other.as_str(),
                    action: "hibernate",
                    needs: "running or paused",
                })
            }
        }
        let backend = self.backend.clone();
        let (id2, runtime) = (id.to_string(), runtime_of(&rec));
        tokio::task::spawn_blocking(move || backend.stop(&id2, runtime.as_ref())).await??;
        self.detach_net(id)?;
        self.store.set_hibernated(id)?;
        rec.state = SandboxState::Hibernated;
        rec.runtime = None;
        info!(sandbox_id = %id, "sandbox hibernated");
        Ok(self.api(&rec))
    }

    async fn destroy_on_host(&self, rec: &SandboxRecord) -> Result<(), ControlError> {
        let backend = self.backend.clone();
        let id = rec.id.clone();
        let runtime = runtime_of(rec);
        tokio::task::spawn_blocking(move || backend.destroy(&id, runtime.as_ref())).await??;
        self.detach_net(&rec.id)?;
        Ok(())
    }

    /// Makes the store and the host agree after a start (DESIGN.md §3, crash safety): running
    /// sandboxes whose computer still answers are adopted, interrupted creates and lost sandboxes
    /// are cleaned and marked `error`, and anything on the host without a live row is removed.
    pub async fn reconcile(&self) -> Result<ReconcileReport, ControlError> {
        let mut report = ReconcileReport::default();
        let mut keep = HashSet::new();
        for rec in self.store.live_sandboxes()? {
            let (code, message, list) = match rec.state {
                SandboxState::Running | SandboxState::Paused => {
                    if self.still_alive(&rec).await {
                        keep.insert(rec.id.clone());
                        report.adopted.push(rec.id.clone());
                        continue;
                    }
                    // The processes are gone (a host reboot, a crash) but the disk is not: the
                    // sandbox comes back cold on the next resume (DESIGN.md §3).
                    let backend = self.backend.clone();
                    let (id, runtime) = (rec.id.clone(), runtime_of(&rec));
                    match tokio::task::spawn_blocking(move || backend.stop(&id, runtime.as_ref()))
                        .await?
                    {
                        Ok(()) => {
                            self.store.set_hibernated(&rec.id)?;
                            keep.insert(rec.id.clone());
                            report.hibernated.push(rec.id.clone());
                            continue;
                        }
                        Err(e) => {
                            warn!(sandbox_id = %rec.id, error = %error_chain(&e), "could not keep a lost sandbox's files")
                        }
                    }
                    (
                        codes::SANDBOX_LOST,
                        "the sandbox's processes ended and its files could not be kept",
                        &mut report.lost,
                    )
                }
                SandboxState::Starting => (
                    codes::CREATE_INTERRUPTED,
                    "the server stopped while the sandbox was being created",
                    &mut report.interrupted,
                ),
                // Files without processes: nothing to adopt, but the disk must stay.
                SandboxState::Hibernated => {
                    keep.insert(rec.id.clone());
                    continue;
                }
                SandboxState::Error | SandboxState::Destroyed => continue,
            };
            // The row says what happened before the host is touched, so a failed clean-up is
            // retried at the next start rather than forgotten.
            self.store
                .set_error(&rec.id, &reason(code, message.into()))?;
            list.push(rec.id.clone());
            if let Err(e) = self.destroy_on_host(&rec).await {
                warn!(sandbox_id = %rec.id, error = %error_chain(&e), "clean-up failed; retried at the next start");
            }
        }
        let backend = self.backend.clone();
        let on_host = tokio::task::spawn_blocking(move || backend.host_sandboxes()).await??;
        for id in on_host.into_iter().filter(|id| !keep.contains(id)) {
            let backend = self.backend.clone();
            let id2 = id.clone();
            match tokio::task::spawn_blocking(move || backend.destroy(&id2, None)).await? {
                Ok(()) => report.cleaned.push(id),
                Err(e) => {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "clean-up failed; retried at the next start")
                }
            }
        }
        // Firewall before user code: the table is rebuilt for the sandboxes kept, before the API
        // serves, and compared with what the kernel then holds.
        self.install_firewall()?;
        Ok(report)
    }

    async fn still_alive(&self, rec: &SandboxRecord) -> bool {
        let Some(runtime) = runtime_of(rec) else {
            return false;
        };
        let backend = self.backend.clone();
        let (id, rt) = (rec.id.clone(), runtime.clone());
        let alive = tokio::task::spawn_blocking(move || backend.probe(&id, &rt)).await;
        if !matches!(alive, Ok(Liveness::Alive)) {
            return false;
        }
        // A paused sandbox's guest is frozen and cannot answer; its live PID 1 is proof enough.
        rec.state == SandboxState::Paused
            || GuestClient::new(runtime.guest_socket).ping().await.is_ok()
    }
}

/// sync(2) inside the sandbox: flushes its disk (and only what it can see) to the image file.
async fn sync_files(rec: &SandboxRecord) -> Result<(), ControlError> {
    let runtime = runtime_of(rec).ok_or(ControlError::NotRunning("starting"))?;
    let sync = burrow_proto::ExecSpec {
        argv: vec!["sync".into()],
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    GuestClient::new(runtime.guest_socket)
        .exec_buffered(sync, None, 4096)
        .await?;
    Ok(())
}

#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub adopted: Vec<String>,
    /// Their processes were gone; their files are kept and a resume starts them cold.
    pub hibernated: Vec<String>,
    pub lost: Vec<String>,
    pub interrupted: Vec<String>,
    /// Host leftovers with no live row.
    pub cleaned: Vec<String>,
}

fn spec_of(rec: &SandboxRecord) -> SandboxSpec {
    SandboxSpec {
        id: rec.id.clone(),
        hostname: rec.hostname.clone(),
        image: rec.image.clone(),
        limits: rec.limits.clone(),
        uid_slot: rec.uid_slot,
        env: rec.env.clone(),
        net: None,
    }
}

fn runtime_of(rec: &SandboxRecord) -> Option<RuntimeInfo> {
    rec.runtime
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

pub fn reason(code: &str, message: String) -> ErrorReason {
    ErrorReason {
        code: code.to_string(),
        message,
        limit: None,
        observed: None,
    }
}

pub fn to_api(rec: &SandboxRecord) -> Sandbox {
    Sandbox {
        id: rec.id.clone(),
        state: rec.state,
        image: rec.image.clone(),
        plan: rec.plan.clone(),
        hostname: rec.hostname.clone(),
        limits: rec.limits.clone(),
        created_at: rec.created_at.clone(),
        metadata: rec.metadata.clone(),
        error: rec.error.clone(),
        warm_hit: rec.warm_hit,
        timeout_s: rec.timeout_s,
        on_timeout: rec.on_timeout,
        network: None,
        access_token: None,
    }
}

/// "outer: inner: innermost", so logs and error messages show the whole cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn validate_hostname(h: &str) -> Result<String, ControlError> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(ControlError::BadRequest(format!(
            "hostname {h:?} is not a DNS label (1-63 letters, digits or '-', not starting or ending with '-')"
        )))
    }
}

fn validate_map(
    what: &str,
    map: &BTreeMap<String, String>,
    max_entries: usize,
    env_names: bool,
) -> Result<(), ControlError> {
    if map.len() > max_entries {
        return Err(ControlError::BadRequest(format!(
            "{what} has {} entries, at most {max_entries} allowed",
            map.len()
        )));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() + v.len() > MAX_KV_BYTES || k.contains('\0') || v.contains('\0')
        {
            return Err(ControlError::BadRequest(format!(
                "{what} entry {k:?} is empty, too long (over {MAX_KV_BYTES} bytes) or contains NUL"
            )));
        }
        if env_names && k.contains('=') {
            return Err(ControlError::BadRequest(format!(
                "env name {k:?} contains '='"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_must_be_dns_labels() {
        assert_eq!(validate_hostname("Agent-1").unwrap(), "agent-1");
        for bad in ["", "-a", "a-", "a.b", "a b", &"x".repeat(64)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn env_and_metadata_are_bounded() {
        let ok = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert!(validate_map("env", &ok, 4, true).is_ok());
        let eq = BTreeMap::from([("A=B".to_string(), "1".to_string())]);
        assert!(validate_map("env", &eq, 4, true).is_err());
        let nul = BTreeMap::from([("A".to_string(), "a\0b".to_string())]);
        assert!(validate_map("metadata", &nul, 4, false).is_err());
        let many: BTreeMap<_, _> = (0..5).map(|i| (i.to_string(), String::new())).collect();
        assert!(validate_map("metadata", &many, 4, false).is_err());
    }
}
