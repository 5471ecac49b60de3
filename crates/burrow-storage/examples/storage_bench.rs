//! Storage timings for both implementations, quotas on: create, snapshot of a volume holding
//! 1 MiB and 100 MiB of files (16 and 1,600 files of 64 KiB in its workspace, attached as a
//! running sandbox's would be), clone → ready (clone, attach in a private mount namespace,
//! overlay mount, first write through it), destroy (what the caller waits for) and the
//! background delete after it. Prints p50 and p99 (nearest rank) per row. Root only.
//!
//! `cargo run --release -p burrow-storage --example storage_bench -- [--n 30] [--dir /var/tmp]
//! [--only btrfs|ext4]`. Everything it makes is under one directory it removes at the end,
//! mounts and loop devices included. Not a test: nothing here asserts a time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burrow_storage::{BtrfsConfig, BtrfsPool, Ext4Config, Ext4Loop, Kind, Storage, Volume};
use nix::mount::MntFlags;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{in_private_ns, overlay, MIB, OWNERS};

struct Args {
    n: usize,
    dir: PathBuf,
    only: Option<Kind>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        n: 30,
        dir: PathBuf::from("/var/tmp"),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--n" => a.n = v.parse()?,
            "--dir" => a.dir = v.into(),
            "--only" => a.only = Some(v.parse()?),
            _ => bail!("unknown argument {k} (--n, --dir, --only)"),
        }
    }
    Ok(a)
}

fn pct(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1000.0
}

/// A volume holding `files` files of 64 KiB in its workspace.
fn populated(s: &dyn Storage, id: &str, files: usize, at: &Path) -> Result<Volume> {
    let vol = s.create(id, 1024 * MIB)?;
    let v = vol.clone();
    let at = at.to_path_buf();
    in_private_ns(move || -> Result<()> {
        std::fs::create_dir_all(&at)?;
        let a = v.attach(&at, OWNERS)?;
        let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::create_dir_all(a.workspace().join("files"))?;
        for i in 0..files {
            std::fs::write(a.workspace().join(format!("files/{i}")), &block)?;
        }
        let f = std::fs::File::open(a.workspace())?;
        rustix::fs::syncfs(&f)?;
        Ok(())
    })?;
    Ok(vol)
}

struct Row {
    what: String,
    p50: f64,
    p99: f64,
}

fn row(what: &str, mut t: Vec<Duration>) -> Row {
    Row {
        what: what.to_string(),
        p50: pct(&mut t, 0.50),
        p99: pct(&mut t, 0.99),
    }
}

fn bench(kind: Kind, dir: &Path, n: usize) -> Result<Vec<Row>> {
    let data = dir.join(format!("{}-data", kind.as_str()));
    let s: Box<dyn Storage> = match kind {
        Kind::Btrfs => Box::new(BtrfsPool::new(BtrfsConfig {
            data_dir: data.clone(),
            image_size: Some(8 * 1024 * MIB),
            background_purge: false,
        })),
        Kind::Ext4 => Box::new(Ext4Loop::new(Ext4Config {
            data_dir: data.clone(),
            background_purge: false,
        })),
    };
    let t = Instant::now();
    s.prepare()?;
    let mut rows = vec![row("prepare (first start)", vec![t.elapsed()])];
    let mnt = dir.join(format!("{}-mnt", kind.as_str()));

    // Create: the first one of a size also formats the ext4 template; it is left out.
    s.create("warm", 1024 * MIB)?;
    let mut t = Vec::new();
    for i in 0..n {
        let s0 = Instant::now();
        s.create(&format!("c{i}"), 1024 * MIB)?;
        t.push(s0.elapsed());
    }
    rows.push(row("create (1 GiB limit)", t));
    let mut t = Vec::new();
    for i in 0..n {
        let s0 = Instant::now();
        s.destroy(&format!("c{i}"))?;
        t.push(s0.elapsed());
    }
    rows.push(row("destroy, empty (caller's wait)", t));
    s.purge()?;

    // Each with a size not seen before: ext4 formats a template for it (today's `mkfs` path).
    let mut t = Vec::new();
    for i in 0..n {
        let s0 = Instant::now();
        s.create(&format!("m{i}"), 1024 * MIB + 4096 * (i as u64 + 1))?;
        t.push(s0.elapsed());
        s.destroy(&format!("m{i}"))?;
    }
    rows.push(row("create, a new size each time", t));
    s.purge()?;

    // What a cold start waits for: the volume made and mounted where the sandbox's root is built.
    let mut t = Vec::new();
    for i in 0..n {
        let id = format!("a{i}");
        let at = mnt.join(&id);
        let s0 = Instant::now();
        let v = s.create(&id, 1024 * MIB)?;
        let took = in_private_ns(move || -> Result<Duration> {
            std::fs::create_dir_all(&at)?;
            v.attach(&at, OWNERS)?;
            Ok(s0.elapsed())
        })?;
        t.push(took);
    }
    rows.push(row("create + attach (a cold start's storage)", t));
    for i in 0..n {
        s.destroy(&format!("a{i}"))?;
    }
    s.purge()?;

    for (label, files) in [("1 MiB", 16), ("100 MiB", 1600)] {
        let src = format!("src{files}");
        populated(&*s, &src, files, &mnt.join(&src))?;
        // The source stays attached, as a running sandbox's volume is, while it is snapshotted.
        let vol = s.open(&src)?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let at = mnt.join(format!("{src}-live"));
        let holder = std::thread::spawn(move || {
            in_private_ns(move || {
                std::fs::create_dir_all(&at).unwrap();
                let _a = vol.attach(&at, OWNERS).unwrap();
                ready_tx.send(()).unwrap();
                let _ = rx.recv();
            })
        });
        ready_rx.recv()?;
        let mut snap = Vec::new();
        let mut clone = Vec::new();
        let mut destroy = Vec::new();
        let mut purge = Vec::new();
        let mut delete_snap = Vec::new();
        for i in 0..n {
            let name = format!("s{files}-{i}");
            let s0 = Instant::now();
            s.snapshot(&src, &name)?;
            snap.push(s0.elapsed());
            let id = format!("k{files}-{i}");
            let s0 = Instant::now();
            let v = s.clone_snapshot(&name, &id, 1024 * MIB)?;
            let at = mnt.join(&id);
            let lower = dir.join("lower");
            let ready = in_private_ns(move || -> Result<Duration> {
                std::fs::create_dir_all(&at)?;
                let a = v.attach(&at, OWNERS)?;
                let merged = at.with_extension("merged");
                overlay(&lower, &a, &merged);
                std::fs::write(merged.join("first"), b"ready")?;
                Ok(s0.elapsed())
            })?;
            clone.push(ready);
            let s0 = Instant::now();
            s.destroy(&id)?;
            destroy.push(s0.elapsed());
            let s0 = Instant::now();
            s.delete_snapshot(&name)?;
            delete_snap.push(s0.elapsed());
            let s0 = Instant::now();
            s.purge()?;
            purge.push(s0.elapsed());
        }
        let _ = tx.send(());
        let _ = holder.join();
        rows.push(row(&format!("snapshot, {label} of files"), snap));
        rows.push(row(&format!("clone → ready, {label}"), clone));
        rows.push(row(
            &format!("destroy, {label} clone (caller's wait)"),
            destroy,
        ));
        rows.push(row(&format!("delete snapshot, {label}"), delete_snap));
        rows.push(row(&format!("background delete, {label} clone"), purge));
        s.destroy(&src)?;
        s.purge()?;
    }
    drop(s);
    let _ = nix::mount::umount2(&data.join("pool"), MntFlags::MNT_DETACH);
    Ok(rows)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("storage_bench needs root (loop devices, mounts, btrfs ioctls)");
    }
    let a = args()?;
    let dir = a
        .dir
        .join(format!("burrow-storage-bench.{}", std::process::id()));
    std::fs::create_dir_all(dir.join("lower"))?;
    std::fs::write(dir.join("lower/hello"), b"lower layer")?;
    let kinds: Vec<Kind> = match a.only {
        Some(k) => vec![k],
        None => {
            let mut k = Vec::new();
            match burrow_storage::btrfs_unsupported() {
                None => k.push(Kind::Btrfs),
                Some(why) => eprintln!("btrfs skipped: {why}"),
            }
            k.push(Kind::Ext4);
            k
        }
    };
    println!(
        "storage_bench: n={} per row, load average {} at start, {} cores",
        a.n,
        load(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut results = Vec::new();
    for kind in &kinds {
        let r = bench(*kind, &dir, a.n);
        let _ = nix::mount::umount2(
            &dir.join(format!("{}-data/pool", kind.as_str())),
            MntFlags::MNT_DETACH,
        );
        match r {
            Ok(r) => results.push((*kind, r)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.context(format!("{} bench", kind.as_str())));
            }
        }
    }
    let mut out = std::io::stdout().lock();
    write!(out, "{:<48}", "operation")?;
    for (k, _) in &results {
        write!(out, " {:>11} {:>11}", format!("{} p50", k.as_str()), "p99")?;
    }
    writeln!(out)?;
    for i in 0..results[0].1.len() {
        write!(out, "{:<48}", results[0].1[i].what)?;
        for (_, rows) in &results {
            write!(out, " {:>8.2} ms {:>8.2} ms", rows[i].p50, rows[i].p99)?;
        }
        writeln!(out)?;
    }
    writeln!(out, "load average {} at the end", load())?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
