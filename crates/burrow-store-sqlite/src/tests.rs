use super::*;
use burrow_types::{codes, OnTimeout, Plan, RunSpec, RunState};

fn record(id: &str, owner: &str) -> SandboxRecord {
    SandboxRecord {
        id: id.into(),
        owner_id: owner.into(),
        state: SandboxState::Starting,
        image: "system".into(),
        plan: "free".into(),
        hostname: id.into(),
        limits: Plan::defaults()[0].limits.clone(),
        env: BTreeMap::new(),
        metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
        uid_slot: 0,
        runtime: None,
        error: None,
        warm_hit: false,
        created_at: now_rfc3339(),
        timeout_s: Some(60),
        on_timeout: OnTimeout::Pause,
        started_at: 0,
        paused_at: 0,
        network: None,
        pool: None,
        ephemeral: false,
        run: None,
        tool_calls: 0,
    }
}

fn warm(id: &str, pool: &str) -> SandboxRecord {
    SandboxRecord {
        pool: Some(pool.into()),
        ..record(id, POOL_OWNER)
    }
}

fn claim_for(owner: &str) -> Claim {
    Claim {
        owner_id: owner.into(),
        plan: "pro".into(),
        hostname: Some("agent".into()),
        limits: Plan::defaults()[1].limits.clone(),
        env: BTreeMap::from([("TASK".to_string(), "1".to_string())]),
        metadata: BTreeMap::new(),
        timeout_s: None,
        on_timeout: OnTimeout::Destroy,
        ephemeral: true,
        run: None,
    }
}

fn store_with_users() -> SqliteStore {
    let s = SqliteStore::open_in_memory().unwrap();
    s.create_user("u1", "alice", "free", true).unwrap();
    s.create_user("u2", "bob", "free", false).unwrap();
    s
}

#[test]
fn keys_resolve_to_users_only_by_hash() {
    let s = store_with_users();
    s.add_api_key("k1", "u1", "hash-a", "burrow_ab").unwrap();
    assert_eq!(s.user_by_key_hash("hash-a").unwrap().unwrap().name, "alice");
    assert!(s.user_by_key_hash("hash-b").unwrap().is_none());
}

#[test]
fn slots_are_unique_among_live_sandboxes_and_reused_after_destroy() {
    let s = store_with_users();
    assert_eq!(s.insert_sandbox(&record("a", "u1")).unwrap(), 0);
    assert_eq!(s.insert_sandbox(&record("b", "u2")).unwrap(), 1);
    s.set_state("a", SandboxState::Destroyed).unwrap();
    assert_eq!(s.insert_sandbox(&record("c", "u1")).unwrap(), 0);
}

#[test]
fn listing_is_per_owner_and_hides_destroyed() {
    let s = store_with_users();
    s.insert_sandbox(&record("a", "u1")).unwrap();
    s.insert_sandbox(&record("b", "u2")).unwrap();
    s.insert_sandbox(&record("c", "u1")).unwrap();
    s.set_state("c", SandboxState::Destroyed).unwrap();
    let ids: Vec<_> = s
        .sandboxes_of("u1")
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["a"]);
}

#[test]
fn state_runtime_and_error_round_trip() {
    let s = store_with_users();
    s.insert_sandbox(&record("a", "u1")).unwrap();
    s.set_running("a", &serde_json::json!({"pid": 7})).unwrap();
    let r = s.sandbox("a").unwrap().unwrap();
    assert_eq!(r.state, SandboxState::Running);
    assert_eq!(r.runtime.unwrap()["pid"], 7);
    assert_eq!(r.metadata["k"], "v");
    assert_eq!((r.timeout_s, r.on_timeout), (Some(60), OnTimeout::Pause));
    assert!(r.started_at > 0, "set_running records the start");
    s.set_timeout("a", None, OnTimeout::Destroy).unwrap();
    let r = s.sandbox("a").unwrap().unwrap();
    assert_eq!((r.timeout_s, r.on_timeout), (None, OnTimeout::Destroy));
    let reason = ErrorReason {
        code: "sandbox_lost".into(),
        message: "gone".into(),
        limit: None,
        observed: None,
    };
    s.set_error("a", &reason).unwrap();
    let r = s.sandbox("a").unwrap().unwrap();
    assert_eq!(
        (r.state, r.error, r.runtime),
        (SandboxState::Error, Some(reason), None)
    );
}

#[test]
fn reopening_keeps_data_and_skips_applied_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("burrow.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.create_user("u1", "alice", "free", true).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    // alice and the internal pool owner.
    assert_eq!(s.user_count().unwrap(), 2);
}

#[test]
fn a_warm_sandbox_is_claimed_once_and_only_when_ready() {
    let s = store_with_users();
    s.upsert_pool("p", "system", "free", 2).unwrap();
    s.insert_sandbox(&warm("w1", "p")).unwrap();
    s.insert_sandbox(&warm("w2", "p")).unwrap();
    let pools = ["p".to_string()];
    // Still starting: nothing to claim.
    assert!(s.claim_warm(&pools, &claim_for("u1")).unwrap().is_none());
    s.set_running("w1", &serde_json::json!({"pid": 1})).unwrap();
    s.set_running("w2", &serde_json::json!({"pid": 2})).unwrap();
    let counts = s.pool_counts().unwrap();
    assert_eq!((counts["p"].ready, counts["p"].starting), (2, 0));
    // Pool names are bound as a parameter, never pasted into the SQL.
    let sneaky = ["x') OR ('1'='1".to_string()];
    assert!(s.claim_warm(&sneaky, &claim_for("u1")).unwrap().is_none());

    let a = s.claim_warm(&pools, &claim_for("u1")).unwrap().unwrap();
    let b = s
        .claim_warm(
            &pools,
            &Claim {
                hostname: None,
                ..claim_for("u2")
            },
        )
        .unwrap()
        .unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(b.hostname, b.id, "no hostname asked: the id stays");
    assert!(s.claim_warm(&pools, &claim_for("u1")).unwrap().is_none());
    assert!(s
        .claim_warm(&["other".to_string()], &claim_for("u1"))
        .unwrap()
        .is_none());
    assert_eq!(
        (
            a.owner_id.as_str(),
            a.state,
            a.warm_hit,
            a.plan.as_str(),
            a.hostname.as_str()
        ),
        ("u1", SandboxState::Starting, true, "pro", "agent")
    );
    assert_eq!(
        (a.env["TASK"].as_str(), a.ephemeral, a.pool.as_deref()),
        ("1", true, Some("p"))
    );
    assert_eq!(a.runtime.unwrap()["pid"], 1, "the computer is the warm one");
    assert_eq!(
        s.pool_counts()
            .unwrap()
            .get("p")
            .map(|c| c.ready)
            .unwrap_or(0),
        0
    );
    assert_eq!(s.sandboxes_of("u1").unwrap().len(), 1);
}

#[test]
fn pool_uses_count_into_totals_and_the_daily_hit_rate() {
    let s = store_with_users();
    s.upsert_pool("p", "system", "free", 3).unwrap();
    s.record_pool_use("p", true).unwrap();
    s.record_pool_use("p", true).unwrap();
    s.record_pool_use("p", false).unwrap();
    let p = &s.pools().unwrap()[0];
    assert_eq!((p.size, p.claims, p.cold_fallbacks), (3, 2, 1));
    let c = &s.pool_counts().unwrap()["p"];
    assert_eq!((c.hits_24h, c.misses_24h), (2, 1));
    s.upsert_pool("p", "system", "pro", 5).unwrap();
    let p = &s.pools().unwrap()[0];
    assert_eq!(
        (p.plan.as_str(), p.size, p.claims),
        ("pro", 5, 2),
        "resizing keeps counters"
    );
    assert!(s.delete_pool("p").unwrap());
    assert!(!s.delete_pool("p").unwrap());
    assert!(s.pools().unwrap().is_empty());
}

#[test]
fn tool_calls_count_up_and_a_new_run_starts_at_zero() {
    let s = store_with_users();
    s.insert_sandbox(&record("a", "u1")).unwrap();
    assert_eq!(s.count_tool_call("a").unwrap(), 1);
    assert_eq!(s.count_tool_call("a").unwrap(), 2);
    let run = RunRecord {
        spec: RunSpec {
            task: "t".into(),
            ..Default::default()
        },
        state: RunState::Active,
        ended: None,
    };
    s.set_run("a", &run, false).unwrap();
    assert_eq!(s.sandbox("a").unwrap().unwrap().tool_calls, 2);
    s.set_run("a", &run, true).unwrap();
    let r = s.sandbox("a").unwrap().unwrap();
    assert_eq!((r.tool_calls, r.run), (0, Some(run)));
}

#[test]
fn an_intent_lasts_until_the_next_settled_state() {
    let s = store_with_users();
    s.insert_sandbox(&record("a", "u1")).unwrap();
    s.insert_sandbox(&record("b", "u1")).unwrap();
    s.set_running("a", &serde_json::json!({"pid": 1})).unwrap();
    s.set_intent("a", Some(Intent::Pausing)).unwrap();
    s.set_intent("b", Some(Intent::Destroying)).unwrap();
    assert_eq!(
        s.intents().unwrap(),
        BTreeMap::from([
            ("a".to_string(), Intent::Pausing),
            ("b".to_string(), Intent::Destroying)
        ])
    );
    // The write that settles a state clears the intent; the state itself is untouched until then.
    assert_eq!(
        s.sandbox("a").unwrap().unwrap().state,
        SandboxState::Running
    );
    s.set_paused("a").unwrap();
    s.set_state("b", SandboxState::Destroyed).unwrap();
    assert!(s.intents().unwrap().is_empty());
    // A failed resume: hibernated, with why; a later start clears the reason.
    s.set_intent("a", Some(Intent::Resuming)).unwrap();
    let why = ErrorReason {
        code: "resume_failed".into(),
        message: "no".into(),
        limit: None,
        observed: None,
    };
    s.set_hibernated_error("a", &why).unwrap();
    let r = s.sandbox("a").unwrap().unwrap();
    assert_eq!((r.state, r.error), (SandboxState::Hibernated, Some(why)));
    assert!(s.intents().unwrap().is_empty());
    s.set_running("a", &serde_json::json!({"pid": 2})).unwrap();
    assert_eq!(s.sandbox("a").unwrap().unwrap().error, None);
}

#[test]
fn promised_disks_count_every_sandbox_that_holds_one() {
    let s = store_with_users();
    let disk = Plan::defaults()[0].limits.disk_mib;
    for id in ["a", "b", "c", "d"] {
        s.insert_sandbox(&record(id, "u1")).unwrap();
    }
    s.set_hibernated("b").unwrap();
    s.set_state("c", SandboxState::Destroyed).unwrap();
    let why = ErrorReason {
        code: "create_interrupted".into(),
        message: "x".into(),
        limit: None,
        observed: None,
    };
    s.set_error("d", &why).unwrap();
    assert_eq!(s.promised_disk_mib().unwrap(), 2 * disk);
}

#[test]
fn warm_sandboxes_of_pools_that_are_gone_are_found() {
    let s = store_with_users();
    for (id, pool) in [("w1", "kept"), ("w2", "gone"), ("w3", "gone")] {
        s.insert_sandbox(&warm(id, pool)).unwrap();
    }
    s.set_running("w1", &serde_json::json!({"pid": 1})).unwrap();
    s.set_running("w2", &serde_json::json!({"pid": 2})).unwrap();
    // w3 is still being built: its builder checks the pool itself.
    let ids: Vec<_> = s
        .warm_sandboxes_outside(&["kept".to_string()])
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["w2"]);
}

#[test]
fn no_slot_past_the_top_of_the_uid_ranges_is_handed_out() {
    let top = burrow_types::limits::UID_SLOTS;
    let mut used: BTreeSet<u32> = (0..top).filter(|s| *s != top - 1).collect();
    assert_eq!(
        free_slot(&used, top),
        Some(top - 1),
        "the top slot is usable"
    );
    used.insert(top - 1);
    assert_eq!(
        free_slot(&used, top),
        None,
        "a slot past the top was handed out"
    );
    used.remove(&7);
    assert_eq!(free_slot(&used, top), Some(7));
}

fn file_store() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("burrow.db");
    let s = SqliteStore::open(&path).unwrap();
    s.create_user("u1", "alice", "free", true).unwrap();
    (dir, path, s)
}

#[test]
fn the_database_and_its_companions_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path, s) = file_store();
    s.insert_sandbox(&record("a", "u1")).unwrap();
    for p in [path.clone(), sidecar(&path, "-wal"), sidecar(&path, "-shm")] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
    }
    // A database an older server made world-readable is made private at the next open.
    drop(s);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _s = SqliteStore::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_foreign_write_lock_makes_writes_busy_quickly_while_reads_go_on() {
    let (_dir, path, s) = file_store();
    s.insert_sandbox(&record("a", "u1")).unwrap();
    // Another connection (SQLite locks per file, so it contends like another process would).
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let t = std::time::Instant::now();
    let e = s.set_state("a", SandboxState::Running).unwrap_err();
    assert!(e.is_busy(), "{e:?}");
    assert_eq!(e.unavailable_code(), Some(codes::DATABASE_BUSY));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "a write waited {:?} for a foreign lock",
        t.elapsed()
    );
    // The next writes do not queue behind the lock either, and reads are served meanwhile.
    assert!(s
        .set_state("a", SandboxState::Running)
        .unwrap_err()
        .is_busy());
    assert_eq!(
        s.sandbox("a").unwrap().unwrap().state,
        SandboxState::Starting
    );
    assert_eq!(s.sandboxes_of("u1").unwrap().len(), 1);
    let h = s.health();
    assert!(!h.writable);
    assert_eq!(h.problem.as_ref().map(|p| p.0), Some(codes::DATABASE_BUSY));
    other.execute_batch("ROLLBACK").unwrap();
    // Health is probed at most once a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    s.set_state("a", SandboxState::Running).unwrap();
    assert!(s.health().writable, "{:?}", s.health());
}

#[test]
fn idempotency_keys_hold_one_request_per_user_and_key() {
    let (_dir, _path, s) = file_store();
    s.create_user("u2", "bob", "free", false).unwrap();
    assert_eq!(
        s.claim_idempotency_key("u1", "k", "fp1", "sb1").unwrap(),
        IdempotencyClaim::Reserved
    );
    // Another user's key of the same name is another key.
    assert_eq!(
        s.claim_idempotency_key("u2", "k", "fp9", "sb9").unwrap(),
        IdempotencyClaim::Reserved
    );
    assert_eq!(
        s.claim_idempotency_key("u1", "k", "fp1", "sb2").unwrap(),
        IdempotencyClaim::Seen {
            same_request: true,
            sandbox_id: "sb1".into(),
            done: false
        }
    );
    s.finish_idempotency_key("u1", "k", "warm1").unwrap();
    assert_eq!(
        s.claim_idempotency_key("u1", "k", "fp2", "sb3").unwrap(),
        IdempotencyClaim::Seen {
            same_request: false,
            sandbox_id: "warm1".into(),
            done: true
        }
    );
    // A failed create lets the key go; a finished one keeps it.
    s.release_idempotency_key("u1", "k").unwrap();
    assert!(s.idempotency_key("u1", "k").unwrap().is_some());
    s.claim_idempotency_key("u1", "other", "fp", "sb4").unwrap();
    s.release_idempotency_key("u1", "other").unwrap();
    assert!(s.idempotency_key("u1", "other").unwrap().is_none());
    // At start, a pending key with a sandbox row answers with it; one without is forgotten.
    s.insert_sandbox(&record("sb5", "u1")).unwrap();
    s.claim_idempotency_key("u1", "made", "fp", "sb5").unwrap();
    s.claim_idempotency_key("u1", "lost", "fp", "sb6").unwrap();
    // (bob's pending "k" had no sandbox row either.)
    assert_eq!(s.settle_idempotency_keys().unwrap(), (1, 2));
    assert_eq!(
        s.idempotency_key("u1", "made").unwrap(),
        Some(("fp".into(), "sb5".into(), true))
    );
    assert!(s.idempotency_key("u1", "lost").unwrap().is_none());
}

#[test]
fn usage_counts_what_live_sandboxes_were_promised() {
    let (_dir, _path, s) = file_store();
    let free = Plan::defaults()[0].limits.clone();
    for id in ["a", "b", "c", "d"] {
        s.insert_sandbox(&record(id, "u1")).unwrap();
    }
    s.insert_sandbox(&warm("w", "p")).unwrap();
    s.set_state("b", SandboxState::Hibernated).unwrap();
    s.set_state("c", SandboxState::Destroyed).unwrap();
    s.set_error(
        "d",
        &burrow_types::ErrorReason {
            code: "x".into(),
            message: "x".into(),
            limit: None,
            observed: None,
        },
    )
    .unwrap();
    let u = s.usage_of("u1", &[]).unwrap();
    assert_eq!(
        u,
        Usage {
            sandboxes: 2,
            memory_mib: 2 * free.memory_mib,
            disk_mib: 2 * free.disk_mib
        }
    );
    assert_eq!(s.usage_of("u1", &["a".into()]).unwrap().sandboxes, 1);
    // Pids are promised host-wide: warm sandboxes count.
    assert_eq!(s.promised_pids(&[]).unwrap(), 3 * u64::from(free.pids));
    assert_eq!(
        s.promised_pids(&["w".into()]).unwrap(),
        2 * u64::from(free.pids)
    );
    let q = burrow_types::Quota {
        sandboxes: Some(3),
        ..Default::default()
    };
    assert_eq!(s.user_quota("u1").unwrap(), None);
    s.set_user_quota("u1", Some(&q)).unwrap();
    assert_eq!(s.user_quota("u1").unwrap(), Some(q));
    s.set_user_quota("u1", None).unwrap();
    assert_eq!(s.user_quota("u1").unwrap(), None);
}
