//! The control layer: the sandbox state machine. Transport handlers turn requests into calls here;
//! this module decides what is allowed, writes the store before touching the host, and drives the
//! backend. It owns no HTTP types.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use burrow_node::guest::{GuestClient, GuestError};
use burrow_node::{timing, Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};
use burrow_store::{
    now_rfc3339, now_unix, AsyncStore, Claim, Intent, RunRecord, SandboxRecord, StoreError, User,
    POOL_OWNER,
};
use burrow_types::{
    codes, CreateSandbox, ErrorReason, OnTimeout, Plan, RunSpec, RunState, RunStatus, Sandbox,
    SandboxState, SetTimeout,
};
use tracing::{info, warn};

pub mod admission;
pub mod net;
pub mod storage;

pub use admission::{Created, IdempotencyKey, PidBudget};

pub const DEFAULT_IMAGE: &str = "system";
pub const DEFAULT_HOT_WINDOW: std::time::Duration = std::time::Duration::from_secs(8 * 3600);
// What a create may hold (the OpenAPI document states the same bounds; lengths in characters).
/// The longest idle timeout a sandbox can have (a year): any longer is no timeout at all, and
/// every stored number must fit SQLite's signed 64-bit integers.
pub use burrow_types::bounds::MAX_TIMEOUT_S;
use burrow_types::bounds::{
    ENV_ENTRIES as MAX_ENV_ENTRIES, FILES as MAX_FILES, FILE_CHARS, KEY_CHARS,
    MEMORY_TOKENS as MAX_MEMORY_TOKENS, MEMORY_TOKEN_CHARS,
    METADATA_ENTRIES as MAX_METADATA_ENTRIES, PATH_CHARS, TASK_CHARS, VALUE_CHARS,
};
/// Where a sandbox's run is readable inside it.
pub const RUN_FILE: &str = "/etc/burrow/run.json";

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
    #[error("unknown plan {name:?}; {}", choices("plans", known))]
    UnknownPlan { name: String, known: Vec<String> },
    #[error("plan {plan:?} is above this user's plan {user_plan:?}; allowed: {}", .allowed.join(", "))]
    PlanNotAllowed {
        plan: String,
        user_plan: String,
        allowed: Vec<String>,
    },
    #[error("{0}")]
    CallbackNotAllowed(String),
    #[error("unknown image {name:?}; {}", choices("images", known))]
    UnknownImage { name: String, known: Vec<String> },
    #[error("{0}")]
    BadRequest(String),
    #[error("{}", .0.message)]
    ToolCallsExceeded(ErrorReason),
    #[error("the sandbox became {0} while the call ran; the call's command ends when the sandbox resumes (use a background process to keep one across a pause)")]
    Interrupted(&'static str),
    #[error("the sandbox's run has ended; start a new run to make tool calls")]
    RunEnded,
    #[error("the sandbox has no active run")]
    NoActiveRun,
    #[error("unknown pool {name:?}; {}", choices("pools", known))]
    UnknownPool { name: String, known: Vec<String> },
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
    /// The data filesystem is (nearly) full, or disks would promise more than it may hold.
    #[error("{}", .0.message)]
    InsufficientStorage(ErrorReason),
    /// A resume failed; the sandbox is back where it was (its files kept) and says why.
    #[error("{}", .0.message)]
    ResumeFailed(ErrorReason),
    /// A per-user quota would be exceeded; `details` names it (`quota`, `limit`, `observed`).
    #[error("{}", details["message"].as_str().unwrap_or("quota exceeded"))]
    QuotaExceeded {
        details: serde_json::Value,
        retry_after_s: u64,
    },
    /// The host's pid budget is promised to other sandboxes.
    #[error("{}", .0["message"].as_str().unwrap_or("the host is full"))]
    HostFull(serde_json::Value),
    #[error(
        "this Idempotency-Key was used with a different request; use a new key for a new request"
    )]
    IdempotencyKeyReused,
    #[error("the first request with this Idempotency-Key is still being served; retry later")]
    IdempotencyInProgress,
    #[error("this server offers no {0} isolation (docs/isolation.md says what each tier needs)")]
    IsolationUnavailable(&'static str),
    #[error("{field} must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        min: u64,
        max: u64,
    },
}

/// The error for an image this server does not have (only the built-in one, for now).
pub fn unknown_image(name: String) -> ControlError {
    ControlError::UnknownImage {
        name,
        known: vec![DEFAULT_IMAGE.to_string()],
    }
}

/// The valid names, for an error about an unknown one: a user should not have to guess.
pub fn choices(what: &str, known: &[String]) -> String {
    if known.is_empty() {
        return format!("this server has no {what}");
    }
    let list: Vec<String> = known.iter().map(|k| format!("{k:?}")).collect();
    format!("this server has {what} {}", list.join(", "))
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
    /// Every call runs off the async workers (`AsyncStore`): a locked database stalls no request
    /// that does not need it.
    store: AsyncStore,
    backend: Arc<dyn Backend>,
    plans: BTreeMap<String, Plan>,
    locks: SandboxLocks,
    /// Last API activity per sandbox, for idle timeouts. Kept in memory: a database write per exec
    /// would cost more than the exec; after a restart every idle clock starts again.
    activity: Mutex<HashMap<String, std::time::Instant>>,
    /// How long a paused sandbox keeps its processes before it hibernates (8 h by default).
    hot_window: std::time::Duration,
    /// Sandbox networking (veth, firewall); `None`: sandboxes have loopback only.
    network: Option<Arc<burrow_node::network::Network>>,
    /// HMAC key of access tokens and signed port URLs.
    secret: Vec<u8>,
    /// Domain of port URLs (`<port>-<id>.<domain>`).
    domain: Option<String>,
    /// Paused sandboxes hibernate early while the host has less memory available than this.
    pub(crate) hibernate_below_mib: u64,
    /// Wakes the pool replenisher (after a claim, a pool change, the last cold create of a burst).
    pub pool_wake: tokio::sync::Notify,
    /// Creates in flight; the replenisher holds back while there are any (up to a second).
    pub(crate) creates_in_flight: std::sync::atomic::AtomicUsize,
    /// Since when the replenisher has been holding back.
    pub(crate) pool_yield_since: Mutex<Option<std::time::Instant>>,
    /// Checks, signs and sends run callbacks.
    callbacks: Arc<crate::callback::Callbacks>,
    /// Ids of sandboxes that just stopped running (paused, hibernated, destroyed), so calls
    /// waiting on their guest answer at once instead of hanging on a frozen or dead agent.
    stopped: tokio::sync::broadcast::Sender<String>,
    /// Watermark and overcommit of the data filesystem; `None`: not checked.
    storage: Option<storage::StorageGuard>,
    /// Quotas, the host's pid budget and creates in flight (`control/admission.rs`).
    pub(crate) admission: admission::Admission,
}

impl Control {
    pub fn new(store: AsyncStore, backend: Arc<dyn Backend>, plans: Vec<Plan>) -> Control {
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
            hibernate_below_mib: crate::pool::default_memory_floor_mib(),
            pool_wake: tokio::sync::Notify::new(),
            creates_in_flight: std::sync::atomic::AtomicUsize::new(0),
            pool_yield_since: Mutex::new(None),
            callbacks: Arc::new(crate::callback::Callbacks::new(
                Vec::new(),
                crate::callback::Targets::default(),
                Vec::new(),
            )),
            stopped: tokio::sync::broadcast::channel(1024).0,
            storage: None,
            admission: admission::Admission::default(),
        }
    }

    /// The host's pid budget: `None` turns it off.
    pub fn with_pid_budget(mut self, budget: Option<PidBudget>) -> Control {
        self.admission = self.admission.with_pid_budget(budget);
        self
    }

    pub fn with_storage(mut self, guard: storage::StorageGuard) -> Control {
        self.storage = Some(guard);
        self
    }

    /// Refuses new data (`insufficient_storage`) while the data filesystem is under its
    /// watermark; `what` names the refused operation.
    pub fn check_free_space(&self, what: &str) -> Result<(), ControlError> {
        let Some(g) = &self.storage else {
            return Ok(());
        };
        g.check_free(what)?;
        // A pool of its own (btrfs): full, it is ENOSPC for every sandbox on it.
        if let Some(pool) = self.backend.volume_space()? {
            g.check_volumes(what, &pool)?;
        }
        Ok(())
    }

    /// Refuses a new disk of `disk_mib` past the watermark or the overcommit ratio.
    async fn check_new_disk(&self, disk_mib: u64) -> Result<(), ControlError> {
        let Some(g) = &self.storage else {
            return Ok(());
        };
        self.check_free_space("a new sandbox")?;
        let pool_total = self.backend.volume_space()?.map(|p| p.total_bytes);
        g.check_promise(self.store.promised_disk_mib().await?, disk_mib, pool_total)
    }

    /// Runs a call on a sandbox's guest unless the sandbox stops running meanwhile: a pause
    /// freezes the guest mid-call, and the caller gets `409` rather than a request that hangs until
    /// someone resumes it. (The call's command then ends at resume, like any foreground command
    /// whose caller went away; background processes carry on.)
    pub async fn while_running<T>(
        &self,
        id: &str,
        call: impl std::future::Future<Output = Result<T, GuestError>>,
    ) -> Result<T, ControlError> {
        let mut stopped = self.stopped.subscribe();
        // Subscribed first, checked second: a pause that lands in between is seen either way.
        let state = self.store.sandbox(id).await?.map(|r| r.state);
        if state != Some(SandboxState::Running) {
            return Err(ControlError::NotRunning(
                state.map_or("destroyed", SandboxState::as_str),
            ));
        }
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => return match r {
                    Ok(v) => Ok(v),
                    Err(e @ GuestError::Remote { .. }) => Err(e.into()),
                    Err(e) => Err(self.why_guest_went_away(id, e).await?),
                },
                ev = stopped.recv() => {
                    let hit = match ev {
                        Ok(stopped_id) => stopped_id == id,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            self.store.sandbox(id).await?.map(|r| r.state) != Some(SandboxState::Running)
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => false,
                    };
                    if hit {
                        return Err(ControlError::Interrupted(
                            self.leaving_for(id).await?.unwrap_or("running"),
                        ));
                    }
                }
            }
        }
    }

    /// A guest that stopped answering mid-call because a pause, hibernate or delete raced the call
    /// is that transition's doing, not a fault: the caller gets the `409` it would have got a
    /// moment later, not a `502`.
    async fn why_guest_went_away(
        &self,
        id: &str,
        e: GuestError,
    ) -> Result<ControlError, ControlError> {
        Ok(match self.leaving_for(id).await? {
            Some(state) => ControlError::Interrupted(state),
            None => ControlError::Guest(e),
        })
    }

    /// The state a sandbox is in or on its way to when it is not (or no longer) simply running:
    /// `None` for a running sandbox with no transition under way.
    async fn leaving_for(&self, id: &str) -> Result<Option<&'static str>, ControlError> {
        // The intent first: a transition sets it before it touches the host and clears it in the
        // same write that settles the state, so read in this order the two never miss a
        // transition that ended in between (the other order can see `running` and no intent).
        let intent = self.store.intents().await?.remove(id);
        let state = self.store.sandbox(id).await?.map(|r| r.state);
        Ok(match (state, intent) {
            (Some(SandboxState::Running), None | Some(Intent::Resuming)) => None,
            (Some(SandboxState::Running), Some(Intent::Pausing)) => Some("paused"),
            (Some(SandboxState::Running), Some(Intent::Hibernating)) => Some("hibernated"),
            (Some(SandboxState::Running), Some(Intent::Destroying)) => Some("destroyed"),
            (other, _) => Some(other.map_or("destroyed", SandboxState::as_str)),
        })
    }

    fn announce_stopped(&self, id: &str) {
        let _ = self.stopped.send(id.to_string());
    }

    pub fn with_callbacks(mut self, callbacks: crate::callback::Callbacks) -> Control {
        self.callbacks = Arc::new(callbacks);
        self
    }

    pub fn callbacks(&self) -> &crate::callback::Callbacks {
        &self.callbacks
    }

    /// The plans `user` may ask for: every plan whose limits are all within the user's own plan's
    /// (`Limits::within`); admins may ask for any.
    pub fn plans_allowed(&self, user: &User) -> Vec<String> {
        let own = self.plans.get(&user.plan).map(|p| &p.limits);
        self.plans
            .values()
            .filter(|p| user.is_admin || own.is_some_and(|own| p.limits.within(own)))
            .map(|p| p.name.clone())
            .collect()
    }

    /// A user's plan is an entitlement: asking for a plan above it is refused, naming what is
    /// allowed (REST and E2B creates, and so warm-pool claims, all come through here).
    fn check_plan(&self, user: &User, plan: &Plan) -> Result<(), ControlError> {
        let allowed = self.plans_allowed(user);
        if allowed.contains(&plan.name) {
            return Ok(());
        }
        Err(ControlError::PlanNotAllowed {
            plan: plan.name.clone(),
            user_plan: user.plan.clone(),
            allowed,
        })
    }

    /// A run's callback URL: its syntax, and its target under the callback rules now (they are
    /// applied again when the callback connects).
    async fn check_callback(&self, run: Option<&RunSpec>) -> Result<(), ControlError> {
        match run.and_then(|r| r.callback_url.as_deref()) {
            Some(url) => self
                .callbacks
                .check(url)
                .await
                .map_err(ControlError::CallbackNotAllowed),
            None => Ok(()),
        }
    }

    pub fn with_hibernate_below_mib(mut self, mib: u64) -> Control {
        self.hibernate_below_mib = mib;
        self
    }

    pub(crate) fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    pub(crate) fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.get(id)
    }

    pub fn store(&self) -> &AsyncStore {
        &self.store
    }

    pub fn with_hot_window(mut self, window: std::time::Duration) -> Control {
        self.hot_window = window;
        self
    }

    pub fn has_plan(&self, name: &str) -> bool {
        self.plans.contains_key(name)
    }

    /// The error for a plan this server does not have, naming the ones it has.
    pub fn unknown_plan(&self, name: &str) -> ControlError {
        ControlError::UnknownPlan {
            name: name.to_string(),
            known: self.plan_names(),
        }
    }

    pub fn plan_names(&self) -> Vec<String> {
        self.plans.keys().cloned().collect()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    // Lifecycle operations run on a task of their own: a client that disconnects mid-create or
    // mid-pause (a dropped request future) must not leave a sandbox half-made. The caller waits
    // for the answer; the work finishes either way.

    pub async fn create(
        self: &Arc<Self>,
        user: &User,
        req: CreateSandbox,
    ) -> Result<Sandbox, ControlError> {
        Ok(self.create_with(user, req, None).await?.sandbox)
    }

    /// A create with an optional idempotency key (see `control/admission.rs`).
    pub async fn create_with(
        self: &Arc<Self>,
        user: &User,
        req: CreateSandbox,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, ControlError> {
        let (this, user) = (self.clone(), user.clone());
        let timings = timing::current();
        tokio::spawn(timing::scope(timings, async move {
            this.create_once(&user, req, key).await
        }))
        .await?
    }

    pub async fn destroy(self: &Arc<Self>, user: &User, id: &str) -> Result<(), ControlError> {
        let (this, user, id) = (self.clone(), user.clone(), id.to_string());
        tokio::spawn(async move { this.destroy_now(&user, &id).await }).await?
    }

    pub async fn pause(self: &Arc<Self>, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let (this, user, id) = (self.clone(), user.clone(), id.to_string());
        tokio::spawn(async move { this.pause_now(&user, &id).await }).await?
    }

    pub async fn resume(self: &Arc<Self>, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let (this, user, id) = (self.clone(), user.clone(), id.to_string());
        let timings = timing::current();
        tokio::spawn(timing::scope(timings, async move {
            this.resume_now(&user, &id).await
        }))
        .await?
    }

    pub async fn hibernate(
        self: &Arc<Self>,
        user: &User,
        id: &str,
    ) -> Result<Sandbox, ControlError> {
        let (this, user, id) = (self.clone(), user.clone(), id.to_string());
        tokio::spawn(async move { this.hibernate_now(&user, &id).await }).await?
    }

    /// A new sandbox for `user`: claimed from a warm pool when one matches (its context injected),
    /// otherwise built cold at once. Nothing waits for a pool.
    async fn create_now(
        &self,
        user: &User,
        req: CreateSandbox,
        id: String,
    ) -> Result<Sandbox, ControlError> {
        // Counted while it runs: the replenisher yields to creates (see `pool::replenish`).
        let _in_flight = CreateInFlight::start(self);
        let plan_name = req.plan.clone().unwrap_or_else(|| user.plan.clone());
        let plan = self
            .plans
            .get(&plan_name)
            .ok_or_else(|| self.unknown_plan(&plan_name))?
            .clone();
        self.check_plan(user, &plan)?;
        let image = req
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        if image != DEFAULT_IMAGE {
            return Err(unknown_image(image));
        }
        validate_map("env", &req.env, MAX_ENV_ENTRIES, true)?;
        validate_map("metadata", &req.metadata, MAX_METADATA_ENTRIES, false)?;
        validate_files(&req.files)?;
        let mut env = req.env;
        if let Some(run) = &req.run {
            validate_run(run)?;
            env.extend(run.env.clone());
        }
        self.check_callback(req.run.as_ref()).await?;
        let hostname = req.hostname.as_deref().map(validate_hostname).transpose()?;
        validate_timeout(req.timeout_s)?;
        let mut limits = plan.limits.clone();
        limits.isolation = req.isolation.unwrap_or(limits.isolation);
        if !self.backend.offers(limits.isolation) {
            return Err(ControlError::IsolationUnavailable(
                limits.isolation.as_str(),
            ));
        }
        let claim = Claim {
            owner_id: user.id.clone(),
            plan: plan.name.clone(),
            hostname: hostname.clone(),
            limits,
            env,
            metadata: req.metadata,
            timeout_s: req.timeout_s,
            on_timeout: req.on_timeout.unwrap_or_default(),
            ephemeral: req.ephemeral,
            run: req.run.map(|spec| RunRecord {
                spec,
                state: RunState::Active,
                ended: None,
            }),
        };
        // Checked before a warm sandbox is claimed: a bad policy must not cost one.
        let network = self.network_for_create(req.network)?;
        // A warm sandbox's disk is already promised; what it will write is not yet on the disk.
        self.check_free_space("a new sandbox")?;
        // Quotas and the host's pid budget, last: nothing is made past them.
        let admission = timing::stage("admission");
        let admitted = self.admit(user, &plan, &id).await?;
        drop(admission);
        if let Some(mut rec) = self.claim_warm(&image, &plan, &claim, &req.files).await? {
            self.claim_network(&mut rec, network).await?;
            return Ok(self.api(&rec));
        }
        self.check_new_disk(plan.limits.disk_mib).await?;
        // A cold build adds a computer: the host's pid budget must have room for it.
        self.admit_build(&admitted).await?;
        let rec = SandboxRecord {
            id: id.clone(),
            owner_id: claim.owner_id,
            state: SandboxState::Starting,
            image,
            plan: claim.plan,
            hostname: hostname.unwrap_or_else(|| id.clone()),
            limits: claim.limits,
            env: claim.env,
            metadata: claim.metadata,
            uid_slot: 0,
            runtime: None,
            error: None,
            warm_hit: false,
            created_at: now_rfc3339(),
            timeout_s: claim.timeout_s,
            on_timeout: claim.on_timeout,
            started_at: now_unix(),
            paused_at: 0,
            network,
            pool: None,
            ephemeral: claim.ephemeral,
            run: claim.run,
            tool_calls: 0,
        };
        let lock = self.locks.get(&id);
        let _guard = lock.lock().await;
        let rec = self.build(rec).await?;
        let inject = timing::stage("inject");
        if let Err(e) = self.inject(&rec, false, &req.files).await {
            self.fail_after_build(&rec, &e).await;
            return Err(e);
        }
        drop(inject);
        timed_store(self.store.set_state(&id, SandboxState::Running)).await?;
        Ok(self.api(&SandboxRecord {
            state: SandboxState::Running,
            ..rec
        }))
    }

    /// Writes the row, then builds the computer. Returns the record in `starting` with its runtime;
    /// the caller marks it running once anything else it needs is done. Holds no lock: the caller
    /// holds the sandbox's.
    pub(crate) async fn build(
        &self,
        mut rec: SandboxRecord,
    ) -> Result<SandboxRecord, ControlError> {
        let id = rec.id.clone();
        // The row exists before anything on the host does: a crash from here on is cleaned up by
        // `reconcile` at the next start.
        rec.uid_slot = timed_store(self.store.insert_sandbox(&rec)).await?;
        let spec = match self.with_net(spec_of(&rec), &rec) {
            Ok(s) => s,
            Err(e) => {
                self.store
                    .set_error(&id, &reason(codes::INTERNAL, error_chain(&e)))
                    .await?;
                return Err(e);
            }
        };
        let backend = self.backend.clone();
        let timings = timing::current();
        let runtime = match tokio::task::spawn_blocking(move || {
            timing::scope_blocking(timings, || backend.create(&spec))
        })
        .await?
        {
            Ok(r) => r,
            Err(e) => {
                // `create` left nothing of a new sandbox on the host.
                warn!(sandbox_id = %id, error = %error_chain(&e), "create failed");
                let e = ControlError::from(e);
                let code = if is_storage_full(&e) {
                    codes::INSUFFICIENT_STORAGE
                } else {
                    codes::INTERNAL
                };
                let why = reason(code, format!("create failed: {}", error_chain(&e)));
                if let Err(se) = self.store.set_error(&id, &why).await {
                    warn!(sandbox_id = %id, error = %error_chain(&se), "recording the failure; reconcile cleans the row");
                }
                return Err(e);
            }
        };
        // The runtime is recorded first, so a crash from here on finds the computer by its pid.
        // The sandbox's firewall chain goes in before the API answers; until then the base rules
        // drop everything from its interface.
        let ready = async {
            let value = serde_json::to_value(&runtime).map_err(StoreError::from)?;
            timed_store(self.store.set_built(&id, &value)).await?;
            let _net = timing::stage("net-attach");
            self.attach_net(&rec)?;
            Ok::<_, ControlError>(value)
        }
        .await;
        match ready {
            Ok(value) => {
                rec.runtime = Some(value);
                rec.started_at = now_unix();
                info!(sandbox_id = %id, pid = runtime.pid, pool = rec.pool.as_deref(), "sandbox built");
                Ok(rec)
            }
            Err(e) => {
                // Built but not ready: the computer goes. If even the row cannot be written (a
                // full database), it stays `starting`, which reconcile cleans at the next start.
                warn!(sandbox_id = %id, error = %error_chain(&e), "create failed");
                let why = reason(
                    codes::INTERNAL,
                    format!("create failed: {}", error_chain(&e)),
                );
                let _ = self.store.set_error(&id, &why).await;
                let backend = self.backend.clone();
                let id2 = id.clone();
                let _ = tokio::task::spawn_blocking(move || backend.destroy(&id2, Some(&runtime)))
                    .await;
                let _ = self.detach_net(&id);
                Err(e)
            }
        }
    }

    /// A sandbox was built but could not be made ready: the row says why, the computer goes.
    pub(crate) async fn fail_after_build(&self, rec: &SandboxRecord, e: &ControlError) {
        warn!(sandbox_id = %rec.id, error = %error_chain(e), "sandbox set-up failed; destroying it");
        let why = reason(
            codes::INTERNAL,
            format!("set-up failed: {}", error_chain(e)),
        );
        if let Err(e) = self.store.set_error(&rec.id, &why).await {
            warn!(sandbox_id = %rec.id, error = %error_chain(&e), "recording the failure");
        }
        if let Err(e) = self.destroy_on_host(rec).await {
            warn!(sandbox_id = %rec.id, error = %error_chain(&e), "clean-up failed; retried at the next start");
        }
    }

    /// Gives a built sandbox its caller's context. A warm sandbox was built without it, so it also
    /// gets its env, hostname and limits here; a cold one got those at build.
    pub(crate) async fn inject(
        &self,
        rec: &SandboxRecord,
        warm: bool,
        files: &BTreeMap<String, String>,
    ) -> Result<(), ControlError> {
        let runtime = runtime_of(rec).ok_or(ControlError::NotRunning("starting"))?;
        let guest = GuestClient::new(runtime.guest_socket.clone());
        if warm {
            // Only what differs from how the warm sandbox was built goes through the guest: a
            // claim with no env or hostname costs little more than the claim itself. Limits are
            // always rewritten (a few cgroup files), so a pool whose plan changed since the
            // sandbox was built cannot hand out the old plan's limits.
            let renamed = rec.hostname != rec.id;
            if !rec.env.is_empty() || renamed {
                let mut env = rec.env.clone();
                env.insert("HOSTNAME".into(), rec.hostname.clone());
                guest.set_env(env).await?;
            }
            let backend = self.backend.clone();
            let (id, hostname, limits) = (rec.id.clone(), rec.hostname.clone(), rec.limits.clone());
            let _limits = timing::stage("limits");
            tokio::task::spawn_blocking(move || {
                if renamed {
                    backend.set_hostname(&id, &runtime, &hostname)?;
                }
                backend.set_limits(&id, &limits)
            })
            .await??;
            if renamed {
                guest
                    .write_all(
                        "/etc/hostname",
                        format!("{}\n", rec.hostname).as_bytes(),
                        Some(0o644),
                    )
                    .await?;
                guest
                    .write_all(
                        "/etc/hosts",
                        burrow_node::etc_hosts(&rec.hostname).as_bytes(),
                        Some(0o644),
                    )
                    .await?;
            }
        }
        for (path, content) in files {
            let path = if path.starts_with('/') {
                path.clone()
            } else {
                format!("/workspace/{path}")
            };
            guest.write_all(path, content.as_bytes(), None).await?;
        }
        if let Some(run) = &rec.run {
            let body = serde_json::to_vec_pretty(&run.spec).map_err(StoreError::from)?;
            guest.write_all(RUN_FILE, &body, Some(0o644)).await?;
        }
        Ok(())
    }

    /// The caller's sandbox, or `NotFound` — the same answer for another tenant's id as for an id
    /// that never existed (attack A1 in docs/threat-model.md).
    pub async fn record(&self, user: &User, id: &str) -> Result<SandboxRecord, ControlError> {
        match self.store.sandbox(id).await? {
            Some(r) if r.owner_id == user.id && r.state != SandboxState::Destroyed => Ok(r),
            _ => Err(ControlError::NotFound),
        }
    }

    pub async fn get(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        self.record(user, id).await.map(|r| self.api(&r))
    }

    pub async fn list(&self, user: &User) -> Result<Vec<Sandbox>, ControlError> {
        Ok(self
            .store
            .sandboxes_of(&user.id)
            .await?
            .iter()
            .map(|r| self.api(r))
            .collect())
    }

    /// A client for the guest agent of one of the caller's running sandboxes.
    pub async fn guest(
        &self,
        user: &User,
        id: &str,
    ) -> Result<(SandboxRecord, GuestClient), ControlError> {
        let rec = self.record(user, id).await?;
        if rec.state != SandboxState::Running {
            return Err(ControlError::NotRunning(rec.state.as_str()));
        }
        let runtime = runtime_of(&rec).ok_or(ControlError::NotRunning("starting"))?;
        self.touch(id);
        Ok((rec, GuestClient::new(runtime.guest_socket)))
    }

    /// Like [`Control::guest`], for a tool call (an exec or a file operation): counted on the
    /// sandbox's run, refused once the run has ended, and past the plan's limit the run ends with
    /// `tool_iterations_exceeded` (an ephemeral sandbox's computer is destroyed).
    pub async fn tool_call(
        &self,
        user: &User,
        id: &str,
    ) -> Result<(SandboxRecord, GuestClient), ControlError> {
        let (rec, guest) = self.guest(user, id).await?;
        let Some(run) = &rec.run else {
            return Ok((rec, guest));
        };
        if run.state == RunState::Ended {
            return Err(ControlError::RunEnded);
        }
        let n = self.store.count_tool_call(id).await?;
        let limit = rec.limits.tool_calls;
        if n > limit {
            let why = ErrorReason {
                code: codes::TOOL_ITERATIONS_EXCEEDED.into(),
                message: format!("the plan allows {limit} tool calls per run; this was call {n}"),
                limit: Some(limit.into()),
                observed: Some(n.into()),
            };
            self.end_run(&rec.id, Some(why.clone())).await?;
            return Err(ControlError::ToolCallsExceeded(why));
        }
        Ok((rec, guest))
    }

    /// Ends the sandbox's active run: by the caller (`why` None) or by a limit. An ephemeral
    /// sandbox is destroyed with it; a persistent one keeps running and its files stay.
    pub(crate) async fn end_run(
        &self,
        id: &str,
        why: Option<ErrorReason>,
    ) -> Result<(), ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let Some(rec) = self.store.sandbox(id).await? else {
            return Err(ControlError::NotFound);
        };
        if !self.close_run(&rec, why.clone(), rec.ephemeral).await? {
            return Err(ControlError::NoActiveRun);
        }
        if rec.ephemeral && rec.state != SandboxState::Destroyed {
            match &why {
                Some(w) => self.store.set_error(id, w).await?,
                None => self.store.set_state(id, SandboxState::Destroyed).await?,
            }
            self.destroy_on_host(&rec).await?;
        }
        Ok(())
    }

    /// Marks the sandbox's run ended (if one is active) and tells its callback URL. Returns
    /// whether there was an active run. The caller holds the sandbox's lock.
    async fn close_run(
        &self,
        rec: &SandboxRecord,
        why: Option<ErrorReason>,
        destroyed: bool,
    ) -> Result<bool, ControlError> {
        let Some(mut run) = rec.run.clone().filter(|r| r.state == RunState::Active) else {
            return Ok(false);
        };
        run.state = RunState::Ended;
        run.ended = why.clone();
        self.store.set_run(&rec.id, &run, false).await?;
        info!(sandbox_id = %rec.id, reason = why.as_ref().map(|w| w.code.as_str()).unwrap_or("ended"), "run ended");
        if let Some(url) = &run.spec.callback_url {
            let event = serde_json::json!({
                "event": "run.ended",
                "sandbox_id": rec.id,
                "task": run.spec.task,
                "tool_calls": rec.tool_calls.min(rec.limits.tool_calls),
                "reason": why,
                "sandbox_destroyed": destroyed,
            });
            self.callbacks.send(&rec.owner_id, url.clone(), event);
        }
        Ok(true)
    }

    /// Ends the caller's run on one of their sandboxes.
    pub async fn finish_run(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        self.record(user, id).await?;
        self.end_run(id, None).await?;
        self.store
            .sandbox(id)
            .await?
            .map(|r| self.api(&r))
            .ok_or(ControlError::NotFound)
    }

    /// Gives a sandbox a new run (its tool-call count starts again); refused while one is active.
    pub async fn start_run(
        &self,
        user: &User,
        id: &str,
        spec: RunSpec,
    ) -> Result<Sandbox, ControlError> {
        validate_run(&spec)?;
        self.check_callback(Some(&spec)).await?;
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id).await?;
        if rec
            .run
            .as_ref()
            .is_some_and(|r| r.state == RunState::Active)
        {
            return Err(ControlError::WrongState {
                state: "running a run",
                action: "start a run",
                needs: "no active run",
            });
        }
        if rec.state != SandboxState::Running {
            return Err(ControlError::NotRunning(rec.state.as_str()));
        }
        let run = RunRecord {
            spec,
            state: RunState::Active,
            ended: None,
        };
        let runtime = runtime_of(&rec).ok_or(ControlError::NotRunning("starting"))?;
        let guest = GuestClient::new(runtime.guest_socket);
        let body = serde_json::to_vec_pretty(&run.spec).map_err(StoreError::from)?;
        guest.write_all(RUN_FILE, &body, Some(0o644)).await?;
        if !run.spec.env.is_empty() {
            let mut env = rec.env.clone();
            env.extend(run.spec.env.clone());
            env.insert("HOSTNAME".into(), rec.hostname.clone());
            guest.set_env(env).await?;
        }
        self.store.set_run(id, &run, true).await?;
        rec.run = Some(run);
        rec.tool_calls = 0;
        self.touch(id);
        Ok(self.api(&rec))
    }

    /// Bytes of memory a running sandbox of the caller's uses now (its cgroup's charge).
    pub async fn memory_usage(&self, user: &User, id: &str) -> Result<Option<u64>, ControlError> {
        self.record(user, id).await?;
        Ok(self.backend.memory_usage(id))
    }

    /// Share of its CPU limit a running sandbox of the caller's used over `window` (0.0-1.0+),
    /// from two readings of its cgroup's CPU time.
    pub async fn cpu_share(
        &self,
        user: &User,
        id: &str,
        window: std::time::Duration,
    ) -> Result<Option<f64>, ControlError> {
        let rec = self.record(user, id).await?;
        let Some(before) = self.backend.cpu_usage_ns(id) else {
            return Ok(None);
        };
        let t0 = std::time::Instant::now();
        tokio::time::sleep(window).await;
        let Some(after) = self.backend.cpu_usage_ns(id) else {
            return Ok(None);
        };
        let allowed_ns = t0.elapsed().as_nanos() as f64 * f64::from(rec.limits.cpu_millis) / 1000.0;
        Ok(Some(
            after.saturating_sub(before) as f64 / allowed_ns.max(1.0),
        ))
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
    pub async fn set_timeout(
        &self,
        user: &User,
        id: &str,
        req: SetTimeout,
    ) -> Result<Sandbox, ControlError> {
        let mut rec = self.record(user, id).await?;
        validate_timeout(req.timeout_s)?;
        rec.timeout_s = req.timeout_s;
        rec.on_timeout = req.on_timeout.unwrap_or(rec.on_timeout);
        self.store
            .set_timeout(id, rec.timeout_s, rec.on_timeout)
            .await?;
        self.touch(id);
        Ok(self.api(&rec))
    }

    /// Applies idle timeouts and the plans' maximum durations; run about once a second.
    pub async fn enforce_limits(&self) -> Result<(), ControlError> {
        self.relieve_memory_pressure().await;
        for (id, intent) in self.store.intents().await? {
            if intent == Intent::Destroying {
                if let Err(e) = self.finish_destroy(&id).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "finishing a delete failed; retrying");
                }
            }
        }
        for rec in self.store.live_sandboxes().await? {
            // Warm sandboxes have no user and no clock until a create claims them.
            if rec.owner_id == POOL_OWNER
                || !matches!(rec.state, SandboxState::Running | SandboxState::Paused)
            {
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
                let owner = owner_of(&rec);
                self.hibernate_now(&owner, &rec.id).await.map(|_| ())
            } else if rec.limits.isolation == burrow_types::Isolation::Gvisor
                && rec.state == SandboxState::Running
                && !self.alive(&rec).await
            {
                self.gvisor_ended(&rec).await
            } else if let Some(t) = rec.timeout_s.filter(|_| rec.state == SandboxState::Running) {
                if self.idle_for(&rec.id).as_secs() < t {
                    continue;
                }
                info!(sandbox_id = %rec.id, timeout_s = t, action = rec.on_timeout.as_str(), "idle timeout");
                let owner = owner_of(&rec);
                match rec.on_timeout {
                    // An ephemeral sandbox does not outlive its timeout, whatever it asked for.
                    OnTimeout::Pause if !rec.ephemeral => {
                        self.pause_now(&owner, &rec.id).await.map(|_| ())
                    }
                    _ => self.destroy_now(&owner, &rec.id).await,
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

    /// Whether a sandbox's computer still runs (its PID 1, same start time).
    async fn alive(&self, rec: &SandboxRecord) -> bool {
        let Some(rt) = runtime_of(rec) else {
            return true;
        };
        let (backend, id) = (self.backend.clone(), rec.id.clone());
        tokio::task::spawn_blocking(move || backend.probe(&id, &rt))
            .await
            .map_or(true, |l| l == Liveness::Alive)
    }

    /// A gVisor sandbox's kernel ended on its own: gVisor has no OOM killer, so past its memory
    /// limit the host's ends the whole sandbox (docs/isolation.md). Its files are kept and the row
    /// says so: `hibernated` with the reason, and a resume starts it cold.
    async fn gvisor_ended(&self, rec: &SandboxRecord) -> Result<(), ControlError> {
        let lock = self.locks.get(&rec.id);
        let _guard = lock.lock().await;
        let Some(rec) = self
            .store
            .sandbox(&rec.id)
            .await?
            .filter(|r| r.state == SandboxState::Running)
        else {
            return Ok(());
        };
        if self.alive(&rec).await {
            return Ok(());
        }
        warn!(sandbox_id = %rec.id, "the gVisor sandbox's kernel ended; keeping its files");
        self.stop_on_host(&rec.id, None).await?;
        let why = reason(
            codes::SANDBOX_LOST,
            format!(
                "the sandbox's gVisor kernel ended, most likely at its memory limit of {} MiB                  (gVisor has no OOM killer of its own); its files are kept and a resume starts                  it cold",
                rec.limits.memory_mib
            ),
        );
        self.store.set_hibernated_error(&rec.id, &why).await?;
        Ok(())
    }

    /// A hard limit was hit: the row says why (`error` with the reason), the computer is destroyed.
    async fn end_with_error(&self, id: &str, reason: ErrorReason) -> Result<(), ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        // Re-read under the lock: it may have been deleted or hibernated meanwhile.
        let Some(rec) = self
            .store
            .sandbox(id)
            .await?
            .filter(|r| matches!(r.state, SandboxState::Running | SandboxState::Paused))
        else {
            return Ok(());
        };
        warn!(sandbox_id = %id, code = %reason.code, "hard limit hit; destroying the computer");
        self.close_run(&rec, Some(reason.clone()), true).await?;
        self.store.set_error(id, &reason).await?;
        self.destroy_on_host(&rec).await
    }

    async fn destroy_now(&self, user: &User, id: &str) -> Result<(), ControlError> {
        self.record(user, id).await?;
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        // Re-read under the lock: a concurrent delete may have finished meanwhile.
        let rec = self.record(user, id).await?;
        // The intent first: from here on a crash finishes the delete at the next start instead of
        // bringing the sandbox back (its run's callback may already have said it was destroyed).
        self.store.set_intent(id, Some(Intent::Destroying)).await?;
        let why = reason(
            codes::SANDBOX_DESTROYED,
            "the sandbox was destroyed (deleted, or its idle timeout fired)".into(),
        );
        self.close_run(&rec, Some(why), true).await?;
        // On failure the intent stays: a retried delete, the limits loop or the next start
        // finishes it.
        self.destroy_on_host(&rec).await?;
        self.store.set_state(id, SandboxState::Destroyed).await?;
        info!(sandbox_id = %id, "sandbox destroyed");
        Ok(())
    }

    /// Finishes a delete that failed earlier (its row still says `destroying`), unless one is
    /// in flight (the sandbox's lock is held).
    async fn finish_destroy(&self, id: &str) -> Result<(), ControlError> {
        let lock = self.locks.get(id);
        let Ok(_guard) = lock.try_lock() else {
            return Ok(());
        };
        if self.store.intents().await?.get(id) != Some(&Intent::Destroying) {
            return Ok(());
        }
        let Some(rec) = self.store.sandbox(id).await? else {
            return Ok(());
        };
        self.destroy_on_host(&rec).await?;
        self.store.set_state(id, SandboxState::Destroyed).await?;
        info!(sandbox_id = %id, "unfinished delete finished");
        Ok(())
    }

    /// Hot pause: files are synced to the sandbox's disk, then every process is frozen in place
    /// (memory, open connections and pids stay). A pause that fails leaves the sandbox running,
    /// thawed: the row and the host never disagree.
    async fn pause_now(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id).await?;
        if rec.state != SandboxState::Running {
            return Err(ControlError::WrongState {
                state: rec.state.as_str(),
                action: "pause",
                needs: "running",
            });
        }
        // Nothing on the host changes while the files are synced, so no intent yet.
        sync_files(&rec).await?;
        self.store.set_intent(id, Some(Intent::Pausing)).await?;
        let backend = self.backend.clone();
        let id2 = id.to_string();
        let paused = match tokio::task::spawn_blocking(move || backend.pause(&id2)).await {
            Ok(Ok(())) => self.store.set_paused(id).await.map_err(ControlError::from),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = paused {
            warn!(sandbox_id = %id, error = %error_chain(&e), "pause failed; thawing");
            self.thaw(id).await;
            // If even this fails (a full database) the row says `pausing`, which reconcile
            // undoes by thawing.
            let _ = self.store.set_intent(id, None).await;
            return Err(e);
        }
        self.announce_stopped(id);
        rec.state = SandboxState::Paused;
        info!(sandbox_id = %id, "sandbox paused");
        Ok(self.api(&rec))
    }

    /// Thaws whatever of the sandbox is frozen, saying so if it cannot.
    async fn thaw(&self, id: &str) {
        let backend = self.backend.clone();
        let id2 = id.to_string();
        match tokio::task::spawn_blocking(move || backend.resume(&id2)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(sandbox_id = %id, error = %error_chain(&e), "thawing failed"),
            Err(e) => warn!(sandbox_id = %id, error = %error_chain(&e), "thawing failed"),
        }
    }

    /// Resume: a paused sandbox is thawed (hot: its processes carry on where they were); a
    /// hibernated one starts cold (same id, same files, fresh processes).
    async fn resume_now(&self, user: &User, id: &str) -> Result<Sandbox, ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id).await?;
        match rec.state {
            SandboxState::Paused => {
                timed_store(self.store.set_intent(id, Some(Intent::Resuming))).await?;
                let backend = self.backend.clone();
                let id2 = id.to_string();
                let thaw = timing::stage("thaw");
                if let Err(e) = tokio::task::spawn_blocking(move || backend.resume(&id2)).await? {
                    let _ = self.store.set_intent(id, None).await;
                    return Err(e.into());
                }
                drop(thaw);
                // A crash before this line leaves `paused` + `resuming` with thawed processes:
                // reconcile finishes the resume. A store that cannot record it (a full database)
                // gets the sandbox frozen again, so the row and the host still agree.
                if let Err(e) = timed_store(self.store.set_state(id, SandboxState::Running)).await {
                    let backend = self.backend.clone();
                    let id2 = id.to_string();
                    let _ = tokio::task::spawn_blocking(move || backend.pause(&id2)).await;
                    let _ = self.store.set_intent(id, None).await;
                    return Err(e.into());
                }
            }
            SandboxState::Hibernated => rec = self.start_cold(rec).await?,
            other => {
                return Err(ControlError::WrongState {
                    state: other.as_str(),
                    action: "resume",
                    needs: "paused or hibernated",
                })
            }
        }
        rec.state = SandboxState::Running;
        rec.error = None;
        self.touch(id);
        info!(sandbox_id = %id, "sandbox resumed");
        Ok(self.api(&rec))
    }

    /// A cold start of a hibernated sandbox on its own disk. The row says `resuming` before
    /// the host is touched; a crash before it says `running` is undone by reconcile (whatever
    /// started is stopped, so a second resume can never attach the disk a second time).
    async fn start_cold(&self, mut rec: SandboxRecord) -> Result<SandboxRecord, ControlError> {
        let id = rec.id.clone();
        timed_store(self.store.set_intent(&id, Some(Intent::Resuming))).await?;
        let spec = match self.with_net(spec_of(&rec), &rec) {
            Ok(s) => s,
            Err(e) => return Err(self.resume_failed(&rec, e, None).await),
        };
        let backend = self.backend.clone();
        let timings = timing::current();
        let runtime = match tokio::task::spawn_blocking(move || {
            timing::scope_blocking(timings, || backend.start(&spec))
        })
        .await?
        {
            Ok(r) => r,
            Err(e) => return Err(self.resume_failed(&rec, e.into(), None).await),
        };
        let ready = async {
            let value = serde_json::to_value(&runtime).map_err(StoreError::from)?;
            let net = timing::stage("net-attach");
            self.attach_net(&rec)?;
            drop(net);
            timed_store(self.store.set_running(&id, &value)).await?;
            Ok::<_, ControlError>(value)
        }
        .await;
        match ready {
            Ok(value) => {
                rec.runtime = Some(value);
                rec.started_at = now_unix();
                Ok(rec)
            }
            Err(e) => Err(self.resume_failed(&rec, e, Some(runtime)).await),
        }
    }

    /// A cold start failed: whatever it started is stopped, the disk is left as it is, and the
    /// row goes back to `hibernated` with the reason, so a later resume can try again. Only a
    /// disk that is itself gone makes the sandbox `error` (`sandbox_lost`).
    async fn resume_failed(
        &self,
        rec: &SandboxRecord,
        e: ControlError,
        runtime: Option<RuntimeInfo>,
    ) -> ControlError {
        let id = rec.id.clone();
        warn!(sandbox_id = %id, error = %error_chain(&e), "cold resume failed; the files are kept");
        if let Some(rt) = runtime {
            let backend = self.backend.clone();
            let id2 = id.clone();
            match tokio::task::spawn_blocking(move || backend.stop(&id2, Some(&rt))).await {
                Ok(Ok(())) => {}
                Ok(Err(se)) => {
                    warn!(sandbox_id = %id, error = %error_chain(&se), "stopping a failed resume; reconcile retries")
                }
                Err(se) => {
                    warn!(sandbox_id = %id, error = %error_chain(&se), "stopping a failed resume; reconcile retries")
                }
            }
        }
        let _ = self.detach_net(&id);
        if let ControlError::Node(NodeError::DiskMissing(_)) = &e {
            let why = reason(
                codes::SANDBOX_LOST,
                format!("the sandbox's files are gone: {}", error_chain(&e)),
            );
            if let Err(se) = self.store.set_error(&id, &why).await {
                warn!(sandbox_id = %id, error = %error_chain(&se), "recording a lost sandbox");
            }
            return ControlError::ResumeFailed(why);
        }
        let full = is_storage_full(&e);
        let why = reason(
            if full {
                codes::INSUFFICIENT_STORAGE
            } else {
                codes::RESUME_FAILED
            },
            format!(
                "the resume failed; the sandbox's files are kept and it can be resumed once the \
                 cause is fixed: {}",
                error_chain(&e)
            ),
        );
        if let Err(se) = self.store.set_hibernated_error(&id, &why).await {
            // The row still says `hibernated` + `resuming`: reconcile stops what may run.
            warn!(sandbox_id = %id, error = %error_chain(&se), "recording a failed resume");
        }
        if full {
            ControlError::InsufficientStorage(why)
        } else {
            ControlError::ResumeFailed(why)
        }
    }

    /// Hibernate: files are synced and kept, every process ends. A later resume starts cold.
    pub(crate) async fn hibernate_now(
        &self,
        user: &User,
        id: &str,
    ) -> Result<Sandbox, ControlError> {
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id).await?;
        match rec.state {
            // A sync that fails (a full host disk) does not stop the hibernation: ending the
            // processes loses nothing more, and the unmount writes back what it can.
            SandboxState::Running => {
                if let Err(e) = sync_files(&rec).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "syncing before hibernating failed");
                }
            }
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
        // From here on a crash (or a failed stop) is finished by reconcile or a retry: stop is
        // idempotent.
        self.store.set_intent(id, Some(Intent::Hibernating)).await?;
        self.announce_stopped(id);
        let backend = self.backend.clone();
        let (id2, runtime) = (id.to_string(), runtime_of(&rec));
        tokio::task::spawn_blocking(move || backend.stop(&id2, runtime.as_ref())).await??;
        self.detach_net(id)?;
        self.store.set_hibernated(id).await?;
        rec.state = SandboxState::Hibernated;
        rec.runtime = None;
        info!(sandbox_id = %id, "sandbox hibernated");
        Ok(self.api(&rec))
    }

    pub(crate) async fn destroy_on_host(&self, rec: &SandboxRecord) -> Result<(), ControlError> {
        self.announce_stopped(&rec.id);
        let backend = self.backend.clone();
        let id = rec.id.clone();
        let runtime = runtime_of(rec);
        tokio::task::spawn_blocking(move || backend.destroy(&id, runtime.as_ref())).await??;
        self.detach_net(&rec.id)?;
        Ok(())
    }

    async fn stop_on_host(
        &self,
        id: &str,
        runtime: Option<RuntimeInfo>,
    ) -> Result<(), ControlError> {
        self.announce_stopped(id);
        let backend = self.backend.clone();
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || backend.stop(&id2, runtime.as_ref())).await??;
        self.detach_net(id)?;
        Ok(())
    }

    /// Makes the store and the host agree after a start (docs/architecture.md, crash safety). Every
    /// row is checked against the host, whatever its state, and a transition a crash cut short
    /// (the row's intent) is finished or undone; anything on the host without a live row is
    /// removed. A sandbox whose files are kept is never cleaned because of an error here: its
    /// directory stays and the next start tries again. `docs/architecture.md` has the table.
    pub async fn reconcile(&self) -> Result<ReconcileReport, ControlError> {
        let mut report = ReconcileReport::default();
        let mut keep = HashSet::new();
        let intents = self.store.intents().await?;
        let pools: HashSet<String> = self
            .store
            .pools()
            .await?
            .into_iter()
            .map(|p| p.name)
            .collect();
        let backend = self.backend.clone();
        let attached: HashSet<String> = tokio::task::spawn_blocking(move || backend.disks_in_use())
            .await?
            .into_iter()
            .collect();
        for rec in self.store.live_sandboxes().await? {
            let intent = intents.get(&rec.id).copied();
            let disk_attached = attached.contains(&rec.id);
            match self
                .reconcile_one(&rec, intent, disk_attached, &pools, &mut report)
                .await
            {
                Ok(true) => {
                    keep.insert(rec.id.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(sandbox_id = %rec.id, state = rec.state.as_str(), intent = intent.map(Intent::as_str), error = %error_chain(&e), "reconciling failed; its files are kept and the next start retries");
                    keep.insert(rec.id.clone());
                }
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
        self.install_firewall().await?;
        Ok(report)
    }

    /// One row against the host. Returns whether the sandbox's directory stays.
    async fn reconcile_one(
        &self,
        rec: &SandboxRecord,
        intent: Option<Intent>,
        disk_attached: bool,
        pools: &HashSet<String>,
        report: &mut ReconcileReport,
    ) -> Result<bool, ControlError> {
        let id = rec.id.clone();
        let warm = rec.owner_id == POOL_OWNER;
        let orphan = warm
            && rec.state != SandboxState::Starting
            && !rec.pool.as_ref().is_some_and(|p| pools.contains(p));
        if intent == Some(Intent::Destroying) || orphan {
            // A delete the crash cut short is finished; a warm sandbox whose pool no longer
            // exists belongs to no one and goes too.
            self.destroy_on_host(rec).await?;
            self.store.set_state(&id, SandboxState::Destroyed).await?;
            if orphan {
                report.orphans.push(id);
            } else {
                report.finished.push(id);
            }
            return Ok(false);
        }
        match rec.state {
            SandboxState::Starting => {
                // A new (or just claimed) sandbox: nobody's files yet. The row says what
                // happened before the host is touched, so a failed clean-up is retried.
                self.store
                    .set_error(
                        &id,
                        &reason(
                            codes::CREATE_INTERRUPTED,
                            "the server stopped while the sandbox was being created".into(),
                        ),
                    )
                    .await?;
                report.interrupted.push(id.clone());
                if let Err(e) = self.destroy_on_host(rec).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "clean-up failed; retried at the next start");
                }
                Ok(false)
            }
            SandboxState::Hibernated => {
                // Files and no processes. A cold resume the crash cut short may have started
                // processes on the disk before their pid was recorded: they are stopped (and
                // the disk detached) rather than adopted blind.
                let backend = self.backend.clone();
                let id2 = id.clone();
                let active = tokio::task::spawn_blocking(move || backend.active(&id2)).await?;
                if active || disk_attached || intent.is_some() {
                    self.stop_on_host(&id, None).await?;
                    self.store.set_hibernated(&id).await?;
                    report.rolled_back.push(id);
                }
                Ok(true)
            }
            SandboxState::Running | SandboxState::Paused => {
                if intent == Some(Intent::Hibernating) {
                    // Asked for and begun: finished.
                    self.stop_on_host(&id, runtime_of(rec)).await?;
                    self.store.set_hibernated(&id).await?;
                    report.hibernated.push(id);
                    return Ok(true);
                }
                // An interrupted pause is undone (the row still says running) and an
                // interrupted hot resume is finished (the user asked to run): either way the
                // processes run. A paused row without an intent stays frozen.
                let want_frozen = rec.state == SandboxState::Paused && intent.is_none();
                if self.adopt(rec, want_frozen).await? {
                    let settled = if want_frozen {
                        SandboxState::Paused
                    } else {
                        SandboxState::Running
                    };
                    if intent.is_some() || settled != rec.state {
                        self.store.set_state(&id, settled).await?;
                    }
                    report.adopted.push(id);
                    return Ok(true);
                }
                if warm || rec.ephemeral {
                    // No one's files: a lost warm or ephemeral sandbox is simply gone.
                    self.store.set_state(&id, SandboxState::Destroyed).await?;
                    report.lost.push(id);
                    return Ok(false);
                }
                // The processes are gone (a host reboot, a crash) but the disk is not: the
                // sandbox comes back cold on the next resume, its files kept. If what is left
                // cannot be stopped, the files still stay and the row says why.
                match self.stop_on_host(&id, runtime_of(rec)).await {
                    Ok(()) => self.store.set_hibernated(&id).await?,
                    Err(e) => {
                        self.store
                            .set_hibernated_error(
                                &id,
                                &reason(
                                    codes::SANDBOX_LOST,
                                    format!(
                                "the sandbox's processes ended and cleaning up after them failed \
                                 ({}); its files are kept",
                                error_chain(&e)
                            ),
                                ),
                            )
                            .await?
                    }
                }
                report.hibernated.push(id);
                Ok(true)
            }
            SandboxState::Error | SandboxState::Destroyed => Ok(false),
        }
    }

    /// Whether a running or paused sandbox's computer is still there (its PID 1, same start
    /// time), after freezing or thawing it as `frozen` says; a running one must also answer.
    async fn adopt(&self, rec: &SandboxRecord, frozen: bool) -> Result<bool, ControlError> {
        let Some(runtime) = runtime_of(rec) else {
            return Ok(false);
        };
        let backend = self.backend.clone();
        let (id, rt) = (rec.id.clone(), runtime.clone());
        let alive = tokio::task::spawn_blocking(move || backend.probe(&id, &rt)).await?;
        if alive != Liveness::Alive {
            return Ok(false);
        }
        let backend = self.backend.clone();
        let id = rec.id.clone();
        tokio::task::spawn_blocking(move || match backend.frozen(&id) {
            Some(now) if now == frozen => Ok(()),
            None if !frozen => Ok(()),
            _ if frozen => backend.pause(&id),
            _ => backend.resume(&id),
        })
        .await??;
        // A paused sandbox's guest is frozen and cannot answer; its live PID 1 is proof enough.
        Ok(frozen || GuestClient::new(runtime.guest_socket).ping().await.is_ok())
    }
}

/// One create in flight, for as long as this lives; the last one to end wakes the replenisher.
struct CreateInFlight<'a>(&'a Control);

impl<'a> CreateInFlight<'a> {
    fn start(control: &'a Control) -> Self {
        control
            .creates_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CreateInFlight(control)
    }
}

impl Drop for CreateInFlight<'_> {
    fn drop(&mut self) {
        let before = self
            .0
            .creates_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if before == 1 {
            self.0.pool_wake.notify_one();
        }
    }
}

/// Flushes the sandbox's disk (and only what it can see) to the image file, from inside:
/// `syncfs` of the root and `/workspace`, which, unlike sync(2), reports a write-back that failed
/// (a full host disk under a sparse image): the sandbox's files are not saved, and the caller
/// says so rather than claim they were.
async fn sync_files(rec: &SandboxRecord) -> Result<(), ControlError> {
    let runtime = runtime_of(rec).ok_or(ControlError::NotRunning("starting"))?;
    let sync = burrow_proto::ExecSpec {
        argv: vec![
            "/usr/bin/sync".into(),
            "-f".into(),
            "/".into(),
            "/workspace".into(),
        ],
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    let out = GuestClient::new(runtime.guest_socket)
        .exec_buffered(sync, None, 4096)
        .await?;
    if out.exit_code == Some(0) {
        return Ok(());
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let detail = if out.timed_out {
        "sync did not finish in 30 s".to_string()
    } else {
        detail
    };
    Err(ControlError::InsufficientStorage(ErrorReason {
        code: codes::INSUFFICIENT_STORAGE.into(),
        message: format!(
            "the sandbox's files could not be saved to its disk ({detail}); the host's data \
             filesystem may be full. Free space, then hibernate and resume the sandbox to remount \
             its disk"
        ),
        limit: None,
        observed: None,
    }))
}

/// Whether an error comes down to a full data filesystem (or database).
pub fn is_storage_full(e: &ControlError) -> bool {
    match e {
        ControlError::InsufficientStorage(_) => true,
        ControlError::Node(NodeError::NoSpace(_)) => true,
        ControlError::Store(s) => s.is_disk_full(),
        _ => false,
    }
}

#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub adopted: Vec<String>,
    /// Their processes were gone (or a hibernation was cut short); their files are kept and a
    /// resume starts them cold.
    pub hibernated: Vec<String>,
    pub lost: Vec<String>,
    pub interrupted: Vec<String>,
    /// Deletes a crash cut short, finished.
    pub finished: Vec<String>,
    /// Hibernated sandboxes with something running or attached (a cold resume cut short), stopped.
    pub rolled_back: Vec<String>,
    /// Warm sandboxes of pools that no longer exist, destroyed.
    pub orphans: Vec<String>,
    /// Host leftovers with no live row.
    pub cleaned: Vec<String>,
}

/// A store write on a timed path: its time counts to the request's `store` stage.
async fn timed_store<T>(write: impl std::future::Future<Output = T>) -> T {
    let _stage = timing::stage("store");
    write.await
}

/// The owner of a sandbox, for actions the server takes on its own (timeouts, the hot window,
/// memory pressure): only the id matters to the checks those actions go through.
pub fn owner_of(rec: &SandboxRecord) -> User {
    User {
        id: rec.owner_id.clone(),
        name: String::new(),
        plan: String::new(),
        is_admin: false,
    }
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
        ephemeral: rec.ephemeral,
        isolation: rec.limits.isolation,
        platform: None,
        resume_from: None,
        run: rec.run.as_ref().map(|r| RunStatus {
            task: r.spec.task.clone(),
            callback_url: r.spec.callback_url.clone(),
            tool_calls: rec.tool_calls.min(rec.limits.tool_calls),
            tool_call_limit: rec.limits.tool_calls,
            state: r.state,
            ended: r.ended.clone(),
        }),
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

/// An idle timeout is 1 s to a year (`None`: no timeout).
pub fn validate_timeout(t: Option<u64>) -> Result<(), ControlError> {
    match t {
        Some(t) if !(1..=MAX_TIMEOUT_S).contains(&t) => Err(ControlError::OutOfRange {
            field: "timeout_s",
            min: 1,
            max: MAX_TIMEOUT_S,
        }),
        _ => Ok(()),
    }
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

fn validate_files(files: &BTreeMap<String, String>) -> Result<(), ControlError> {
    if files.len() > MAX_FILES {
        return Err(ControlError::BadRequest(format!(
            "files: at most {MAX_FILES} files at create (upload more with PUT .../files)"
        )));
    }
    if let Some(bad) = files
        .keys()
        .find(|p| p.is_empty() || p.contains('\0') || p.chars().count() > PATH_CHARS)
    {
        return Err(ControlError::BadRequest(format!(
            "files: path {bad:?} is empty, over {PATH_CHARS} characters or contains NUL"
        )));
    }
    if let Some((p, _)) = files.iter().find(|(_, v)| v.chars().count() > FILE_CHARS) {
        return Err(ControlError::BadRequest(format!(
            "files: {p:?} is over {FILE_CHARS} characters (upload it with PUT .../files)"
        )));
    }
    Ok(())
}

fn validate_run(run: &RunSpec) -> Result<(), ControlError> {
    validate_map("run.env", &run.env, MAX_ENV_ENTRIES, true)?;
    let task = run.task.chars().count();
    if task > TASK_CHARS {
        return Err(ControlError::BadRequest(format!(
            "run.task is {task} characters, at most {TASK_CHARS} allowed"
        )));
    }
    if run.memory_tokens.len() > MAX_MEMORY_TOKENS
        || run
            .memory_tokens
            .iter()
            .any(|t| t.chars().count() > MEMORY_TOKEN_CHARS)
    {
        return Err(ControlError::BadRequest(format!(
            "run.memory_tokens: at most {MAX_MEMORY_TOKENS} tokens of {MEMORY_TOKEN_CHARS} characters each"
        )));
    }
    if let Some(url) = &run.callback_url {
        crate::callback::parse_url(url).map_err(ControlError::BadRequest)?;
    }
    Ok(())
}

pub fn validate_map(
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
        if k.is_empty()
            || k.chars().count() > KEY_CHARS
            || v.chars().count() > VALUE_CHARS
            || k.contains('\0')
            || v.contains('\0')
        {
            return Err(ControlError::BadRequest(format!(
                "{what} entry {k:?} is empty, too long (names up to {KEY_CHARS} characters, values up to {VALUE_CHARS}) or contains NUL"
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
    fn create_files_and_runs_are_bounded() {
        let one = BTreeMap::from([("notes.md".to_string(), "hi".to_string())]);
        assert!(validate_files(&one).is_ok());
        let many: BTreeMap<_, _> = (0..=MAX_FILES)
            .map(|i| (format!("f{i}"), String::new()))
            .collect();
        assert!(validate_files(&many).is_err());
        let big = BTreeMap::from([("f".to_string(), "x".repeat(FILE_CHARS + 1))]);
        assert!(validate_files(&big).is_err());
        for bad in ["", "a\0b"] {
            let m = BTreeMap::from([(bad.to_string(), String::new())]);
            assert!(validate_files(&m).is_err(), "{bad:?} accepted");
        }

        assert!(validate_run(&RunSpec::default()).is_ok());
        let long_task = RunSpec {
            task: "x".repeat(TASK_CHARS + 1),
            ..Default::default()
        };
        assert!(validate_run(&long_task).is_err());
        let tokens = RunSpec {
            memory_tokens: vec![String::new(); MAX_MEMORY_TOKENS + 1],
            ..Default::default()
        };
        assert!(validate_run(&tokens).is_err());
        let bad_env = RunSpec {
            env: BTreeMap::from([("A=B".to_string(), String::new())]),
            ..Default::default()
        };
        assert!(validate_run(&bad_env).is_err());
        let ftp = RunSpec {
            callback_url: Some("ftp://hooks.test/x".into()),
            ..Default::default()
        };
        assert!(validate_run(&ftp).is_err());
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
