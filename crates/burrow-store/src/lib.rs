//! Durable state: users, API keys and sandbox records, in an embedded SQLite database.
//!
//! Every sandbox gets its row *before* anything is built on the host (DESIGN.md §3, crash safety), and
//! each state change is written before the server answers. Queries are short and local, so the
//! connection sits behind a mutex and callers use it synchronously.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use burrow_types::{ErrorReason, Limits, OnTimeout, SandboxState};
use rusqlite::{params, Connection, OptionalExtension};

mod migrations;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored json is malformed")]
    Json(#[from] serde_json::Error),
    #[error("stored value {0:?} is not a sandbox state")]
    BadState(String),
    #[error("no free uid range is left")]
    NoFreeSlot,
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
    /// Network settings (egress policy, public ports) as the control layer's JSON; `None` when
    /// the sandbox has no network.
    pub network: Option<serde_json::Value>,
}

pub struct Store {
    conn: Mutex<Connection>,
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

const SANDBOX_COLUMNS: &str = "id, owner_id, state, image, plan, hostname, limits, env, metadata, \
                               uid_slot, runtime, error, warm_hit, created_at, timeout_s, on_timeout, \
                               started_at, paused_at, network";

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        // WAL keeps readers off the writer's lock; synchronous=FULL because a state change the
        // server has acknowledged must survive a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::apply(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (each statement is atomic),
        // so a poisoned mutex is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- users and keys ----

    pub fn create_user(
        &self,
        id: &str,
        name: &str,
        plan: &str,
        is_admin: bool,
    ) -> Result<User, StoreError> {
        self.conn().execute(
            "INSERT INTO users (id, name, plan, is_admin, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, name, plan, is_admin, now_rfc3339()],
        )?;
        Ok(User {
            id: id.into(),
            name: name.into(),
            plan: plan.into(),
            is_admin,
        })
    }

    pub fn has_api_keys(&self, user_id: &str) -> Result<bool, StoreError> {
        let n: u64 = self.conn().query_row(
            "SELECT COUNT(*) FROM api_keys WHERE user_id = ?1 AND revoked_at IS NULL",
            [user_id],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    pub fn user_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
    }

    pub fn user_by_name(&self, name: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, plan, is_admin FROM users WHERE name = ?1",
                [name],
                user_from_row,
            )
            .optional()?)
    }

    /// Stores the hash of a key; the key itself is never stored.
    pub fn add_api_key(
        &self,
        id: &str,
        user_id: &str,
        key_hash: &str,
        prefix: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO api_keys (id, user_id, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, user_id, key_hash, prefix, now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT u.id, u.name, u.plan, u.is_admin FROM api_keys k JOIN users u ON u.id = k.user_id \
                 WHERE k.hash = ?1 AND k.revoked_at IS NULL",
                [key_hash],
                user_from_row,
            )
            .optional()?)
    }

    // ---- sandboxes ----

    /// Inserts a sandbox in `starting` with the lowest uid slot no live sandbox holds. The slot
    /// choice and the insert share one transaction, so two creates never get the same range.
    pub fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let used: BTreeSet<u32> = {
            let mut stmt =
                tx.prepare("SELECT uid_slot FROM sandboxes WHERE state != 'destroyed'")?;
            let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let slot = (0..u32::from(u16::MAX))
            .find(|s| !used.contains(s))
            .ok_or(StoreError::NoFreeSlot)?;
        tx.execute(
            &format!(
                "INSERT INTO sandboxes ({SANDBOX_COLUMNS}, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?14)"
            ),
            params![
                rec.id,
                rec.owner_id,
                SandboxState::Starting.as_str(),
                rec.image,
                rec.plan,
                rec.hostname,
                serde_json::to_string(&rec.limits)?,
                serde_json::to_string(&rec.env)?,
                serde_json::to_string(&rec.metadata)?,
                slot,
                rec.runtime.as_ref().map(|v| v.to_string()),
                rec.error.as_ref().map(serde_json::to_string).transpose()?,
                rec.warm_hit,
                rec.created_at,
                rec.timeout_s,
                rec.on_timeout.as_str(),
                rec.started_at,
                rec.paused_at,
                rec.network.as_ref().map(|v| v.to_string()),
            ],
        )?;
        tx.commit()?;
        Ok(slot)
    }

    /// The computer runs (after a create or a cold resume): its maximum duration counts from now.
    pub fn set_running(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'running', runtime = ?2, updated_at = ?3, started_at = ?4 WHERE id = ?1",
            params![id, runtime.to_string(), now_rfc3339(), now_unix()],
        )?;
        Ok(())
    }

    pub fn set_timeout(
        &self,
        id: &str,
        timeout_s: Option<u64>,
        on_timeout: OnTimeout,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET timeout_s = ?2, on_timeout = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, timeout_s, on_timeout.as_str(), now_rfc3339()],
        )?;
        Ok(())
    }

    /// The sandbox's network settings changed (egress policy, public ports).
    pub fn set_network(&self, id: &str, network: &serde_json::Value) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET network = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, network.to_string(), now_rfc3339()],
        )?;
        Ok(())
    }

    /// Frozen now: the hot window counts from here.
    pub fn set_paused(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'paused', paused_at = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, now_unix(), now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn set_state(&self, id: &str, state: SandboxState) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, state.as_str(), now_rfc3339()],
        )?;
        Ok(())
    }

    /// A hibernated sandbox has files but no processes, so no runtime to find.
    pub fn set_hibernated(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'hibernated', runtime = NULL, updated_at = ?2 WHERE id = ?1",
            params![id, now_rfc3339()],
        )?;
        Ok(())
    }

    /// Moves a sandbox to `error`, keeping the reason. Its computer is gone or going.
    pub fn set_error(&self, id: &str, reason: &ErrorReason) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'error', error = ?2, runtime = NULL, updated_at = ?3 WHERE id = ?1",
            params![id, serde_json::to_string(reason)?, now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
                raw_sandbox,
            )
            .optional()?;
        row.map(RawSandbox::decode).transpose()
    }

    /// Sandboxes of one owner that are not destroyed, oldest first.
    pub fn sandboxes_of(&self, owner_id: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        self.query_sandboxes(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = ?1 AND state != 'destroyed' \
                 ORDER BY created_at, id"
            ),
            params![owner_id],
        )
    }

    /// Every sandbox that may have something on the host.
    pub fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.query_sandboxes(
            &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state != 'destroyed' ORDER BY created_at, id"),
            [],
        )
    }

    fn query_sandboxes(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql)?;
        let raws = stmt
            .query_map(params, raw_sandbox)?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(RawSandbox::decode).collect()
    }
}

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        plan: r.get(2)?,
        is_admin: r.get(3)?,
    })
}

/// A row as SQLite gives it, before the JSON columns are parsed (rusqlite's row closure cannot
/// return our error type).
struct RawSandbox {
    id: String,
    owner_id: String,
    state: String,
    image: String,
    plan: String,
    hostname: String,
    limits: String,
    env: String,
    metadata: String,
    uid_slot: u32,
    runtime: Option<String>,
    error: Option<String>,
    warm_hit: bool,
    created_at: String,
    timeout_s: Option<u64>,
    on_timeout: String,
    started_at: i64,
    paused_at: i64,
    network: Option<String>,
}

fn raw_sandbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawSandbox> {
    Ok(RawSandbox {
        id: r.get(0)?,
        owner_id: r.get(1)?,
        state: r.get(2)?,
        image: r.get(3)?,
        plan: r.get(4)?,
        hostname: r.get(5)?,
        limits: r.get(6)?,
        env: r.get(7)?,
        metadata: r.get(8)?,
        uid_slot: r.get(9)?,
        runtime: r.get(10)?,
        error: r.get(11)?,
        warm_hit: r.get(12)?,
        created_at: r.get(13)?,
        timeout_s: r.get(14)?,
        on_timeout: r.get(15)?,
        started_at: r.get(16)?,
        paused_at: r.get(17)?,
        network: r.get(18)?,
    })
}

impl RawSandbox {
    fn decode(self) -> Result<SandboxRecord, StoreError> {
        Ok(SandboxRecord {
            state: SandboxState::parse(&self.state)
                .ok_or_else(|| StoreError::BadState(self.state.clone()))?,
            limits: serde_json::from_str(&self.limits)?,
            env: serde_json::from_str(&self.env)?,
            metadata: serde_json::from_str(&self.metadata)?,
            runtime: self
                .runtime
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?,
            error: self
                .error
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?,
            id: self.id,
            owner_id: self.owner_id,
            image: self.image,
            plan: self.plan,
            hostname: self.hostname,
            uid_slot: self.uid_slot,
            warm_hit: self.warm_hit,
            created_at: self.created_at,
            timeout_s: self.timeout_s,
            on_timeout: OnTimeout::parse(&self.on_timeout).unwrap_or_default(),
            started_at: self.started_at,
            paused_at: self.paused_at,
            network: self
                .network
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests;
