//! The store's connections: one writer and a few WAL readers, each handed out for one call and
//! taken back after it. Owns how long a caller may wait for SQLite (a connection slot, a lock held
//! by another process) and what the store's health is.
//!
//! Every wait is bounded: a caller waits at most [`SLOT_WAIT`] for a free connection, then at most
//! [`BUSY_WAIT`] for a lock another process holds, so the writer is never held for long while
//! SQLite waits. Once a write has found the database locked, the next writes within
//! [`BUSY_MEMORY`] try the lock once instead of waiting: a queue of writers behind a foreign lock
//! answers `busy` at once instead of each waiting its turn.

use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use burrow_store::{StoreError, StoreHealth};

use crate::Error;

/// How long a caller waits for a free connection of its kind.
pub const SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long a statement waits for a lock held by another process (SQLite's busy timeout).
pub const BUSY_WAIT: Duration = Duration::from_millis(250);
/// After a write found the database locked, writes try once (no busy wait) for this long.
const BUSY_MEMORY: Duration = Duration::from_secs(1);
/// How long a health probe's answer is reused (health needs no key: a flood of it must not
/// keep the writer busy).
const HEALTH_TTL: Duration = Duration::from_millis(250);
/// WAL readers: reads never queue behind the writer (or behind each other, mostly).
pub const READERS: usize = 4;

/// Connections of one kind, handed out one call at a time.
pub(crate) struct Slots {
    free: Mutex<Vec<Connection>>,
    returned: Condvar,
}

impl Slots {
    pub(crate) fn new(conns: Vec<Connection>) -> Slots {
        Slots {
            free: Mutex::new(conns),
            returned: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A panic while the list is locked cannot leave it inconsistent (push and pop only).
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free connection, waiting at most `wait` for one.
    pub(crate) fn take(&self, wait: Duration) -> Option<Slot<'_>> {
        let deadline = Instant::now() + wait;
        let mut free = self.lock();
        loop {
            if let Some(conn) = free.pop() {
                return Some(Slot {
                    slots: self,
                    conn: Some(conn),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            free = self
                .returned
                .wait_timeout(free, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A connection on loan; it goes back to its slots when dropped (also on a panic).
pub(crate) struct Slot<'a> {
    slots: &'a Slots,
    conn: Option<Connection>,
}

impl std::ops::Deref for Slot<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a slot holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Slot<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn
            .as_mut()
            .expect("a slot holds its connection until dropped")
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.slots.lock().push(conn);
            self.slots.returned.notify_one();
        }
    }
}

/// Opens a reader on the same database file: read-only, so it can never take the write lock.
pub(crate) fn open_reader(path: &Path) -> Result<Connection, Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_WAIT)?;
    Ok(conn)
}

/// The writer's recent history: when it last found the database locked, and the last write's
/// failure (cleared by the next success).
#[derive(Default)]
pub(crate) struct WriterState {
    busy_since: Option<Instant>,
    last_failure: Option<(&'static str, String)>,
    probed: Option<(Instant, StoreHealth)>,
}

pub(crate) struct Writer {
    pub(crate) slots: Slots,
    pub(crate) state: Mutex<WriterState>,
}

impl Writer {
    pub(crate) fn new(conn: Connection) -> Writer {
        Writer {
            slots: Slots::new(vec![conn]),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer, with its busy timeout set for this call: short, or none right after the
    /// database was found locked.
    pub(crate) fn take(&self) -> Result<Slot<'_>, StoreError> {
        let slot = self.slots.take(SLOT_WAIT).ok_or(StoreError::Congested)?;
        let recently_busy = self
            .state()
            .busy_since
            .is_some_and(|t| t.elapsed() < BUSY_MEMORY);
        slot.busy_timeout(if recently_busy {
            Duration::ZERO
        } else {
            BUSY_WAIT
        })
        .map_err(crate::sql)?;
        Ok(slot)
    }

    /// Remembers how a write ended, for the next writes and for health.
    pub(crate) fn record<T>(&self, result: &Result<T, StoreError>) {
        let mut st = self.state();
        match result {
            Ok(_) => {
                st.busy_since = None;
                st.last_failure = None;
            }
            Err(e) => {
                if let Some(code) = e.unavailable_code() {
                    if e.is_busy() {
                        st.busy_since.get_or_insert_with(Instant::now);
                    }
                    st.last_failure = Some((code, crate::chain(e)));
                    st.probed = None;
                }
            }
        }
    }

    /// Whether a write could go through now: the files are writable (as this process: a
    /// read-only mount, an immutable file or missing permission all show here) and no other
    /// process holds the write lock; after a failed write, whether a one-row write goes through.
    /// Probed at most every [`HEALTH_TTL`]; never waits for a lock.
    pub(crate) fn health(&self, path: Option<&Path>) -> StoreHealth {
        if let Some((at, h)) = &self.state().probed {
            if at.elapsed() < HEALTH_TTL {
                return h.clone();
            }
        }
        let h = self.probe(path);
        self.state().probed = Some((Instant::now(), h.clone()));
        h
    }

    fn probe(&self, path: Option<&Path>) -> StoreHealth {
        if let Some(path) = path {
            for p in [path.to_path_buf(), crate::sidecar(path, "-wal")] {
                // access(2), not open(2): closing any descriptor of the database file would drop
                // the locks SQLite holds on it for this process.
                if let Err(e) = nix::unistd::access(&p, nix::unistd::AccessFlags::W_OK) {
                    if e == nix::errno::Errno::ENOENT {
                        continue;
                    }
                    let code = if e == nix::errno::Errno::ENOSPC {
                        burrow_types::codes::NO_SPACE
                    } else {
                        burrow_types::codes::DATABASE_UNAVAILABLE
                    };
                    return StoreHealth {
                        writable: false,
                        problem: Some((
                            code,
                            format!("the database file {} cannot be written: {e}", p.display()),
                        )),
                    };
                }
            }
        }
        // The write lock, tried once: held by another process means every write would wait.
        let Some(slot) = self.slots.take(Duration::ZERO) else {
            // Our own writer is busy writing: the last outcome tells.
            return self.last_outcome();
        };
        let failed_before = self.state().last_failure.is_some();
        let tried = slot.busy_timeout(Duration::ZERO).and_then(|_| {
            if failed_before {
                // The last write failed (an I/O error, a full disk): only a write shows whether
                // that is over. A one-row write, at most once per probe interval.
                slot.execute(
                    "INSERT OR REPLACE INTO store_probe (id, at) VALUES (1, ?1)",
                    [crate::now_unix()],
                )
                .map(|_| ())
            } else {
                slot.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            }
        });
        drop(slot);
        let tried = tried.map_err(crate::sql);
        // A lock found by the probe is remembered like one a write found: while writes wait on
        // it (holding the writer, so the next probe cannot try the lock itself) health still
        // says busy, and the next writes do not wait for it.
        if failed_before || tried.is_err() {
            self.record(&tried);
        }
        match tried {
            Ok(()) => self.last_outcome(),
            Err(e) => {
                let code = e
                    .unavailable_code()
                    .unwrap_or(burrow_types::codes::DATABASE_UNAVAILABLE);
                StoreHealth {
                    writable: false,
                    problem: Some((code, crate::chain(&e))),
                }
            }
        }
    }

    fn last_outcome(&self) -> StoreHealth {
        match &self.state().last_failure {
            None => StoreHealth::ok(),
            Some((code, msg)) => StoreHealth {
                writable: false,
                problem: Some((code, format!("the last write failed: {msg}"))),
            },
        }
    }
}

/// Readers when the database is a file; none for an in-memory one (reads then use the writer).
pub(crate) fn readers(path: Option<&Path>) -> Result<Option<Slots>, Error> {
    let Some(path) = path else {
        return Ok(None);
    };
    let conns = (0..READERS)
        .map(|_| open_reader(path))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Slots::new(conns)))
}
