//! The store ([`burrow_store::Store`]) in an embedded SQLite database: users, API keys, sandbox
//! records, pools, idempotency keys and quotas.
//!
//! Queries are short and local, so the store is synchronous (async callers go through
//! [`burrow_store::AsyncStore`]); every wait inside is bounded (see [`conn`]): reads go to WAL
//! readers of their own and never queue behind the writer, and a database another process holds
//! locked, or one that cannot be written, is an error the caller can answer `503` with, within
//! about a second.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burrow_types::{ErrorReason, OnTimeout, SandboxState};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

mod admission;
pub mod conn;
mod migrations;

pub use burrow_store::{
    now_rfc3339, now_unix, Claim, IdempotencyClaim, Intent, PoolCounts, PoolRecord, RunRecord,
    SandboxRecord, Store, StoreError, StoreHealth, Usage, User, IDEMPOTENCY_TTL_S, POOL_OWNER,
};

/// An error inside this crate: SQLite's own, or one of the store's. Every public method turns it
/// into a [`StoreError`] (classifying SQLite's codes) before a caller sees it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Store(e.into())
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        let e = match e {
            Error::Store(s) => return s,
            Error::Sql(e) => e,
        };
        let code = match &e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
            _ => None,
        };
        match code {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                StoreError::Busy(Box::new(e))
            }
            Some(ErrorCode::DiskFull) => StoreError::Full(Box::new(e)),
            Some(
                ErrorCode::ReadOnly
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied,
            ) => StoreError::Unwritable(Box::new(e)),
            _ => StoreError::Database(Box::new(e)),
        }
    }
}

/// SQLite's error as the store's.
pub(crate) fn sql(e: rusqlite::Error) -> StoreError {
    Error::Sql(e).into()
}

/// "outer: inner", the whole cause of a store error.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `burrow.db-wal` and `burrow.db-shm` next to `burrow.db`.
pub(crate) fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub struct SqliteStore {
    writer: conn::Writer,
    /// WAL readers; none for an in-memory database (reads then use the writer).
    readers: Option<conn::Slots>,
    path: Option<PathBuf>,
}

/// Makes `path` (if missing) and its WAL companions (if present) mode 0600. Creating the file
/// ourselves is what gives it that mode: SQLite would make it 0644, and gives the companions the
/// main file's mode.
fn private_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::File { path, source }
    };
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(err(path))?;
    }
    for p in [
        path.to_path_buf(),
        sidecar(path, "-wal"),
        sidecar(path, "-shm"),
    ] {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(err(&p))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&p)(e)),
        }
    }
    Ok(())
}

const SANDBOX_COLUMNS: &str = "id, owner_id, state, image, plan, hostname, limits, env, metadata, \
                               uid_slot, runtime, error, warm_hit, created_at, timeout_s, on_timeout, \
                               started_at, paused_at, pool, ephemeral, run, tool_calls, network";

impl SqliteStore {
    /// Opens (or makes) the database at `path`. It holds sandboxes' environment values, so the
    /// file and its `-wal` and `-shm` companions are the server's alone (mode 0600), also when an
    /// older server made them with SQLite's default 0644.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        private_files(path)?;
        let conn = Connection::open(path).map_err(sql)?;
        let store = Self::init(conn, Some(path))?;
        // The companions exist now (WAL mode made them), with the main file's mode.
        private_files(path)?;
        Ok(store)
    }

    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        Ok(Self::init(
            Connection::open_in_memory().map_err(sql)?,
            None,
        )?)
    }

    fn init(conn: Connection, path: Option<&Path>) -> Result<SqliteStore, Error> {
        // WAL keeps readers off the writer's lock; synchronous=FULL because a state change the
        // server has acknowledged must survive a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Migrations may wait for a lock a little longer: nothing is served yet.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::apply(&conn)?;
        conn.busy_timeout(conn::BUSY_WAIT)?;
        Ok(SqliteStore {
            writer: conn::Writer::new(conn),
            readers: conn::readers(path)?,
            path: path.map(Path::to_path_buf),
        })
    }

    /// Runs `f` on the writer (for anything that changes the database, and reads that must see
    /// a write of the same transaction). Waits at most about a second in all.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, Error>,
    ) -> Result<T, StoreError> {
        let result = self
            .writer
            .take()
            .and_then(|mut conn| f(&mut conn).map_err(StoreError::from));
        self.writer.record(&result);
        result
    }

    /// Runs `f` on a WAL reader: it sees every committed write and never waits for the writer.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, StoreError> {
        match &self.readers {
            Some(readers) => {
                let conn = readers.take(conn::SLOT_WAIT).ok_or(StoreError::Congested)?;
                Ok(f(&conn)?)
            }
            None => self
                .writer
                .take()
                .and_then(|conn| f(&conn).map_err(StoreError::from)),
        }
    }

    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
        self.write(|c| Ok(c.execute(sql, params)?))
    }

    /// Whether writes can go through now, and if not why (for `/v1/health`). Never waits for a
    /// lock; probes at most four times a second.
    pub fn health(&self) -> StoreHealth {
        self.writer.health(self.path.as_deref())
    }

    // ---- users and keys ----

    pub fn create_user(
        &self,
        id: &str,
        name: &str,
        plan: &str,
        is_admin: bool,
    ) -> Result<User, StoreError> {
        self.exec(
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
        let n: u64 = self.read(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM api_keys WHERE user_id = ?1 AND revoked_at IS NULL",
                [user_id],
                |r| r.get(0),
            )?)
        })?;
        Ok(n > 0)
    }

    pub fn user_count(&self) -> Result<u64, StoreError> {
        self.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?))
    }

    pub fn user_by_name(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT id, name, plan, is_admin FROM users WHERE name = ?1",
                [name],
                user_from_row,
            )
            .optional()?)
        })
    }

    /// Gives the user named `name` another plan; `None` if there is no such user.
    pub fn set_user_plan(&self, name: &str, plan: &str) -> Result<Option<User>, StoreError> {
        let n = self.exec(
            "UPDATE users SET plan = ?2 WHERE name = ?1",
            params![name, plan],
        )?;
        if n == 0 {
            return Ok(None);
        }
        self.user_by_name(name)
    }

    /// Stores the hash of a key; the key itself is never stored.
    pub fn add_api_key(
        &self,
        id: &str,
        user_id: &str,
        key_hash: &str,
        prefix: &str,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO api_keys (id, user_id, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, user_id, key_hash, prefix, now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT u.id, u.name, u.plan, u.is_admin FROM api_keys k JOIN users u ON u.id = k.user_id \
                 WHERE k.hash = ?1 AND k.revoked_at IS NULL",
                [key_hash],
                user_from_row,
            )
            .optional()?)
        })
    }

    // ---- sandboxes ----

    /// Inserts a sandbox in `starting` with the lowest uid slot no live sandbox holds. The slot
    /// choice and the insert share one transaction, so two creates never get the same range.
    pub fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<u32, StoreError> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            let used: BTreeSet<u32> = {
                let mut stmt =
                    tx.prepare("SELECT uid_slot FROM sandboxes WHERE state != 'destroyed'")?;
                let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let slot = free_slot(&used, burrow_types::limits::UID_SLOTS)
                .ok_or(StoreError::NoFreeSlot)?;
            tx.execute(
                &format!(
                    "INSERT INTO sandboxes ({SANDBOX_COLUMNS}, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
                     ?19, ?20, ?21, 0, ?22, ?14)"
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
                    rec.pool,
                    rec.ephemeral,
                    rec.run.as_ref().map(serde_json::to_string).transpose()?,
                    rec.network.as_ref().map(|v| v.to_string()),
                ],
            )?;
            tx.commit()?;
            Ok(slot)
        })
    }

    /// The computer runs (after a create or a cold resume): its maximum duration counts from now,
    /// and the reason of an earlier failed resume is cleared.
    pub fn set_running(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET state = 'running', runtime = ?2, updated_at = ?3, started_at = ?4, \
             error = NULL, intent = NULL WHERE id = ?1",
            params![id, runtime.to_string(), now_rfc3339(), now_unix()],
        )?;
        Ok(())
    }

    /// The computer exists (state stays `starting` until the control layer has set it up): a crash
    /// from here on is cleaned up with the runtime known. Its maximum duration counts from now.
    pub fn set_built(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET runtime = ?2, updated_at = ?3, started_at = ?4 WHERE id = ?1",
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
        self.exec(
            "UPDATE sandboxes SET timeout_s = ?2, on_timeout = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, timeout_s, on_timeout.as_str(), now_rfc3339()],
        )?;
        Ok(())
    }

    /// The sandbox's network settings changed (egress policy, public ports).
    pub fn set_network(&self, id: &str, network: &serde_json::Value) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET network = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, network.to_string(), now_rfc3339()],
        )?;
        Ok(())
    }

    /// Frozen now: the hot window counts from here.
    pub fn set_paused(&self, id: &str) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET state = 'paused', paused_at = ?2, updated_at = ?3, intent = NULL WHERE id = ?1",
            params![id, now_unix(), now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn set_state(&self, id: &str, state: SandboxState) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET state = ?2, updated_at = ?3, intent = NULL WHERE id = ?1",
            params![id, state.as_str(), now_rfc3339()],
        )?;
        Ok(())
    }

    /// A hibernated sandbox has files but no processes, so no runtime to find.
    pub fn set_hibernated(&self, id: &str) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET state = 'hibernated', runtime = NULL, updated_at = ?2, intent = NULL \
             WHERE id = ?1",
            params![id, now_rfc3339()],
        )?;
        Ok(())
    }

    /// Hibernated, with why its last resume failed: the files are kept and a resume may be tried
    /// again once the cause is gone.
    pub fn set_hibernated_error(&self, id: &str, reason: &ErrorReason) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET state = 'hibernated', runtime = NULL, error = ?2, updated_at = ?3, \
             intent = NULL WHERE id = ?1",
            params![id, serde_json::to_string(reason)?, now_rfc3339()],
        )?;
        Ok(())
    }

    /// Names the transition about to start (or clears it with `None`), before the host is touched.
    pub fn set_intent(&self, id: &str, intent: Option<Intent>) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET intent = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, intent.map(Intent::as_str), now_rfc3339()],
        )?;
        Ok(())
    }

    /// Transitions in flight, by sandbox id (after a crash: the ones it interrupted).
    pub fn intents(&self) -> Result<BTreeMap<String, Intent>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare("SELECT id, intent FROM sandboxes WHERE intent IS NOT NULL")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (id, intent) = row?;
                let intent = Intent::parse(&intent).ok_or(StoreError::BadState(intent))?;
                out.insert(id, intent);
            }
            Ok(out)
        })
    }

    /// Sum of the disk sizes (MiB) promised to sandboxes that hold a disk on this host: every
    /// sandbox that is not destroyed or in error. Sparse images take host space only as they
    /// fill, so this is what the host has promised, not what it uses. (`error` rows had their
    /// computer and disk destroyed.)
    pub fn promised_disk_mib(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let total: i64 = conn.query_row(
                "SELECT COALESCE(SUM(json_extract(limits, '$.disk_mib')), 0) FROM sandboxes \
                 WHERE state IN ('starting', 'running', 'paused', 'hibernated')",
                [],
                |r| r.get(0),
            )?;
            Ok(total.max(0) as u64)
        })
    }

    /// Moves a sandbox to `error`, keeping the reason. Its computer is gone or going.
    pub fn set_error(&self, id: &str, reason: &ErrorReason) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET state = 'error', error = ?2, runtime = NULL, updated_at = ?3, intent = NULL \
             WHERE id = ?1",
            params![id, serde_json::to_string(reason)?, now_rfc3339()],
        )?;
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.read(|conn| {
            let row = conn
                .query_row(
                    &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                    [id],
                    raw_sandbox,
                )
                .optional()?;
            row.map(RawSandbox::decode).transpose()
        })
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

    // ---- runs ----

    /// Counts one tool call on the sandbox's run and returns the new count.
    pub fn count_tool_call(&self, id: &str) -> Result<u32, StoreError> {
        self.write(|c| {
            Ok(c.query_row(
                "UPDATE sandboxes SET tool_calls = tool_calls + 1 WHERE id = ?1 RETURNING tool_calls",
                [id],
                |r| r.get(0),
            )?)
        })
    }

    /// Replaces the sandbox's run; a new run starts its tool-call count at zero.
    pub fn set_run(&self, id: &str, run: &RunRecord, reset_count: bool) -> Result<(), StoreError> {
        self.exec(
            "UPDATE sandboxes SET run = ?2, updated_at = ?3, \
             tool_calls = CASE WHEN ?4 THEN 0 ELSE tool_calls END WHERE id = ?1",
            params![id, serde_json::to_string(run)?, now_rfc3339(), reset_count],
        )?;
        Ok(())
    }

    // ---- warm pools ----

    pub fn upsert_pool(
        &self,
        name: &str,
        image: &str,
        plan: &str,
        size: u32,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO pools (name, image, plan, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (name) DO UPDATE SET image = ?2, plan = ?3, size = ?4",
            params![name, image, plan, size, now_rfc3339()],
        )?;
        Ok(())
    }

    /// Forgets a pool; its warm sandboxes are the caller's to destroy. False if there was none.
    pub fn delete_pool(&self, name: &str) -> Result<bool, StoreError> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM pools WHERE name = ?1", [name])?;
            tx.execute("DELETE FROM pool_events WHERE pool = ?1", [name])?;
            tx.commit()?;
            Ok(n > 0)
        })
    }

    pub fn pools(&self) -> Result<Vec<PoolRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name, image, plan, size, claims, cold_fallbacks FROM pools ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(PoolRecord {
                    name: r.get(0)?,
                    image: r.get(1)?,
                    plan: r.get(2)?,
                    size: r.get(3)?,
                    claims: r.get(4)?,
                    cold_fallbacks: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Ready and starting warm sandboxes, and the last 24 hours' hits and misses, per pool.
    pub fn pool_counts(&self) -> Result<BTreeMap<String, PoolCounts>, StoreError> {
        self.read(|conn| {
            let mut out: BTreeMap<String, PoolCounts> = BTreeMap::new();
            let mut stmt = conn.prepare(
                "SELECT pool, state, COUNT(*) FROM sandboxes \
                 WHERE owner_id = 'pool' AND state IN ('starting', 'running') GROUP BY pool, state",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                ))
            })?;
            for row in rows {
                let (pool, state, n) = row?;
                let c = out.entry(pool).or_default();
                if state == "running" {
                    c.ready = n;
                } else {
                    c.starting = n;
                }
            }
            let mut stmt = conn.prepare(
                "SELECT pool, SUM(hit), COUNT(*) FROM pool_events WHERE at >= ?1 GROUP BY pool",
            )?;
            let rows = stmt.query_map([now_unix() - 86_400], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, u64>(2)?,
                ))
            })?;
            for row in rows {
                let (pool, hits, all) = row?;
                let c = out.entry(pool).or_default();
                c.hits_24h = hits;
                c.misses_24h = all - hits;
            }
            Ok(out)
        })
    }

    /// Hands the oldest ready warm sandbox of any of `pools` to a create, in one statement: two
    /// concurrent claims can never get the same sandbox. The sandbox goes back to `starting` until
    /// its context is injected, so a crash in between is cleaned up like an interrupted create.
    pub fn claim_warm(
        &self,
        pools: &[String],
        claim: &Claim,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        if pools.is_empty() {
            return Ok(None);
        }
        self.write(|conn| {
            let tx = conn.transaction()?;
            let raw = tx
                .query_row(
                    &format!(
                        "UPDATE sandboxes SET owner_id = ?1, plan = ?2, hostname = COALESCE(?3, id), limits = ?4, \
                         env = ?5, metadata = ?6, timeout_s = ?7, on_timeout = ?8, ephemeral = ?9, \
                         run = ?10, tool_calls = 0, warm_hit = 1, state = 'starting', \
                         created_at = ?11, updated_at = ?11, started_at = ?12 \
                         WHERE id = (SELECT id FROM sandboxes WHERE owner_id = 'pool' \
                                     AND pool IN (SELECT value FROM json_each(?13)) AND state = 'running' ORDER BY created_at, id LIMIT 1) \
                         RETURNING {SANDBOX_COLUMNS}"
                    ),
                    params![
                        claim.owner_id,
                        claim.plan,
                        claim.hostname,
                        serde_json::to_string(&claim.limits)?,
                        serde_json::to_string(&claim.env)?,
                        serde_json::to_string(&claim.metadata)?,
                        claim.timeout_s,
                        claim.on_timeout.as_str(),
                        claim.ephemeral,
                        claim.run.as_ref().map(serde_json::to_string).transpose()?,
                        now_rfc3339(),
                        now_unix(),
                        serde_json::to_string(pools)?,
                    ],
                    raw_sandbox,
                )
                .optional()?;
            tx.commit()?;
            raw.map(RawSandbox::decode).transpose()
        })
    }

    /// Counts a create against a pool: a claim (`hit`) or a cold fallback.
    pub fn record_pool_use(&self, pool: &str, hit: bool) -> Result<(), StoreError> {
        self.write(|conn| {
            let tx = conn.transaction()?;
            let column = if hit { "claims" } else { "cold_fallbacks" };
            tx.execute(
                &format!("UPDATE pools SET {column} = {column} + 1 WHERE name = ?1"),
                [pool],
            )?;
            tx.execute(
                "INSERT INTO pool_events (at, pool, hit) VALUES (?1, ?2, ?3)",
                params![now_unix(), pool, hit],
            )?;
            // Events older than a day no longer count for the hit rate.
            tx.execute(
                "DELETE FROM pool_events WHERE at < ?1",
                [now_unix() - 86_400],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Warm sandboxes of one pool, ready or starting.
    pub fn warm_sandboxes(&self, pool: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        self.query_sandboxes(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = 'pool' AND pool = ?1 \
                 AND state IN ('starting', 'running') ORDER BY created_at, id"
            ),
            [pool],
        )
    }

    /// Ready warm sandboxes whose pool is none of `pools` (a pool deleted while they were built).
    pub fn warm_sandboxes_outside(
        &self,
        pools: &[String],
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        self.query_sandboxes(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = 'pool' AND state = 'running' \
                 AND (pool IS NULL OR pool NOT IN (SELECT value FROM json_each(?1))) ORDER BY created_at, id"
            ),
            [serde_json::to_string(pools)?],
        )
    }

    /// Users' sandboxes (not warm ones) by state, destroyed ones left out.
    pub fn state_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT state, COUNT(*) FROM sandboxes WHERE owner_id != 'pool' AND state != 'destroyed' \
                 GROUP BY state",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn query_sandboxes(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let raws = stmt
                .query_map(params, raw_sandbox)?
                .collect::<Result<Vec<_>, _>>()?;
            raws.into_iter().map(RawSandbox::decode).collect()
        })
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
    pool: Option<String>,
    ephemeral: bool,
    run: Option<String>,
    tool_calls: u32,
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
        pool: r.get(18)?,
        ephemeral: r.get(19)?,
        run: r.get(20)?,
        tool_calls: r.get(21)?,
        network: r.get(22)?,
    })
}

impl RawSandbox {
    fn decode(self) -> Result<SandboxRecord, Error> {
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
            run: self.run.as_deref().map(serde_json::from_str).transpose()?,
            pool: self.pool,
            ephemeral: self.ephemeral,
            tool_calls: self.tool_calls,
            network: self
                .network
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?,
        })
    }
}

/// The lowest slot below `top` that `used` does not hold: each slot is a range of host uids, and
/// one past the last would wrap around into uids below the base (host users, root).
fn free_slot(used: &BTreeSet<u32>, top: u32) -> Option<u32> {
    (0..top).find(|s| !used.contains(s))
}

/// The trait is the inherent methods above (and in `admission.rs`), one for one.
macro_rules! forward {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Store for SqliteStore {
            $( fn $name(&self $(, $arg: $ty)*) -> $ret { SqliteStore::$name(self $(, $arg)*) } )*
        }
    };
}

forward! {
    fn health(&self) -> StoreHealth;
    fn create_user(&self, id: &str, name: &str, plan: &str, is_admin: bool) -> Result<User, StoreError>;
    fn has_api_keys(&self, user_id: &str) -> Result<bool, StoreError>;
    fn user_count(&self) -> Result<u64, StoreError>;
    fn user_by_name(&self, name: &str) -> Result<Option<User>, StoreError>;
    fn set_user_plan(&self, name: &str, plan: &str) -> Result<Option<User>, StoreError>;
    fn add_api_key(&self, id: &str, user_id: &str, key_hash: &str, prefix: &str) -> Result<(), StoreError>;
    fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, StoreError>;
    fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<u32, StoreError>;
    fn set_running(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError>;
    fn set_built(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError>;
    fn set_timeout(&self, id: &str, timeout_s: Option<u64>, on_timeout: OnTimeout) -> Result<(), StoreError>;
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
    fn state_counts(&self) -> Result<BTreeMap<String, u64>, StoreError>;
    fn upsert_pool(&self, name: &str, image: &str, plan: &str, size: u32) -> Result<(), StoreError>;
    fn delete_pool(&self, name: &str) -> Result<bool, StoreError>;
    fn pools(&self) -> Result<Vec<PoolRecord>, StoreError>;
    fn pool_counts(&self) -> Result<BTreeMap<String, PoolCounts>, StoreError>;
    fn claim_warm(&self, pools: &[String], claim: &Claim) -> Result<Option<SandboxRecord>, StoreError>;
    fn record_pool_use(&self, pool: &str, hit: bool) -> Result<(), StoreError>;
    fn warm_sandboxes(&self, pool: &str) -> Result<Vec<SandboxRecord>, StoreError>;
    fn warm_sandboxes_outside(&self, pools: &[String]) -> Result<Vec<SandboxRecord>, StoreError>;
    fn claim_idempotency_key(&self, user_id: &str, key: &str, fingerprint: &str, sandbox_id: &str) -> Result<IdempotencyClaim, StoreError>;
    fn finish_idempotency_key(&self, user_id: &str, key: &str, sandbox_id: &str) -> Result<(), StoreError>;
    fn release_idempotency_key(&self, user_id: &str, key: &str) -> Result<(), StoreError>;
    fn idempotency_key(&self, user_id: &str, key: &str) -> Result<Option<(String, String, bool)>, StoreError>;
    fn settle_idempotency_keys(&self) -> Result<(usize, usize), StoreError>;
    fn usage_of(&self, owner_id: &str, except: &[String]) -> Result<Usage, StoreError>;
    fn promised_pids(&self, except: &[String]) -> Result<u64, StoreError>;
    fn user_quota(&self, user_id: &str) -> Result<Option<burrow_types::Quota>, StoreError>;
    fn set_user_quota(&self, user_id: &str, quota: Option<&burrow_types::Quota>) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests;
