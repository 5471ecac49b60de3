//! Where a request's time goes: named stages (store writes, disk, cgroups, namespaces, overlay,
//! guest start, ...) and CPU time, collected per request and returned to a client that asks for
//! them in a `Server-Timing` header (`burrow bench --breakdown` does). Every stage is also a
//! `tracing` event (target `burrow::timing`, its name and microseconds) whether or not anyone
//! collects it.
//!
//! A request's [`Timings`] travel with it: a task-local inside the server's async tasks
//! ([`scope`]), a thread-local inside the blocking threads that build sandboxes
//! ([`scope_blocking`]); `burrow __init` reports its own stages in its reply. Code that records a
//! stage outside any scope (a warm pool's replenisher) records nothing but the event.

use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The stages of one request, in the order they were first recorded; a stage recorded twice
/// (three store writes) adds up.
#[derive(Debug, Clone, Default)]
pub struct Timings(Arc<Mutex<Vec<(String, Duration)>>>);

tokio::task_local! {
    static TASK: Timings;
}

thread_local! {
    static THREAD: RefCell<Option<Timings>> = const { RefCell::new(None) };
}

impl Timings {
    pub fn new() -> Timings {
        Timings::default()
    }

    pub fn add(&self, name: &str, took: Duration) {
        let Ok(mut v) = self.0.lock() else { return };
        match v.iter_mut().find(|(n, _)| n == name) {
            Some((_, d)) => *d += took,
            None => v.push((name.to_string(), took)),
        }
    }

    pub fn stages(&self) -> Vec<(String, Duration)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The `Server-Timing` header value: `name;dur=<ms>` for each stage.
    pub fn header_value(&self) -> String {
        self.stages()
            .iter()
            .map(|(n, d)| format!("{n};dur={:.3}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The timings of the request this code runs for, if any collects them.
pub fn current() -> Option<Timings> {
    THREAD
        .with(|t| t.borrow().clone())
        .or_else(|| TASK.try_with(|t| t.clone()).ok())
}

/// Records that stage `name` took `took`.
pub fn record(name: &str, took: Duration) {
    tracing::debug!(target: "burrow::timing", stage = name, us = took.as_micros() as u64);
    if let Some(t) = current() {
        t.add(name, took);
    }
}

/// A stage timed until it is dropped.
#[must_use = "the stage ends when this is dropped"]
pub struct Stage {
    name: &'static str,
    started: Instant,
}

pub fn stage(name: &'static str) -> Stage {
    Stage {
        name,
        started: Instant::now(),
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        record(self.name, self.started.elapsed());
    }
}

/// Runs `f` with `timings` as its task's timings (nothing when `None`).
pub async fn scope<F: Future>(timings: Option<Timings>, f: F) -> F::Output {
    match timings {
        Some(t) => TASK.scope(t, f).await,
        None => f.await,
    }
}

/// Runs the blocking `f` with `timings` as this thread's timings (a blocking thread of the pool
/// serves many requests: the previous value comes back afterwards).
pub fn scope_blocking<R>(timings: Option<Timings>, f: impl FnOnce() -> R) -> R {
    let before = THREAD.with(|t| t.replace(timings));
    let r = f();
    THREAD.with(|t| *t.borrow_mut() = before);
    r
}

/// CPU time (user + system) of the calling thread so far.
pub fn thread_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_THREAD)
}

/// CPU time (user + system) of this process (`RUSAGE_SELF`) or of its waited-for children
/// (`RUSAGE_CHILDREN`) so far.
pub fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own and reads nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut ru) != 0 {
            return Duration::ZERO;
        }
        ru
    };
    cpu_of(&ru)
}

pub(crate) fn cpu_of(ru: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_and_survive_the_header() {
        let t = Timings::new();
        scope_blocking(Some(t.clone()), || {
            record("store", Duration::from_micros(1500));
            record("disk", Duration::from_millis(10));
            record("store", Duration::from_micros(500));
        });
        // Outside the scope nothing is collected.
        record("store", Duration::from_secs(1));
        assert_eq!(t.header_value(), "store;dur=2.000, disk;dur=10.000");
    }

    #[tokio::test]
    async fn a_task_scope_collects_what_its_code_records() {
        let t = Timings::new();
        scope(Some(t.clone()), async {
            let _s = stage("guest");
        })
        .await;
        assert_eq!(t.stages().len(), 1);
        assert_eq!(t.stages()[0].0, "guest");
    }
}
