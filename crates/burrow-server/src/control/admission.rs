//! Admission of creates: what is checked before a create makes anything (so a refusal leaves
//! nothing half-made). Owns idempotency keys (a repeat answers with the first create's sandbox),
//! per-user quotas (live sandboxes, memory and disk promised, creates per second: `429`) and the
//! host's pid budget (the pid limits of every live sandbox stay under `pid_max` minus a reserve for
//! the host: `503`, the host is full, not the user).
//!
//! Quotas and the budget count what the store holds plus the creates in flight that are not in the
//! store yet, under one lock, so concurrent creates cannot all squeeze under the same cap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burrow_store::{IdempotencyClaim, User};
use burrow_types::{codes, CreateSandbox, Limits, Plan, Quota, Sandbox};
use serde_json::json;

use super::{Control, ControlError};
use crate::auth::new_id;

/// How long a repeat waits for the first request with its key to finish.
const IDEMPOTENCY_WAIT: Duration = Duration::from_secs(120);
/// Pids kept for the host when the operator sets no reserve: an eighth of `pid_max`, at least 2048.
pub fn default_pid_reserve(pid_max: u64) -> u64 {
    (pid_max / 8).max(2048)
}

/// `/proc/sys/kernel/pid_max`: how many pids the host has in all.
pub fn host_pid_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// An `Idempotency-Key` and what the request that carried it was, so the same key with another
/// request can be told apart.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    /// A hash of the request as the transport parsed it (and of which API it came through).
    pub fingerprint: String,
}

/// A create's answer: the sandbox, and whether it was made by an earlier request with the same
/// idempotency key.
#[derive(Debug, Clone)]
pub struct Created {
    pub sandbox: Sandbox,
    pub replayed: bool,
}

/// One create in flight that the store may not show yet.
struct InFlight {
    owner: String,
    sandbox_id: String,
    limits: Limits,
    /// It will build a computer (cold or warm build), so its pids count against the budget; a
    /// create that claims a warm sandbox adds none.
    builds: bool,
}

/// Per-user token buckets for creates per second.
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub(crate) struct Admission {
    /// Serialises check-and-reserve, so two creates never both take the last unit of a cap.
    gate: tokio::sync::Mutex<()>,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    next_ticket: std::sync::atomic::AtomicU64,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Sum of pid limits the host's sandboxes may be promised; `None`: no budget.
    pid_budget: Option<PidBudget>,
}

#[derive(Debug, Clone, Copy)]
pub struct PidBudget {
    pub pid_max: u64,
    pub reserve: u64,
}

impl PidBudget {
    fn budget(&self) -> u64 {
        self.pid_max.saturating_sub(self.reserve)
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            gate: tokio::sync::Mutex::new(()),
            in_flight: Mutex::default(),
            next_ticket: std::sync::atomic::AtomicU64::new(0),
            buckets: Mutex::default(),
            pid_budget: host_pid_max().map(|pid_max| PidBudget {
                pid_max,
                reserve: default_pid_reserve(pid_max),
            }),
        }
    }
}

/// Held by an admitted create until it is in the store (or failed); dropping it lets the next
/// admission count it from the store instead.
pub(crate) struct Ticket<'a> {
    admission: &'a Admission,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        lock(&self.admission.in_flight).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps updated in single statements: a panic elsewhere cannot leave them half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    pub(crate) fn with_pid_budget(mut self, budget: Option<PidBudget>) -> Admission {
        self.pid_budget = budget;
        self
    }

    /// Ids of creates in flight that count themselves (for one owner, or those that build).
    fn in_flight_ids(&self, which: impl Fn(&InFlight) -> bool) -> Vec<String> {
        lock(&self.in_flight)
            .values()
            .filter(|f| which(f))
            .map(|f| f.sandbox_id.clone())
            .collect()
    }

    fn reserve(&self, owner: &str, sandbox_id: &str, limits: &Limits, builds: bool) -> Ticket<'_> {
        let id = self
            .next_ticket
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.in_flight).insert(
            id,
            InFlight {
                owner: owner.to_string(),
                sandbox_id: sandbox_id.to_string(),
                limits: limits.clone(),
                builds,
            },
        );
        Ticket {
            admission: self,
            id,
        }
    }

    /// Takes one create token from `user`'s bucket, or says in how many seconds one is there.
    fn take_token(&self, user: &str, per_s: u32) -> Result<(), u64> {
        let rate = f64::from(per_s);
        let mut buckets = lock(&self.buckets);
        let now = Instant::now();
        let b = buckets.entry(user.to_string()).or_insert(Bucket {
            tokens: rate.max(1.0),
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate.max(1.0));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        if rate <= 0.0 {
            return Err(60);
        }
        Err((((1.0 - b.tokens) / rate).ceil() as u64).max(1))
    }
}

/// A quota or budget refusal, with the structured reason the API shows.
fn refusal(
    code: &str,
    quota: &str,
    limit: u64,
    observed: u64,
    message: String,
) -> serde_json::Value {
    json!({
        "code": code,
        "quota": quota,
        "limit": limit,
        "observed": observed,
        "message": message,
    })
}

impl Control {
    /// What a plan's quota is (`None`: no such plan).
    pub fn plan_quota(&self, plan: &str) -> Option<Quota> {
        self.plan(plan).map(|p| p.quota.clone())
    }

    /// The quota that applies to `user`: their plan's, with the operator's per-user override.
    pub async fn quota_of(&self, user: &User) -> Result<Quota, ControlError> {
        let plan = self
            .plan(&user.plan)
            .map(|p| p.quota.clone())
            .unwrap_or_default();
        Ok(match self.store().user_quota(&user.id).await? {
            Some(over) => plan.overridden_by(&over),
            None => plan,
        })
    }

    /// Admits a create of a `plan` sandbox (id `sandbox_id`, if it is built cold) for `user`, or
    /// refuses it with `QuotaExceeded` past one of the user's quotas. The ticket counts the create
    /// until it is dropped; before a cold build, [`Control::admit_build`] checks the host.
    pub(crate) async fn admit(
        &self,
        user: &User,
        plan: &Plan,
        sandbox_id: &str,
    ) -> Result<Ticket<'_>, ControlError> {
        let adm = &self.admission;
        let _gate = adm.gate.lock().await;
        let limits = &plan.limits;
        let quota = self.quota_of(user).await?;
        let mine = adm.in_flight_ids(|f| f.owner == user.id);
        let mut used = self.store().usage_of(&user.id, &mine).await?;
        for f in lock(&adm.in_flight).values().filter(|f| f.owner == user.id) {
            used.sandboxes += 1;
            used.memory_mib += f.limits.memory_mib;
            used.disk_mib += f.limits.disk_mib;
        }
        let checks = [
            (
                "sandboxes",
                quota.sandboxes.map(u64::from),
                used.sandboxes + 1,
                "live sandboxes",
            ),
            (
                "memory_mib",
                quota.memory_mib,
                used.memory_mib + limits.memory_mib,
                "MiB of memory promised to live sandboxes",
            ),
            (
                "disk_mib",
                quota.disk_mib,
                used.disk_mib + limits.disk_mib,
                "MiB of disk promised to live sandboxes",
            ),
        ];
        for (name, limit, after, what) in checks {
            if let Some(limit) = limit.filter(|l| after > *l) {
                return Err(ControlError::QuotaExceeded {
                    details: refusal(
                        codes::QUOTA_EXCEEDED,
                        name,
                        limit,
                        after,
                        format!(
                            "quota {name}: your quota allows {limit} {what}; this create would make it {after}"
                        ),
                    ),
                    retry_after_s: 30,
                });
            }
        }
        if let Some(per_s) = quota.creates_per_s {
            if let Err(wait) = adm.take_token(&user.id, per_s) {
                return Err(ControlError::QuotaExceeded {
                    details: refusal(
                        codes::QUOTA_EXCEEDED,
                        "creates_per_s",
                        u64::from(per_s),
                        u64::from(per_s) + 1,
                        format!(
                            "quota creates_per_s: your quota allows {per_s} creates per second; try again in {wait} s"
                        ),
                    ),
                    retry_after_s: wait,
                });
            }
        }
        Ok(adm.reserve(&user.id, sandbox_id, limits, false))
    }

    /// Before a computer is built for an admitted create: refuses with `HostFull` when the pid
    /// limits of every live sandbox, creates in flight included, would pass the host's budget.
    pub(crate) async fn admit_build(&self, ticket: &Ticket<'_>) -> Result<(), ControlError> {
        let adm = &self.admission;
        let Some(b) = adm.pid_budget else {
            return Ok(());
        };
        let _gate = adm.gate.lock().await;
        let (limits, others) = {
            let flying = lock(&adm.in_flight);
            let Some(me) = flying.get(&ticket.id) else {
                return Ok(());
            };
            let others: u64 = flying
                .iter()
                .filter(|(id, f)| f.builds && **id != ticket.id)
                .map(|(_, f)| u64::from(f.limits.pids))
                .sum();
            (me.limits.clone(), others)
        };
        let building = adm.in_flight_ids(|f| f.builds);
        let promised = self.store().promised_pids(&building).await? + others;
        let after = promised + u64::from(limits.pids);
        if after > b.budget() {
            return Err(ControlError::HostFull(refusal(
                codes::HOST_FULL,
                "pids",
                b.budget(),
                after,
                format!(
                    "the host is full: sandboxes may be promised {} pids in all (pid_max {} minus {} kept for \
                     the host); its live sandboxes hold {promised} and this one asks {}",
                    b.budget(),
                    b.pid_max,
                    b.reserve,
                    limits.pids
                ),
            )));
        }
        if let Some(f) = lock(&adm.in_flight).get_mut(&ticket.id) {
            f.builds = true;
        }
        Ok(())
    }

    /// Whether the host's pid budget has room for a warm sandbox of `limits` (the replenisher
    /// asks before each build); the ticket counts it until it is in the store.
    pub(crate) async fn admit_warm(
        &self,
        limits: &Limits,
        sandbox_id: &str,
    ) -> Result<Ticket<'_>, ControlError> {
        let ticket = {
            let _gate = self.admission.gate.lock().await;
            self.admission
                .reserve(burrow_store::POOL_OWNER, sandbox_id, limits, false)
        };
        self.admit_build(&ticket).await?;
        Ok(ticket)
    }

    /// A create, made once per idempotency key: a repeat with the same request answers with the
    /// first one's sandbox (waiting for it if it is still being made), the same key with another
    /// request is refused. Without a key, an ordinary create.
    pub(crate) async fn create_once(
        &self,
        user: &User,
        req: CreateSandbox,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, ControlError> {
        let id = new_id(20);
        let Some(key) = key else {
            return Ok(Created {
                sandbox: self.create_now(user, req, id).await?,
                replayed: false,
            });
        };
        let deadline = Instant::now() + IDEMPOTENCY_WAIT;
        loop {
            match self
                .store()
                .claim_idempotency_key(&user.id, &key.key, &key.fingerprint, &id)
                .await?
            {
                IdempotencyClaim::Reserved => break,
                IdempotencyClaim::Seen {
                    same_request: false,
                    ..
                } => return Err(ControlError::IdempotencyKeyReused),
                IdempotencyClaim::Seen {
                    done: true,
                    sandbox_id,
                    ..
                } => {
                    return Ok(Created {
                        sandbox: self.replay(user, &sandbox_id).await?,
                        replayed: true,
                    })
                }
                IdempotencyClaim::Seen { done: false, .. } => {
                    // The first request is still making it: wait until it is done, or until it
                    // failed and let the key go (then this one makes it).
                    loop {
                        if Instant::now() >= deadline {
                            return Err(ControlError::IdempotencyInProgress);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        match self.store().idempotency_key(&user.id, &key.key).await? {
                            Some((_, _, false)) => continue,
                            _ => break,
                        }
                    }
                }
            }
        }
        match self.create_now(user, req, id).await {
            Ok(sandbox) => {
                if let Err(e) = self
                    .store()
                    .finish_idempotency_key(&user.id, &key.key, &sandbox.id)
                    .await
                {
                    // The sandbox exists: a retry waits for the key, and the next start settles
                    // it with this sandbox.
                    tracing::warn!(sandbox_id = %sandbox.id, error = %super::error_chain(&e), "recording an idempotency key");
                }
                Ok(Created {
                    sandbox,
                    replayed: false,
                })
            }
            Err(e) => {
                if let Err(e) = self
                    .store()
                    .release_idempotency_key(&user.id, &key.key)
                    .await
                {
                    tracing::warn!(error = %super::error_chain(&e), "releasing an idempotency key; it is settled at the next start");
                }
                Err(e)
            }
        }
    }

    /// The sandbox an earlier create with the same key made, as it is now.
    async fn replay(&self, user: &User, sandbox_id: &str) -> Result<Sandbox, ControlError> {
        match self.store().sandbox(sandbox_id).await? {
            Some(rec) if rec.owner_id == user.id => Ok(self.api(&rec)),
            _ => Err(ControlError::NotFound),
        }
    }
}
