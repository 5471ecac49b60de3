//! The background thread that empties the trash: a destroy renames a volume into `trash/` and
//! nudges it; it deletes what is there (a subvolume delete evicts cached inodes synchronously,
//! ~100 ms for 100 MiB, which must not be on a request's path). It also wakes every 30 s, for
//! what a crash or a failed delete left.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const IDLE_WAKE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    pending: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// Handle of the thread; dropping it stops the thread after the delete in progress.
pub(crate) struct Purger {
    shared: Arc<Shared>,
}

impl Purger {
    /// Starts a thread that calls `purge` when nudged (and every 30 s).
    pub(crate) fn spawn(name: &str, purge: impl Fn() + Send + 'static) -> std::io::Result<Purger> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || loop {
                {
                    let Ok(mut st) = s.state.lock() else { return };
                    if !st.pending && !st.stop {
                        st = match s.wake.wait_timeout(st, IDLE_WAKE) {
                            Ok((g, _)) => g,
                            Err(_) => return,
                        };
                    }
                    if st.stop {
                        return;
                    }
                    st.pending = false;
                }
                purge();
            })?;
        Ok(Purger { shared })
    }

    pub(crate) fn nudge(&self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.pending = true;
            self.shared.wake.notify_one();
        }
    }
}

/// Where a storage keeps its purge thread: started by the first `prepare`, nudged by every delete.
#[derive(Default)]
pub(crate) struct PurgeSlot(Mutex<Option<Purger>>);

impl PurgeSlot {
    /// Starts the thread (once; not at all unless `enabled`) and nudges it if `pending`.
    pub(crate) fn start(
        &self,
        enabled: bool,
        pending: bool,
        purge: impl Fn() -> Result<usize, crate::StorageError> + Send + 'static,
    ) -> Result<(), crate::StorageError> {
        let mut slot = self.0.lock().map_err(|_| {
            crate::StorageError::PoolUnavailable("the purge lock is poisoned".into())
        })?;
        if enabled && slot.is_none() {
            *slot = Some(
                Purger::spawn("burrow-storage-purge", move || {
                    if let Err(e) = purge() {
                        tracing::warn!(error = %e, "storage: purge failed");
                    }
                })
                .map_err(crate::io_err("starting the purge thread"))?,
            );
        }
        if pending {
            if let Some(p) = slot.as_ref() {
                p.nudge();
            }
        }
        Ok(())
    }

    pub(crate) fn nudge(&self) {
        if let Ok(p) = self.0.lock() {
            if let Some(p) = p.as_ref() {
                p.nudge();
            }
        }
    }

    /// Stops the thread (after the delete in progress).
    pub(crate) fn stop(&self) {
        drop(self.0.lock().ok().and_then(|mut p| p.take()));
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
            self.shared.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_nudge_runs_the_purge_and_drop_stops_the_thread() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let p = Purger::spawn("test-purger", move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        p.nudge();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while n.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the purge never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(p);
        // The thread holds the closure (and with it `m`) until it ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&n) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread did not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
