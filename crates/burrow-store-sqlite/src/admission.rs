//! What a create is checked against before anything is made: idempotency keys (one sandbox per
//! key and user, however often the create is retried), what each user's live sandboxes were
//! promised (for quotas), the pid limits promised host-wide (for the host's pid budget), and the
//! operator's per-user quota overrides.

use burrow_types::Quota;
use rusqlite::{params, OptionalExtension};

use crate::{
    now_rfc3339, now_unix, IdempotencyClaim, SqliteStore, StoreError, Usage, IDEMPOTENCY_TTL_S,
};

/// States whose sandboxes hold (or will hold again) what their limits promise.
const LIVE: &str = "('starting', 'running', 'paused', 'hibernated')";

impl SqliteStore {
    /// Presents `key` for a create by `user_id` whose request has `fingerprint`; on first use it
    /// is reserved for `sandbox_id`. Expired keys are forgotten on the way.
    pub fn claim_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        fingerprint: &str,
        sandbox_id: &str,
    ) -> Result<IdempotencyClaim, StoreError> {
        self.write(|c| {
            let now = now_unix();
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM idempotency_keys WHERE expires_at < ?1",
                [now],
            )?;
            let inserted = tx.execute(
                "INSERT INTO idempotency_keys (user_id, key, fingerprint, sandbox_id, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (user_id, key) DO NOTHING",
                params![user_id, key, fingerprint, sandbox_id, now, now + IDEMPOTENCY_TTL_S],
            )?;
            let claim = if inserted == 1 {
                IdempotencyClaim::Reserved
            } else {
                let (fp, id, done): (String, String, bool) = tx.query_row(
                    "SELECT fingerprint, sandbox_id, done FROM idempotency_keys WHERE user_id = ?1 AND key = ?2",
                    params![user_id, key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                IdempotencyClaim::Seen {
                    same_request: fp == fingerprint,
                    sandbox_id: id,
                    done,
                }
            };
            tx.commit()?;
            Ok(claim)
        })
    }

    /// The key's create finished with `sandbox_id` (a warm claim gives another id than the one
    /// reserved).
    pub fn finish_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        sandbox_id: &str,
    ) -> Result<(), StoreError> {
        self.exec(
            "UPDATE idempotency_keys SET done = 1, sandbox_id = ?3 WHERE user_id = ?1 AND key = ?2",
            params![user_id, key, sandbox_id],
        )?;
        Ok(())
    }

    /// The key's create failed before it made anything: a retry with the key may try again.
    pub fn release_idempotency_key(&self, user_id: &str, key: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM idempotency_keys WHERE user_id = ?1 AND key = ?2 AND done = 0",
            params![user_id, key],
        )?;
        Ok(())
    }

    /// The key as stored now: `(fingerprint, sandbox_id, done)`.
    pub fn idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<(String, String, bool)>, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT fingerprint, sandbox_id, done FROM idempotency_keys \
                 WHERE user_id = ?1 AND key = ?2 AND expires_at >= ?3",
                params![user_id, key, now_unix()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
        })
    }

    /// At start, before anything is served: keys whose create was cut short by a stop or crash
    /// either name a sandbox row (which `reconcile` has made true: the key answers with it) or
    /// none (nothing was made: the key is forgotten, so a retry makes one). Returns how many of
    /// each.
    pub fn settle_idempotency_keys(&self) -> Result<(usize, usize), StoreError> {
        self.write(|c| {
            let tx = c.transaction()?;
            let kept = tx.execute(
                "UPDATE idempotency_keys SET done = 1 WHERE done = 0 \
                 AND sandbox_id IN (SELECT id FROM sandboxes)",
                [],
            )?;
            let dropped = tx.execute("DELETE FROM idempotency_keys WHERE done = 0", [])?;
            tx.commit()?;
            Ok((kept, dropped))
        })
    }

    /// What `owner_id`'s live sandboxes were promised, not counting the sandboxes in `except`
    /// (creates in flight that the caller counts itself).
    pub fn usage_of(&self, owner_id: &str, except: &[String]) -> Result<Usage, StoreError> {
        self.read(|c| {
            let (n, mem, disk): (i64, i64, i64) = c.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(json_extract(limits, '$.memory_mib')), 0), \
                     COALESCE(SUM(json_extract(limits, '$.disk_mib')), 0) FROM sandboxes \
                     WHERE owner_id = ?1 AND state IN {LIVE} \
                     AND id NOT IN (SELECT value FROM json_each(?2))"
                ),
                params![owner_id, serde_json::to_string(except)?],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            Ok(Usage {
                sandboxes: n.max(0) as u64,
                memory_mib: mem.max(0) as u64,
                disk_mib: disk.max(0) as u64,
            })
        })
    }

    /// The sum of the pid limits of every live sandbox on this server (warm ones included), not
    /// counting those in `except`.
    pub fn promised_pids(&self, except: &[String]) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c.query_row(
                &format!(
                    "SELECT COALESCE(SUM(json_extract(limits, '$.pids')), 0) FROM sandboxes \
                     WHERE state IN {LIVE} AND id NOT IN (SELECT value FROM json_each(?1))"
                ),
                [serde_json::to_string(except)?],
                |r| r.get(0),
            )?;
            Ok(n.max(0) as u64)
        })
    }

    /// The operator's quota override for one user, if any.
    pub fn user_quota(&self, user_id: &str) -> Result<Option<Quota>, StoreError> {
        let raw: Option<String> = self.read(|c| {
            Ok(c.query_row(
                "SELECT quota FROM user_quotas WHERE user_id = ?1",
                [user_id],
                |r| r.get(0),
            )
            .optional()?)
        })?;
        Ok(raw.as_deref().map(serde_json::from_str).transpose()?)
    }

    /// Sets (or with `None` removes) a user's quota override.
    pub fn set_user_quota(&self, user_id: &str, quota: Option<&Quota>) -> Result<(), StoreError> {
        match quota {
            Some(q) => self.exec(
                "INSERT INTO user_quotas (user_id, quota, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (user_id) DO UPDATE SET quota = ?2, updated_at = ?3",
                params![user_id, serde_json::to_string(q)?, now_rfc3339()],
            )?,
            None => self.exec("DELETE FROM user_quotas WHERE user_id = ?1", [user_id])?,
        };
        Ok(())
    }
}
