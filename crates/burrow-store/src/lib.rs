//! The store's contract: durable state (users, API keys, sandbox records, pools, idempotency keys
//! and quotas) as types and one trait, [`Store`], that each database implements
//! (`burrow-store-sqlite` today; PostgreSQL would be a second). Nothing here knows SQL.
//!
//! Every sandbox gets its row *before* anything is built on the host (docs/architecture.md, crash
//! safety), and each state change is written before the server answers. The trait is synchronous:
//! an implementation bounds every wait (a lock another process holds, a free connection) but
//! still blocks its thread for that long, so async code never calls it directly. It goes through
//! [`AsyncStore`], which runs each call on the runtime's blocking pool: a locked database then
//! holds blocking threads, never the workers that answer health checks and reads
//! (docs/adr/0055).

use std::collections::BTreeMap;

use burrow_types::{codes, ErrorReason, Limits, OnTimeout, Quota, RunSpec, RunState, SandboxState};

mod adapter;

pub use adapter::AsyncStore;

/// The cause of a database error, whatever the database.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database")]
    Database(#[source] Cause),
    /// Another process holds a lock on the database longer than a write may wait.
    #[error("the database is locked by another process")]
    Busy(#[source] Cause),
    /// Every connection stayed in use longer than a caller may wait.
    #[error("no database connection was free in time")]
    Congested,
    /// The database cannot be written: a read-only file or mount, a permission, an I/O error.
    #[error("the database cannot be written")]
    Unwritable(#[source] Cause),
    /// The filesystem holding the database is full.
    #[error("the database's filesystem is full")]
    Full(#[source] Cause),
    #[error("stored json is malformed")]
    Json(#[from] serde_json::Error),
    #[error("stored value {0:?} is not a sandbox state")]
    BadState(String),
    #[error("no free uid range is left")]
    NoFreeSlot,
    #[error("preparing the database file {path}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runtime shut down before the call ran (only while the server stops).
    #[error("the store call was cancelled: the server is stopping")]
    Cancelled,
}

impl StoreError {
    /// The database could not grow: its filesystem is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Full(_))
    }

    /// The database is busy (locked by another process, or every connection in use): the same
    /// call is likely to work in a moment.
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Busy(_) | StoreError::Congested)
    }

    /// The stable API code for an error that means "the database cannot serve this now" (as
    /// opposed to a bug): `database_busy`, `database_unavailable` or `no_space`.
    pub fn unavailable_code(&self) -> Option<&'static str> {
        match self {
            StoreError::Busy(_) | StoreError::Congested => Some(codes::DATABASE_BUSY),
            StoreError::Unwritable(_) | StoreError::File { .. } | StoreError::Cancelled => {
                Some(codes::DATABASE_UNAVAILABLE)
            }
            StoreError::Full(_) => Some(codes::NO_SPACE),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub is_admin: bool,
}

/// A sandbox row. `runtime` is the backend's opaque JSON (pid, start time, socket), written once the
/// computer exists.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub owner_id: String,
    pub state: SandboxState,
    pub image: String,
    pub plan: String,
    pub hostname: String,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub uid_slot: u32,
    pub runtime: Option<serde_json::Value>,
    pub error: Option<ErrorReason>,
    pub warm_hit: bool,
    pub created_at: String,
    pub timeout_s: Option<u64>,
    pub on_timeout: OnTimeout,
    /// Unix seconds when the computer last started (create or cold resume).
    pub started_at: i64,
    /// Unix seconds when it was last paused.
    pub paused_at: i64,
    /// The warm pool that built this sandbox (it is still warm while `owner_id` is [`POOL_OWNER`]).
    pub pool: Option<String>,
    pub ephemeral: bool,
    pub run: Option<RunRecord>,
    /// Tool calls counted on the current run.
    pub tool_calls: u32,
    /// Network settings (egress policy, public ports) as the control layer's JSON; `None` when
    /// the sandbox has no network.
    pub network: Option<serde_json::Value>,
}

/// A lifecycle transition in flight. The row keeps its settled `state` (what the sandbox was
/// before the transition) and names the transition in `intent` before the host is touched; the
/// write that settles the new state clears it. A row with an intent after a restart is a
/// transition a crash interrupted, for reconcile to finish or undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Intent {
    Pausing,
    Resuming,
    Hibernating,
    Destroying,
}

impl Intent {
    pub fn as_str(self) -> &'static str {
        match self {
            Intent::Pausing => "pausing",
            Intent::Resuming => "resuming",
            Intent::Hibernating => "hibernating",
            Intent::Destroying => "destroying",
        }
    }

    pub fn parse(s: &str) -> Option<Intent> {
        Some(match s {
            "pausing" => Intent::Pausing,
            "resuming" => Intent::Resuming,
            "hibernating" => Intent::Hibernating,
            "destroying" => Intent::Destroying,
            _ => return None,
        })
    }
}

/// The id of the internal user that owns warm sandboxes until they are claimed. It has no API key.
pub const POOL_OWNER: &str = "pool";

/// A run as stored: what was asked, and whether it still goes on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub spec: RunSpec,
    pub state: RunState,
    #[serde(default)]
    pub ended: Option<ErrorReason>,
}

/// What a create gives a warm sandbox when it claims it.
#[derive(Debug, Clone)]
pub struct Claim {
    pub owner_id: String,
    pub plan: String,
    /// None keeps the sandbox's id as its hostname.
    pub hostname: Option<String>,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub timeout_s: Option<u64>,
    pub on_timeout: OnTimeout,
    pub ephemeral: bool,
    pub run: Option<RunRecord>,
}

/// A pool spec as stored, with its counters.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolRecord {
    pub name: String,
    pub image: String,
    pub plan: String,
    pub size: u32,
    pub claims: u64,
    pub cold_fallbacks: u64,
}

/// Live numbers of one pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolCounts {
    pub ready: u32,
    pub starting: u32,
    pub hits_24h: u64,
    pub misses_24h: u64,
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL_S: i64 = 24 * 3600;

/// The outcome of presenting an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use: this request now holds the key and makes the sandbox.
    Reserved,
    /// The key was used before (and has not expired).
    Seen {
        /// The earlier request had the same fingerprint.
        same_request: bool,
        sandbox_id: String,
        /// The earlier request finished; otherwise it is still being served.
        done: bool,
    },
}

/// What one user's live sandboxes were promised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub sandboxes: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// What the store can do now, for `/v1/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// Writes can go through now.
    pub writable: bool,
    /// Why not: a stable code (`database_busy`, `database_unavailable`, `no_space`) and a message.
    pub problem: Option<(&'static str, String)>,
}

impl StoreHealth {
    pub fn ok() -> StoreHealth {
        StoreHealth {
            writable: true,
            problem: None,
        }
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Durable state, as each database keeps it. Every method returns within about a second: a
/// database another process holds locked, or one that cannot be written, is an error
/// ([`StoreError::unavailable_code`]) rather than a wait. Reads never queue behind writes.
///
/// Synchronous on purpose (docs/adr/0055): the queries are short, a database driver blocks
/// anyway, and one adapter ([`AsyncStore`]) moves every call off the async workers.
pub trait Store: Send + Sync + 'static {
    /// Whether writes can go through now, and if not why (for `/v1/health`). Never waits for a
    /// lock.
    fn health(&self) -> StoreHealth;

    // ---- users and keys ----
    fn create_user(
        &self,
        id: &str,
        name: &str,
        plan: &str,
        is_admin: bool,
    ) -> Result<User, StoreError>;
    fn has_api_keys(&self, user_id: &str) -> Result<bool, StoreError>;
    fn user_count(&self) -> Result<u64, StoreError>;
    fn user_by_name(&self, name: &str) -> Result<Option<User>, StoreError>;
    /// Gives the user named `name` another plan; `None` if there is no such user.
    fn set_user_plan(&self, name: &str, plan: &str) -> Result<Option<User>, StoreError>;
    /// Stores the hash of a key; the key itself is never stored.
    fn add_api_key(
        &self,
        id: &str,
        user_id: &str,
        key_hash: &str,
        prefix: &str,
    ) -> Result<(), StoreError>;
    fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, StoreError>;

    // ---- sandboxes ----
    /// Inserts a sandbox in `starting` with the lowest uid slot no live sandbox holds (the choice
    /// and the insert are one transaction: two creates never get the same range).
    fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<u32, StoreError>;
    fn set_running(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError>;
    fn set_built(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError>;
    fn set_timeout(
        &self,
        id: &str,
        timeout_s: Option<u64>,
        on_timeout: OnTimeout,
    ) -> Result<(), StoreError>;
    fn set_network(&self, id: &str, network: &serde_json::Value) -> Result<(), StoreError>;
    fn set_paused(&self, id: &str) -> Result<(), StoreError>;
    fn set_state(&self, id: &str, state: SandboxState) -> Result<(), StoreError>;
    fn set_hibernated(&self, id: &str) -> Result<(), StoreError>;
    fn set_hibernated_error(&self, id: &str, reason: &ErrorReason) -> Result<(), StoreError>;
    fn set_intent(&self, id: &str, intent: Option<Intent>) -> Result<(), StoreError>;
    fn intents(&self) -> Result<BTreeMap<String, Intent>, StoreError>;
    fn promised_disk_mib(&self) -> Result<u64, StoreError>;
    fn set_error(&self, id: &str, reason: &ErrorReason) -> Result<(), StoreError>;
    fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError>;
    fn sandboxes_of(&self, owner_id: &str) -> Result<Vec<SandboxRecord>, StoreError>;
    fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError>;
    fn count_tool_call(&self, id: &str) -> Result<u32, StoreError>;
    fn set_run(&self, id: &str, run: &RunRecord, reset_count: bool) -> Result<(), StoreError>;
    /// Users' sandboxes (not warm ones) by state, destroyed ones left out.
    fn state_counts(&self) -> Result<BTreeMap<String, u64>, StoreError>;

    // ---- pools ----
    fn upsert_pool(&self, name: &str, image: &str, plan: &str, size: u32)
        -> Result<(), StoreError>;
    fn delete_pool(&self, name: &str) -> Result<bool, StoreError>;
    fn pools(&self) -> Result<Vec<PoolRecord>, StoreError>;
    fn pool_counts(&self) -> Result<BTreeMap<String, PoolCounts>, StoreError>;
    /// Hands the oldest ready warm sandbox of any of `pools` to a create, in one statement: two
    /// concurrent claims never get the same sandbox.
    fn claim_warm(
        &self,
        pools: &[String],
        claim: &Claim,
    ) -> Result<Option<SandboxRecord>, StoreError>;
    fn record_pool_use(&self, pool: &str, hit: bool) -> Result<(), StoreError>;
    fn warm_sandboxes(&self, pool: &str) -> Result<Vec<SandboxRecord>, StoreError>;
    fn warm_sandboxes_outside(&self, pools: &[String]) -> Result<Vec<SandboxRecord>, StoreError>;

    // ---- admission ----
    fn claim_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        fingerprint: &str,
        sandbox_id: &str,
    ) -> Result<IdempotencyClaim, StoreError>;
    fn finish_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        sandbox_id: &str,
    ) -> Result<(), StoreError>;
    fn release_idempotency_key(&self, user_id: &str, key: &str) -> Result<(), StoreError>;
    /// `(fingerprint, sandbox_id, done)` of a key still remembered.
    fn idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<(String, String, bool)>, StoreError>;
    /// At start, before anything is served: keys whose create was cut short either name a
    /// sandbox row (the key answers with it) or none (forgotten). Returns how many of each.
    fn settle_idempotency_keys(&self) -> Result<(usize, usize), StoreError>;
    fn usage_of(&self, owner_id: &str, except: &[String]) -> Result<Usage, StoreError>;
    fn promised_pids(&self, except: &[String]) -> Result<u64, StoreError>;
    fn user_quota(&self, user_id: &str) -> Result<Option<Quota>, StoreError>;
    fn set_user_quota(&self, user_id: &str, quota: Option<&Quota>) -> Result<(), StoreError>;
}
