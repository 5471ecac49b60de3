//! `kill -9` at any point: a child process (this test binary, running the ignored
//! `helper_churn`) prepares the storage and then creates, writes, snapshots, clones, destroys and
//! deletes in a loop; the test kills it at a random moment, then checks what a restarted node
//! would find: `prepare` succeeds, nothing half-made is left, every volume opens, every snapshot
//! clones into a volume that attaches and reads back whole, every delete finishes, and no loop
//! device or mount is left behind. A fresh data directory every few rounds puts some kills into
//! the pool's creation itself. Root only.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow_storage::Kind;
use common::*;

const ROUNDS: u32 = 12;
const DATA_LEN: usize = 256 * 1024;

/// A tiny xorshift: the rounds differ run to run, the seed is printed when one fails.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ (u64::from(std::process::id()) << 32) | 1
}

fn pattern(stamp: &str) -> Vec<u8> {
    stamp.bytes().cycle().take(DATA_LEN).collect()
}

/// Writes what a sandbox would: a stamp, data derived from it, a file in its root layer, and
/// `done` once all of it is synced.
fn populate(vol: &burrow_storage::Volume, mnt: &Path) {
    let a = attach(vol, mnt);
    let ws = a.workspace();
    write(&ws.join("stamp"), vol.id.as_bytes());
    write(&ws.join("data"), &pattern(&vol.id));
    write(&a.upper().join("rootfile"), vol.id.as_bytes());
    syncfs(&ws);
    write(&ws.join("done"), b"");
}

/// The child: churns until it is killed. Does nothing unless the parent test set it up.
#[test]
#[ignore = "run by kill_9_at_any_point_leaves_storage_that_prepare_makes_whole"]
fn helper_churn() {
    let (Ok(dir), Ok(kind)) = (
        std::env::var("BURROW_STORAGE_CHURN_DIR"),
        std::env::var("BURROW_STORAGE_CHURN_KIND"),
    ) else {
        return;
    };
    burrow_linux::sys::die_with_parent().unwrap();
    let kind: Kind = kind.parse().unwrap();
    let data = PathBuf::from(&dir).join("data");
    let s = unprepared(kind, &data, true);
    s.prepare().unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut rng = Rng(seed());
    let mnt = PathBuf::from(&dir).join("mnt");
    let mut n = 0u64;
    loop {
        n += 1;
        let inv = s.list().unwrap();
        let pick = |rng: &mut Rng, v: &[String]| v.get(rng.next(v.len() as u64) as usize).cloned();
        match rng.next(7) {
            0 | 1 => {
                let id = format!("v{}-{n}", std::process::id());
                let vol = s.create(&id, 32 * MIB).unwrap();
                let m = mnt.clone();
                in_private_ns(move || populate(&vol, &m));
            }
            2 | 3 => {
                if let Some(v) = pick(&mut rng, &inv.volumes) {
                    s.snapshot(&v, &format!("s{}-{n}", std::process::id()))
                        .unwrap();
                }
            }
            4 => {
                if let Some(snap) = pick(&mut rng, &inv.snapshots) {
                    let id = format!("c{}-{n}", std::process::id());
                    s.clone_snapshot(&snap, &id, 48 * MIB).unwrap();
                }
            }
            5 => {
                if inv.volumes.len() > 4 {
                    s.destroy(&pick(&mut rng, &inv.volumes).unwrap()).unwrap();
                }
            }
            _ => {
                if inv.snapshots.len() > 4 {
                    s.delete_snapshot(&pick(&mut rng, &inv.snapshots).unwrap())
                        .unwrap();
                }
            }
        }
    }
}

/// What the restarted node checks; returns a description of what it found.
fn check(kind: Kind, dir: &TestDir) -> String {
    let s = unprepared(kind, &dir.data(), false);
    let rec = s
        .prepare()
        .unwrap_or_else(|e| panic!("{kind:?}: prepare after a kill: {e}"));
    let inv = s.list().unwrap();
    assert!(
        inv.half_made.is_empty(),
        "{kind:?}: half-made after prepare: {inv:?}"
    );
    for v in &inv.volumes {
        s.open(v)
            .unwrap_or_else(|e| panic!("{kind:?}: volume {v}: {e}"));
        s.usage(v)
            .unwrap_or_else(|e| panic!("{kind:?}: usage of {v}: {e}"));
    }
    s.purge().unwrap();
    assert_eq!(
        s.list().unwrap().pending_deletes,
        0,
        "{kind:?}: deletes left"
    );
    // Every snapshot (the latest eight) is whole: it clones, attaches and reads back.
    let snaps: Vec<String> = inv.snapshots.iter().rev().take(8).cloned().collect();
    for snap in &snaps {
        let id = format!("check-{snap}");
        let vol = s.clone_snapshot(snap, &id, 64 * MIB).unwrap();
        let mnt = dir.path.join("checkmnt");
        let (stamp, data, done, rootfile) = in_private_ns(move || {
            let a = attach(&vol, &mnt);
            let ws = a.workspace();
            (
                read(&ws.join("stamp")),
                std::fs::read(ws.join("data")).ok(),
                ws.join("done").exists(),
                read(&a.upper().join("rootfile")),
            )
        });
        if done {
            let stamp = stamp.unwrap_or_else(|| panic!("{kind:?}: {snap}: done without a stamp"));
            assert!(
                data.as_deref() == Some(&pattern(&stamp)[..]),
                "{kind:?}: snapshot {snap} of {stamp}: its data is not whole"
            );
            assert_eq!(
                rootfile.as_deref(),
                Some(stamp.as_str()),
                "{kind:?}: {snap}"
            );
        }
        s.destroy(&id).unwrap();
    }
    s.purge().unwrap();
    format!(
        "{} volumes, {} snapshots, recovery {:?}",
        inv.volumes.len(),
        inv.snapshots.len(),
        rec
    )
}

#[test]
fn kill_9_at_any_point_leaves_storage_that_prepare_makes_whole() {
    if !require_root("kill -9 during storage operations") {
        return;
    }
    for kind in kinds("kill -9 on a btrfs pool") {
        let seed = seed();
        let mut rng = Rng(seed);
        let mut dir = TestDir::new("crash");
        for round in 0..ROUNDS {
            if round % 4 == 0 && round > 0 {
                release(kind, &dir);
                dir = TestDir::new("crash");
            }
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "helper_churn", "--ignored", "--nocapture"])
                .arg("--test-threads=1")
                .env("BURROW_STORAGE_CHURN_DIR", &dir.path)
                .env("BURROW_STORAGE_CHURN_KIND", kind.as_str())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // A fresh directory's first round is killed anywhere, pool creation included; the
            // others once the churn runs.
            if round % 4 != 0 {
                let mut out = BufReader::new(child.stdout.take().unwrap());
                let mut line = String::new();
                while out.read_line(&mut line).unwrap() > 0 && !line.contains("ready") {
                    line.clear();
                }
            }
            std::thread::sleep(Duration::from_millis(20 + rng.next(700)));
            let _ = child.kill();
            let _ = child.wait();
            let found = check(kind, &dir);
            eprintln!("{kind:?} round {round} (seed {seed}): {found}");
        }
        release(kind, &dir);
        drop(dir);
    }
}

/// Unmounts a test's pool and waits for every loop device of it to go: none may be left over
/// by the killed child's mount namespaces either.
fn release(kind: Kind, dir: &TestDir) {
    if kind == Kind::Btrfs {
        let _ = nix::mount::umount2(&dir.data().join("pool"), nix::mount::MntFlags::empty());
    }
    assert!(
        eventually(30, || loops_under(&dir.path).is_empty()),
        "{kind:?}: loop devices left: {:?}",
        loops_under(&dir.path)
    );
    assert!(mounts_under(&dir.path).is_empty(), "{kind:?}: mounts left");
}
