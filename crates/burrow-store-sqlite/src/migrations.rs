//! Schema versions, applied in order inside one transaction each. Never edit a shipped migration:
//! add the next one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: users, keys, sandboxes.
    "CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        plan TEXT NOT NULL,
        is_admin INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES users(id),
        state TEXT NOT NULL,
        image TEXT NOT NULL,
        plan TEXT NOT NULL,
        hostname TEXT NOT NULL,
        limits TEXT NOT NULL,
        env TEXT NOT NULL,
        metadata TEXT NOT NULL,
        uid_slot INTEGER NOT NULL,
        runtime TEXT,
        error TEXT,
        warm_hit INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX sandboxes_owner ON sandboxes(owner_id, state);
    CREATE UNIQUE INDEX sandboxes_live_slot ON sandboxes(uid_slot) WHERE state != 'destroyed';",
    // 2: idle timeout, and when the computer last started (for the plan's maximum duration).
    "ALTER TABLE sandboxes ADD COLUMN timeout_s INTEGER;
    ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'destroy';
    ALTER TABLE sandboxes ADD COLUMN started_at INTEGER NOT NULL DEFAULT 0;",
    // 3: when a sandbox was paused (for the hot window).
    "ALTER TABLE sandboxes ADD COLUMN paused_at INTEGER NOT NULL DEFAULT 0;",
    // 4: warm pools, runs, ephemeral sandboxes. A warm sandbox names the pool that built it and is
    // owned by the internal `pool` user until a create claims it.
    "ALTER TABLE sandboxes ADD COLUMN pool TEXT;
    ALTER TABLE sandboxes ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN run TEXT;
    ALTER TABLE sandboxes ADD COLUMN tool_calls INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX sandboxes_pool ON sandboxes(owner_id, pool, state) WHERE pool IS NOT NULL;
    CREATE TABLE pools (
        name TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        plan TEXT NOT NULL,
        size INTEGER NOT NULL,
        claims INTEGER NOT NULL DEFAULT 0,
        cold_fallbacks INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE pool_events (at INTEGER NOT NULL, pool TEXT NOT NULL, hit INTEGER NOT NULL);
    CREATE INDEX pool_events_at ON pool_events(pool, at);
    INSERT INTO users (id, name, plan, is_admin, created_at)
        VALUES ('pool', '(warm pool)', 'free', 0, '1970-01-01T00:00:00Z');",
    // 5: network settings (egress policy, public ports) as JSON.
    "ALTER TABLE sandboxes ADD COLUMN network TEXT;",
    // 6: idempotency keys of creates (per user, expiring) and per-user quota overrides.
    "CREATE TABLE idempotency_keys (
        user_id TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    CREATE INDEX idempotency_keys_expiry ON idempotency_keys(expires_at);
    CREATE TABLE user_quotas (
        user_id TEXT PRIMARY KEY REFERENCES users(id),
        quota TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE store_probe (id INTEGER PRIMARY KEY, at INTEGER NOT NULL);",
    // 7: the lifecycle transition in flight (pausing, resuming, hibernating, destroying), written
    // before the host is touched so that reconcile can finish or undo it after a crash.
    "ALTER TABLE sandboxes ADD COLUMN intent TEXT;",
];

pub fn apply(conn: &Connection) -> rusqlite::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))?;
    }
    Ok(())
}
