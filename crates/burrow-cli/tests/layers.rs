//! The layers as crates point one way (docs/architecture.md, docs/adr/0056): read from
//! `cargo metadata`, so a dependency added against the direction fails here, in CI, before
//! anyone builds on it. Needs no root and no server.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Each workspace crate's direct dependencies on other crates, by kind (`normal`, `dev`,
/// `build`), as the workspace's manifests declare them.
struct Workspace {
    deps: BTreeMap<String, Vec<(String, String)>>,
}

impl Workspace {
    fn load() -> Workspace {
        let out = Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo metadata");
        assert!(
            out.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
        let mut deps = BTreeMap::new();
        for p in meta["packages"].as_array().expect("packages") {
            let name = p["name"].as_str().unwrap().to_string();
            let list = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    let kind = d["kind"].as_str().unwrap_or("normal").to_string();
                    (d["name"].as_str().unwrap().to_string(), kind)
                })
                .collect();
            deps.insert(name, list);
        }
        Workspace { deps }
    }

    fn members(&self) -> BTreeSet<&str> {
        self.deps.keys().map(String::as_str).collect()
    }

    /// What `krate` needs to build and run (normal and build dependencies; not its tests').
    fn uses(&self, krate: &str) -> BTreeSet<&str> {
        self.named_by(krate, false)
    }

    /// Every crate `krate` names, its tests' included.
    fn names(&self, krate: &str) -> BTreeSet<&str> {
        self.named_by(krate, true)
    }

    fn named_by(&self, krate: &str, with_dev: bool) -> BTreeSet<&str> {
        self.deps
            .get(krate)
            .unwrap_or_else(|| panic!("{krate} is not in the workspace"))
            .iter()
            .filter(|(_, kind)| with_dev || kind != "dev")
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

#[test]
fn no_workspace_crate_depends_on_one_that_depends_on_it() {
    let ws = Workspace::load();
    let members = ws.members();
    // Depth-first search for a cycle between members. Cargo itself refuses a cycle of normal
    // dependencies; one closed by a dev-dependency (a lower crate's tests naming a higher crate)
    // builds, and is what this catches.
    fn visit<'a>(
        ws: &'a Workspace,
        members: &BTreeSet<&'a str>,
        at: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == at) {
            panic!("dependency cycle: {} -> {at}", path[i..].join(" -> "));
        }
        if !done.insert(at) {
            return;
        }
        path.push(at);
        for dep in ws.names(at) {
            if members.contains(dep) {
                visit(ws, members, dep, path, done);
            }
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in &members {
        // `done` makes each crate's subtree searched once; a cycle is found from any of its
        // crates because the search enters it through one of them first.
        visit(&ws, &members, m, &mut Vec::new(), &mut done);
    }
}

#[test]
fn control_has_no_http_server_and_names_no_database() {
    let ws = Workspace::load();
    let uses = ws.uses("burrow-control");
    for banned in [
        "axum",
        "hyper",
        "hyper-util",
        "tower-http",
        "utoipa",
        "burrow-server",
        "burrow-store-sqlite",
        "rusqlite",
    ] {
        assert!(
            !uses.contains(banned),
            "burrow-control depends on {banned}: control is reached by transports and reaches the \
             store through its trait"
        );
    }
}

#[test]
fn the_store_contract_names_no_database() {
    let ws = Workspace::load();
    let uses = ws.uses("burrow-store");
    assert!(
        !uses.contains("rusqlite"),
        "burrow-store (the trait) depends on rusqlite"
    );
    for m in ws.members() {
        if m == "burrow-store" {
            continue;
        }
        assert!(
            !m.starts_with("burrow-store") || ws.uses(m).contains("burrow-store"),
            "{m} looks like a store implementation but does not implement burrow-store's trait"
        );
    }
}

#[test]
fn only_the_composition_names_the_store_implementation() {
    let ws = Workspace::load();
    // `burrow-server` composes the layers for `burrow up`, and the CLI runs it; every other crate
    // names only the trait (tests may open a SQLite store to have a real one).
    let composers = ["burrow-server", "burrow-cli"];
    for m in ws.members() {
        if composers.contains(&m) {
            continue;
        }
        assert!(
            !ws.uses(m).contains("burrow-store-sqlite"),
            "{m} depends on burrow-store-sqlite; name burrow-store's trait instead"
        );
    }
}

#[test]
fn the_runtime_knows_nothing_of_the_layers_above_it() {
    let ws = Workspace::load();
    for lower in [
        "burrow-node",
        "burrow-linux",
        "burrow-types",
        "burrow-proto",
        "burrow-store",
        "burrow-guest",
    ] {
        let uses = ws.uses(lower);
        for upper in ["burrow-control", "burrow-server", "burrow-cli", "axum"] {
            assert!(
                !uses.contains(upper),
                "{lower} depends on {upper}: dependencies point from transport to control to runtime"
            );
        }
    }
}
