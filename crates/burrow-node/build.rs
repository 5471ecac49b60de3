//! Builds the guest agent as a static executable, for `src/static_guest.rs` to embed.
//!
//! The guest is PID 1 in every image: glibc, musl, busybox-only, no shell. It must not need the
//! host's (or any) dynamic loader, so it is linked with `-C target-feature=+crt-static`. That flag
//! cannot go to the whole workspace (proc-macro crates cannot be built with it, and the server
//! wants the host's resolver), and cargo has no per-package rustflags on stable. So this script
//! runs a second cargo for `burrow-guest` alone with an explicit `--target` (which keeps the flag
//! off build scripts and proc macros), in its own target directory (`target/static-guest`), offline
//! and `--locked` against the workspace's lock file. The outer cargo's jobserver is shared.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned();
    for dir in ["burrow-guest", "burrow-proto", "burrow-types"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join("crates").join(dir).display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.toml").display()
    );

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_root = out_dir.ancestors().nth(4).unwrap().to_owned();
    let target_dir = target_root.join("static-guest");
    let target = env::var("TARGET").unwrap();
    let release = env::var("PROFILE").as_deref() == Ok("release");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--locked",
        "--offline",
        "-p",
        "burrow-guest",
        "--bin",
        "burrow-guest",
    ])
    .arg("--target")
    .arg(&target)
    .arg("--manifest-path")
    .arg(workspace.join("Cargo.toml"))
    .env("CARGO_TARGET_DIR", &target_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    if release {
        cmd.arg("--release");
    }
    // What the outer cargo (or clippy) set for this script must not steer the inner build.
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the static guest");
    assert!(status.success(), "building the static guest failed");
    let built = target_dir
        .join(&target)
        .join(if release { "release" } else { "debug" })
        .join("burrow-guest");
    let dest = out_dir.join("burrow-guest");
    std::fs::copy(&built, &dest).expect("copying the static guest");
    println!("cargo:rustc-env=BURROW_STATIC_GUEST={}", dest.display());
}
