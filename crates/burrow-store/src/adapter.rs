//! The one way async code calls the store: each call runs on the runtime's blocking pool, so a
//! database that makes a call wait (another process's lock, every connection in use) holds a
//! blocking thread for that wait, never an async worker. Health checks, metrics and reads then go
//! on answering while writes wait for their bounded time and answer `503` (docs/adr/0055).
//!
//! The methods mirror [`Store`]'s, taking the same borrowed arguments (copied for the call).

use std::collections::BTreeMap;
use std::sync::Arc;

use burrow_types::{ErrorReason, OnTimeout, Quota, SandboxState};

use crate::{
    Claim, IdempotencyClaim, Intent, PoolCounts, PoolRecord, RunRecord, SandboxRecord, Store,
    StoreError, StoreHealth, Usage, User,
};

/// A [`Store`] whose calls run on the blocking pool. Cheap to clone.
#[derive(Clone)]
pub struct AsyncStore {
    inner: Arc<dyn Store>,
}

impl AsyncStore {
    pub fn new(inner: Arc<dyn Store>) -> AsyncStore {
        AsyncStore { inner }
    }

    /// The store itself, for code that is already off the async workers (start-up before the
    /// server serves, a blocking task, tests).
    pub fn blocking(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// Runs `f` on the blocking pool. A panic in `f` is the caller's panic; a call the runtime
    /// dropped while shutting down is [`StoreError::Cancelled`]. A caller that goes away does
    /// not cut the call short: a write started is finished.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.inner.clone();
        match tokio::task::spawn_blocking(move || f(&*store)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(StoreError::Cancelled),
        }
    }

    /// See [`Store::health`]; a probe that could not run says so.
    pub async fn health(&self) -> StoreHealth {
        let store = self.inner.clone();
        match tokio::task::spawn_blocking(move || store.health()).await {
            Ok(h) => h,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => StoreHealth {
                writable: false,
                problem: Some((
                    burrow_types::codes::DATABASE_UNAVAILABLE,
                    StoreError::Cancelled.to_string(),
                )),
            },
        }
    }

    // ---- users and keys ----

    pub async fn create_user(
        &self,
        id: &str,
        name: &str,
        plan: &str,
        is_admin: bool,
    ) -> Result<User, StoreError> {
        let (id, name, plan) = (id.to_owned(), name.to_owned(), plan.to_owned());
        self.run(move |s| s.create_user(&id, &name, &plan, is_admin))
            .await
    }

    pub async fn has_api_keys(&self, user_id: &str) -> Result<bool, StoreError> {
        let user_id = user_id.to_owned();
        self.run(move |s| s.has_api_keys(&user_id)).await
    }

    pub async fn user_count(&self) -> Result<u64, StoreError> {
        self.run(|s| s.user_count()).await
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, StoreError> {
        let name = name.to_owned();
        self.run(move |s| s.user_by_name(&name)).await
    }

    pub async fn set_user_plan(&self, name: &str, plan: &str) -> Result<Option<User>, StoreError> {
        let (name, plan) = (name.to_owned(), plan.to_owned());
        self.run(move |s| s.set_user_plan(&name, &plan)).await
    }

    pub async fn add_api_key(
        &self,
        id: &str,
        user_id: &str,
        key_hash: &str,
        prefix: &str,
    ) -> Result<(), StoreError> {
        let (id, user_id) = (id.to_owned(), user_id.to_owned());
        let (key_hash, prefix) = (key_hash.to_owned(), prefix.to_owned());
        self.run(move |s| s.add_api_key(&id, &user_id, &key_hash, &prefix))
            .await
    }

    pub async fn user_by_key_hash(&self, key_hash: &str) -> Result<Option<User>, StoreError> {
        let key_hash = key_hash.to_owned();
        self.run(move |s| s.user_by_key_hash(&key_hash)).await
    }

    // ---- sandboxes ----

    pub async fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<u32, StoreError> {
        let rec = rec.clone();
        self.run(move |s| s.insert_sandbox(&rec)).await
    }

    pub async fn set_running(
        &self,
        id: &str,
        runtime: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let (id, runtime) = (id.to_owned(), runtime.clone());
        self.run(move |s| s.set_running(&id, &runtime)).await
    }

    pub async fn set_built(&self, id: &str, runtime: &serde_json::Value) -> Result<(), StoreError> {
        let (id, runtime) = (id.to_owned(), runtime.clone());
        self.run(move |s| s.set_built(&id, &runtime)).await
    }

    pub async fn set_timeout(
        &self,
        id: &str,
        timeout_s: Option<u64>,
        on_timeout: OnTimeout,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.set_timeout(&id, timeout_s, on_timeout))
            .await
    }

    pub async fn set_network(
        &self,
        id: &str,
        network: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let (id, network) = (id.to_owned(), network.clone());
        self.run(move |s| s.set_network(&id, &network)).await
    }

    pub async fn set_paused(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.set_paused(&id)).await
    }

    pub async fn set_state(&self, id: &str, state: SandboxState) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.set_state(&id, state)).await
    }

    pub async fn set_hibernated(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.set_hibernated(&id)).await
    }

    pub async fn set_hibernated_error(
        &self,
        id: &str,
        reason: &ErrorReason,
    ) -> Result<(), StoreError> {
        let (id, reason) = (id.to_owned(), reason.clone());
        self.run(move |s| s.set_hibernated_error(&id, &reason))
            .await
    }

    pub async fn set_intent(&self, id: &str, intent: Option<Intent>) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.set_intent(&id, intent)).await
    }

    pub async fn intents(&self) -> Result<BTreeMap<String, Intent>, StoreError> {
        self.run(|s| s.intents()).await
    }

    pub async fn promised_disk_mib(&self) -> Result<u64, StoreError> {
        self.run(|s| s.promised_disk_mib()).await
    }

    pub async fn set_error(&self, id: &str, reason: &ErrorReason) -> Result<(), StoreError> {
        let (id, reason) = (id.to_owned(), reason.clone());
        self.run(move |s| s.set_error(&id, &reason)).await
    }

    pub async fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.sandbox(&id)).await
    }

    pub async fn sandboxes_of(&self, owner_id: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        let owner_id = owner_id.to_owned();
        self.run(move |s| s.sandboxes_of(&owner_id)).await
    }

    pub async fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.run(|s| s.live_sandboxes()).await
    }

    pub async fn count_tool_call(&self, id: &str) -> Result<u32, StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.count_tool_call(&id)).await
    }

    pub async fn set_run(
        &self,
        id: &str,
        run: &RunRecord,
        reset_count: bool,
    ) -> Result<(), StoreError> {
        let (id, run) = (id.to_owned(), run.clone());
        self.run(move |s| s.set_run(&id, &run, reset_count)).await
    }

    pub async fn state_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.run(|s| s.state_counts()).await
    }

    // ---- pools ----

    pub async fn upsert_pool(
        &self,
        name: &str,
        image: &str,
        plan: &str,
        size: u32,
    ) -> Result<(), StoreError> {
        let (name, image, plan) = (name.to_owned(), image.to_owned(), plan.to_owned());
        self.run(move |s| s.upsert_pool(&name, &image, &plan, size))
            .await
    }

    pub async fn delete_pool(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.run(move |s| s.delete_pool(&name)).await
    }

    pub async fn pools(&self) -> Result<Vec<PoolRecord>, StoreError> {
        self.run(|s| s.pools()).await
    }

    pub async fn pool_counts(&self) -> Result<BTreeMap<String, PoolCounts>, StoreError> {
        self.run(|s| s.pool_counts()).await
    }

    pub async fn claim_warm(
        &self,
        pools: &[String],
        claim: &Claim,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let (pools, claim) = (pools.to_vec(), claim.clone());
        self.run(move |s| s.claim_warm(&pools, &claim)).await
    }

    pub async fn record_pool_use(&self, pool: &str, hit: bool) -> Result<(), StoreError> {
        let pool = pool.to_owned();
        self.run(move |s| s.record_pool_use(&pool, hit)).await
    }

    pub async fn warm_sandboxes(&self, pool: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        let pool = pool.to_owned();
        self.run(move |s| s.warm_sandboxes(&pool)).await
    }

    pub async fn warm_sandboxes_outside(
        &self,
        pools: &[String],
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let pools = pools.to_vec();
        self.run(move |s| s.warm_sandboxes_outside(&pools)).await
    }

    // ---- admission ----

    pub async fn claim_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        fingerprint: &str,
        sandbox_id: &str,
    ) -> Result<IdempotencyClaim, StoreError> {
        let (user_id, key) = (user_id.to_owned(), key.to_owned());
        let (fingerprint, sandbox_id) = (fingerprint.to_owned(), sandbox_id.to_owned());
        self.run(move |s| s.claim_idempotency_key(&user_id, &key, &fingerprint, &sandbox_id))
            .await
    }

    pub async fn finish_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        sandbox_id: &str,
    ) -> Result<(), StoreError> {
        let (user_id, key, sandbox_id) =
            (user_id.to_owned(), key.to_owned(), sandbox_id.to_owned());
        self.run(move |s| s.finish_idempotency_key(&user_id, &key, &sandbox_id))
            .await
    }

    pub async fn release_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        let (user_id, key) = (user_id.to_owned(), key.to_owned());
        self.run(move |s| s.release_idempotency_key(&user_id, &key))
            .await
    }

    pub async fn idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<(String, String, bool)>, StoreError> {
        let (user_id, key) = (user_id.to_owned(), key.to_owned());
        self.run(move |s| s.idempotency_key(&user_id, &key)).await
    }

    pub async fn settle_idempotency_keys(&self) -> Result<(usize, usize), StoreError> {
        self.run(|s| s.settle_idempotency_keys()).await
    }

    pub async fn usage_of(&self, owner_id: &str, except: &[String]) -> Result<Usage, StoreError> {
        let (owner_id, except) = (owner_id.to_owned(), except.to_vec());
        self.run(move |s| s.usage_of(&owner_id, &except)).await
    }

    pub async fn promised_pids(&self, except: &[String]) -> Result<u64, StoreError> {
        let except = except.to_vec();
        self.run(move |s| s.promised_pids(&except)).await
    }

    pub async fn user_quota(&self, user_id: &str) -> Result<Option<Quota>, StoreError> {
        let user_id = user_id.to_owned();
        self.run(move |s| s.user_quota(&user_id)).await
    }

    pub async fn set_user_quota(
        &self,
        user_id: &str,
        quota: Option<&Quota>,
    ) -> Result<(), StoreError> {
        let (user_id, quota) = (user_id.to_owned(), quota.cloned());
        self.run(move |s| s.set_user_quota(&user_id, quota.as_ref()))
            .await
    }
}
