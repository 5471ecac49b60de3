//! Everything the bench made on the server, so it can all be removed at the end whatever happened:
//! success, an error half-way, or Ctrl-C. Every sandbox the bench creates carries the metadata
//! `burrow_bench=<run id>`, so even a create whose answer never arrived is found by listing. The peers clean up after themselves (RAII guards in `peers.rs`); here we only wait for
//! their thread to finish doing so.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_client::{Client, ClientError};

pub const TAG_KEY: &str = "burrow_bench";

pub struct Cleanup {
    /// The value of `burrow_bench` on this run's sandboxes.
    pub run_id: String,
    sandboxes: Mutex<BTreeSet<String>>,
    pools: Mutex<BTreeSet<String>>,
    /// Set on Ctrl-C/SIGTERM: the bench stops at its next step. Requests in flight are let
    /// finish rather than dropped, so the server never sees a create cut off half-way.
    pub stop: Arc<AtomicBool>,
    blocking: Arc<AtomicUsize>,
}

/// Held by a blocking thread (the peers) while it may still have things to undo.
pub struct BlockingWork(Arc<AtomicUsize>);

impl Drop for BlockingWork {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Cleanup {
    pub fn new() -> Cleanup {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Cleanup {
            run_id: format!("{}-{}", std::process::id(), now.as_millis()),
            sandboxes: Mutex::default(),
            pools: Mutex::default(),
            stop: Arc::default(),
            blocking: Arc::default(),
        }
    }

    pub fn sandbox(&self, id: &str) {
        self.sandboxes.lock().unwrap().insert(id.to_string());
    }

    pub fn sandbox_gone(&self, id: &str) {
        self.sandboxes.lock().unwrap().remove(id);
    }

    pub fn pool(&self, name: &str) {
        self.pools.lock().unwrap().insert(name.to_string());
    }

    pub fn pool_gone(&self, name: &str) {
        self.pools.lock().unwrap().remove(name);
    }

    /// An error once the bench has been told to stop.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            anyhow::bail!("interrupted");
        }
        Ok(())
    }

    pub fn blocking_work(&self) -> BlockingWork {
        self.blocking.fetch_add(1, Ordering::SeqCst);
        BlockingWork(self.blocking.clone())
    }

    /// Removes what is left; returns what could not be removed.
    pub async fn finish(&self, client: &Client) -> Vec<String> {
        let mut problems = Vec::new();
        // Peers first: their thread undoes its mounts and containers once it sees `stop`.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.blocking.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                problems.push("the peers' thread did not finish cleaning up in 60 s".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pools: Vec<String> = self.pools.lock().unwrap().iter().cloned().collect();
        for name in pools {
            match delete_pool(client, &name).await {
                Ok(()) => self.pool_gone(&name),
                Err(e) => problems.push(format!("pool {name}: {e}")),
            }
        }
        // Until two passes in a row find nothing: a create cut off in flight may still finish on
        // the server (or still be starting and refuse the delete) after the first pass.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut quiet_passes = 0;
        let mut last_errors = Vec::new();
        while quiet_passes < 2 {
            let mut ids: BTreeSet<String> = self.sandboxes.lock().unwrap().clone();
            if let Ok(list) = client.list().await {
                ids.extend(
                    list.into_iter()
                        .filter(|s| s.metadata.get(TAG_KEY) == Some(&self.run_id))
                        .map(|s| s.id),
                );
            }
            quiet_passes = if ids.is_empty() { quiet_passes + 1 } else { 0 };
            last_errors.clear();
            for id in ids {
                match client.delete(&id).await {
                    Ok(()) => self.sandbox_gone(&id),
                    Err(e) if e.code() == Some("sandbox_not_found") => self.sandbox_gone(&id),
                    Err(e) => last_errors.push(format!("sandbox {id}: {e:#}")),
                }
            }
            if Instant::now() > deadline {
                problems.append(&mut last_errors);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        problems
    }
}

/// Removes a pool and its unclaimed sandboxes; one already gone counts as removed.
pub async fn delete_pool(client: &Client, name: &str) -> anyhow::Result<()> {
    match client.delete_pool(name).await {
        Err(ClientError::Api { status: 404, .. }) | Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
