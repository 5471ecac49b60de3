use super::*;
use burrow_types::{OnTimeout, Plan};

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
    }
}

fn store_with_users() -> Store {
    let s = Store::open_in_memory().unwrap();
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
        let s = Store::open(&path).unwrap();
        s.create_user("u1", "alice", "free", true).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.user_count().unwrap(), 1);
}
