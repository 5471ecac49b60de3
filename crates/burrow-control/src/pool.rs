//! Warm pools (docs/adr/0007): sandboxes built ahead of time, owned by the internal pool user, and
//! handed to a create in one SQL statement. The replenisher keeps each pool at its target size.

use burrow_store::{now_rfc3339, now_unix, Claim, PoolRecord, SandboxRecord, POOL_OWNER};
use burrow_types::{Plan, PoolSpec, PoolStatus, SandboxState};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use tracing::{info, warn};

use crate::auth::new_id;
use crate::control::{error_chain, owner_of, Control, ControlError, DEFAULT_IMAGE};

/// Warm sandboxes built at once: a refill must not starve user creates on a small host.
const BUILD_CONCURRENCY: usize = 2;
/// Builds per replenisher round, so a resize or delete is seen between rounds.
const BUILDS_PER_ROUND: usize = 8;
pub const MAX_POOL_SIZE: u32 = 1000;
/// How long the replenisher holds back for creates in flight before it builds anyway.
const MAX_YIELD: std::time::Duration = std::time::Duration::from_secs(1);

/// Paused sandboxes start to hibernate when the host has less memory available than this:
/// a twentieth of its memory.
pub fn default_memory_floor_mib() -> u64 {
    meminfo("MemTotal:").map(|kib| kib / 1024 / 20).unwrap_or(0)
}

/// A field of `/proc/meminfo`, in KiB.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Control {
    /// Claims a warm sandbox for this create and injects its context, or says to go cold
    /// (`None`) at once: when no pool matches, when the pools are empty, or when the claimed
    /// sandbox could not take its context (it is destroyed and the create goes cold).
    pub(crate) async fn claim_warm(
        &self,
        image: &str,
        plan: &Plan,
        claim: &Claim,
        files: &BTreeMap<String, String>,
    ) -> Result<Option<SandboxRecord>, ControlError> {
        // A warm sandbox of another plan can serve this one when what was fixed at build (the
        // disk, the open-file limit) matches: CPU, memory and pids are rewritten at claim.
        let pools: Vec<PoolRecord> = self
            .store()
            .pools()
            .await?
            .into_iter()
            .filter(|p| {
                p.image == image
                    && self.plan(&p.plan).is_some_and(|pp| {
                        pp.limits.disk_mib == plan.limits.disk_mib
                            && pp.limits.nofile == plan.limits.nofile
                            && pp.limits.isolation == claim.limits.isolation
                    })
            })
            .collect();
        let Some(home) = pools
            .iter()
            .find(|p| p.plan == plan.name)
            .or(pools.first())
            .map(|p| p.name.clone())
        else {
            return Ok(None);
        };
        let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
        let claimed = {
            let _store = burrow_node::timing::stage("store");
            self.store().claim_warm(&names, claim).await?
        };
        let Some(mut rec) = claimed else {
            self.store().record_pool_use(&home, false).await?;
            self.pool_wake.notify_one();
            return Ok(None);
        };
        self.pool_wake.notify_one();
        let pool = rec.pool.clone().unwrap_or(home);
        let inject = burrow_node::timing::stage("inject");
        let injected = self.inject(&rec, true, files).await;
        drop(inject);
        match injected {
            Ok(()) => {
                let _store = burrow_node::timing::stage("store");
                self.store()
                    .set_state(&rec.id, SandboxState::Running)
                    .await?;
                self.store().record_pool_use(&pool, true).await?;
                rec.state = SandboxState::Running;
                info!(sandbox_id = %rec.id, pool = %pool, "claimed a warm sandbox");
                Ok(Some(rec))
            }
            Err(e) => {
                self.fail_after_build(&rec, &e).await;
                self.store().record_pool_use(&pool, false).await?;
                Ok(None)
            }
        }
    }

    /// Creates or resizes a pool. Admins only (checked by the caller).
    pub async fn put_pool(&self, name: &str, spec: PoolSpec) -> Result<PoolStatus, ControlError> {
        let ok_name = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_name {
            return Err(ControlError::BadRequest(format!(
                "pool name {name:?} must be 1-63 letters, digits, '-' or '_'"
            )));
        }
        let image = spec.image.unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        if image != DEFAULT_IMAGE {
            return Err(crate::control::unknown_image(image));
        }
        let plan = spec.plan.unwrap_or_else(|| "free".to_string());
        if self.plan(&plan).is_none() {
            return Err(self.unknown_plan(&plan));
        }
        if spec.size > MAX_POOL_SIZE {
            return Err(ControlError::BadRequest(format!(
                "pool size {} is over the limit of {MAX_POOL_SIZE}",
                spec.size
            )));
        }
        self.store()
            .upsert_pool(name, &image, &plan, spec.size)
            .await?;
        self.pool_wake.notify_one();
        match self.pools().await?.into_iter().find(|p| p.name == name) {
            Some(p) => Ok(p),
            None => Err(self.unknown_pool(name).await),
        }
    }

    /// Forgets a pool and destroys its warm sandboxes (claimed ones are their users' now).
    pub async fn delete_pool(&self, name: &str) -> Result<(), ControlError> {
        if !self.store().delete_pool(name).await? {
            return Err(self.unknown_pool(name).await);
        }
        for rec in self.store().warm_sandboxes(name).await? {
            self.destroy_warm(&rec).await;
        }
        Ok(())
    }

    /// The error for a pool that does not exist, naming the ones that do.
    async fn unknown_pool(&self, name: &str) -> ControlError {
        ControlError::UnknownPool {
            name: name.to_string(),
            known: self
                .pools()
                .await
                .map(|ps| ps.into_iter().map(|p| p.name).collect())
                .unwrap_or_default(),
        }
    }

    pub async fn pools(&self) -> Result<Vec<PoolStatus>, ControlError> {
        let counts = self.store().pool_counts().await?;
        Ok(self
            .store()
            .pools()
            .await?
            .into_iter()
            .map(|p| {
                let c = counts.get(&p.name).cloned().unwrap_or_default();
                let uses = c.hits_24h + c.misses_24h;
                PoolStatus {
                    target: p.size,
                    ready: c.ready,
                    starting: c.starting,
                    claims: p.claims,
                    cold_fallbacks: p.cold_fallbacks,
                    hit_rate_24h: (uses > 0).then(|| c.hits_24h as f64 / uses as f64),
                    name: p.name,
                    image: p.image,
                    plan: p.plan,
                }
            })
            .collect())
    }

    /// One replenisher round: builds what each pool lacks (a few at a time) and destroys what a
    /// shrunk pool has too many of. Returns whether there is more to build.
    ///
    /// Warm sandboxes are built only while no create is in flight: on a small host a refill
    /// competes with the creates users are waiting for, and a burst that empties the pool is
    /// served cold at once either way. The last create of a burst wakes the replenisher, so under
    /// normal load (creates one at a time) a claimed sandbox is replaced at once; under constant
    /// load it holds back for a second at most.
    pub async fn replenish(&self) -> Result<bool, ControlError> {
        if self.creates_busy() {
            return Ok(false);
        }
        let counts = self.store().pool_counts().await?;
        let mut builds = Vec::new();
        let pools = self.store().pools().await?;
        // Every sandbox belongs to someone visible: warm ones of a deleted pool go.
        let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
        for rec in self.store().warm_sandboxes_outside(&names).await? {
            info!(sandbox_id = %rec.id, pool = rec.pool.as_deref(), "destroying a warm sandbox of a pool that no longer exists");
            self.destroy_warm(&rec).await;
        }
        // Below the watermark the disk is kept for what sandboxes already hold.
        if let Err(e) = self.check_free_space("refilling pools") {
            warn!(error = %error_chain(&e), "not refilling pools");
            return Ok(false);
        }
        for p in pools {
            let c = counts.get(&p.name).cloned().unwrap_or_default();
            let have = c.ready + c.starting;
            if have > p.size {
                // Newest first: the oldest warm sandboxes are claimed first anyway.
                let mut warm = self.store().warm_sandboxes(&p.name).await?;
                warm.retain(|r| r.state == SandboxState::Running);
                for rec in warm.iter().rev().take((have - p.size) as usize) {
                    self.destroy_warm(rec).await;
                }
            }
            let Some(plan) = self.plan(&p.plan).cloned() else {
                warn!(pool = %p.name, plan = %p.plan, "pool names a plan this server does not have; not refilling it");
                continue;
            };
            for _ in have..p.size {
                builds.push((p.clone(), plan.clone()));
            }
        }
        let more = builds.len() > BUILDS_PER_ROUND;
        futures_util::stream::iter(builds.into_iter().take(BUILDS_PER_ROUND))
            .for_each_concurrent(BUILD_CONCURRENCY, |(pool, plan)| async move {
                if self.creates_busy() {
                    return;
                }
                if let Err(e) = self.build_warm(&pool, &plan).await {
                    warn!(pool = %pool.name, error = %error_chain(&e), "building a warm sandbox failed");
                }
            })
            .await;
        Ok(more)
    }

    /// Whether to hold a build back because creates are in flight, for at most [`MAX_YIELD`]:
    /// under constant load the pool still refills.
    fn creates_busy(&self) -> bool {
        let busy = self
            .creates_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0;
        let mut since = self
            .pool_yield_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !busy {
            *since = None;
            return false;
        }
        since.get_or_insert_with(std::time::Instant::now).elapsed() < MAX_YIELD
    }

    async fn build_warm(&self, pool: &PoolRecord, plan: &Plan) -> Result<(), ControlError> {
        let id = new_id(20);
        let rec = SandboxRecord {
            id: id.clone(),
            owner_id: POOL_OWNER.to_string(),
            state: SandboxState::Starting,
            image: pool.image.clone(),
            plan: plan.name.clone(),
            hostname: id.clone(),
            limits: plan.limits.clone(),
            env: BTreeMap::new(),
            metadata: BTreeMap::new(),
            uid_slot: 0,
            runtime: None,
            error: None,
            warm_hit: false,
            created_at: now_rfc3339(),
            timeout_s: None,
            on_timeout: Default::default(),
            started_at: now_unix(),
            paused_at: 0,
            pool: Some(pool.name.clone()),
            ephemeral: false,
            run: None,
            tool_calls: 0,
            network: self.warm_network(),
        };
        // Warm sandboxes take their share of the host's pid budget like any other.
        let _admitted = self.admit_warm(&plan.limits, &id).await?;
        let lock = self.lock_of(&id);
        let _guard = lock.lock().await;
        // The pool may have been deleted since this round began (its delete listed its warm
        // sandboxes before this row existed): nothing is built for a pool that is gone.
        if !self.pool_exists(&pool.name).await? {
            return Ok(());
        }
        match self.build(rec).await {
            Ok(rec) => {
                // Deleted while this one was built: it is destroyed here, not left running for
                // no one to see.
                if !self.pool_exists(&pool.name).await? {
                    self.store().set_state(&id, SandboxState::Destroyed).await?;
                    self.destroy_on_host(&rec).await?;
                    return Ok(());
                }
                self.store().set_state(&id, SandboxState::Running).await?;
                Ok(())
            }
            Err(e) => {
                // Nothing of it is on the host and no one will ask for it.
                self.store().set_state(&id, SandboxState::Destroyed).await?;
                Err(e)
            }
        }
    }

    async fn pool_exists(&self, name: &str) -> Result<bool, ControlError> {
        Ok(self.store().pools().await?.iter().any(|p| p.name == name))
    }

    async fn destroy_warm(&self, rec: &SandboxRecord) {
        let lock = self.lock_of(&rec.id);
        let _guard = lock.lock().await;
        // Only while still unclaimed: a claim in between made it someone's sandbox.
        match self.store().sandbox(&rec.id).await {
            Ok(Some(r)) if r.owner_id == POOL_OWNER && r.state != SandboxState::Destroyed => {}
            _ => return,
        }
        if let Err(e) = self
            .store()
            .set_state(&rec.id, SandboxState::Destroyed)
            .await
        {
            warn!(sandbox_id = %rec.id, error = %error_chain(&e), "retiring a warm sandbox");
            return;
        }
        if let Err(e) = self.destroy_on_host(rec).await {
            warn!(sandbox_id = %rec.id, error = %error_chain(&e), "destroying a warm sandbox failed; cleaned at the next start");
        }
    }

    /// Under memory pressure, paused sandboxes hibernate before their hot window ends, the
    /// longest-paused first, one per call: hibernating keeps their files and frees their memory.
    pub(crate) async fn relieve_memory_pressure(&self) {
        let Some(avail) = meminfo("MemAvailable:").map(|kib| kib / 1024) else {
            return;
        };
        if avail >= self.hibernate_below_mib {
            return;
        }
        let Ok(live) = self.store().live_sandboxes().await else {
            return;
        };
        let Some(rec) = live
            .into_iter()
            .filter(|r| r.state == SandboxState::Paused)
            .min_by_key(|r| r.paused_at)
        else {
            return;
        };
        info!(sandbox_id = %rec.id, available_mib = avail, floor_mib = self.hibernate_below_mib, "memory pressure; hibernating");
        if let Err(e) = self.hibernate_now(&owner_of(&rec), &rec.id).await {
            warn!(sandbox_id = %rec.id, error = %error_chain(&e), "hibernating under memory pressure failed");
        }
    }
}
