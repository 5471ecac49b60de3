//! The E2B-compatible facade (issue 5), driven by the unmodified `e2b` SDKs from PyPI and npm
//! against a real `burrow up`. The SDKs are installed at pinned versions into `target/` (kept
//! between runs); the only tests that skip are those whose registry cannot be reached, and they
//! say so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// The pinned SDK versions (docs/e2b.md says which were checked).
const PY_SDK: &str = "2.63.0";
const JS_SDK: &str = "2.51.0";

fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2b-sdks")
}

fn cached(name: &str, install: impl FnOnce(&Path) -> bool) -> Option<PathBuf> {
    cached_install(&cache(), name, install)
}

/// A venv with `e2b==PY_SDK`, made with Debian's python3 and cached under target/. None (with
/// the reason printed) when PyPI cannot be reached.
fn python_sdk() -> Option<PathBuf> {
    pip_venv(&cache(), &format!("py-{PY_SDK}"), &format!("e2b=={PY_SDK}"))
        .map(|venv| venv.join("bin/python"))
}

/// A node project with `e2b@JS_SDK`, cached under target/. None when npm cannot be reached.
fn js_sdk() -> Option<PathBuf> {
    cached(&format!("js-{JS_SDK}"), |dir| {
        std::fs::write(
            dir.join("package.json"),
            r#"{"name":"burrow-e2b-conformance","private":true,"type":"module"}"#,
        )
        .unwrap();
        let o = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                &format!("e2b@{JS_SDK}"),
            ])
            .current_dir(dir)
            .output()
            .expect("run npm: the E2B suite needs Node.js 20 or later with npm");
        installed(&o, &format!("npm install e2b@{JS_SDK}"))
    })
}

fn assert_script(o: &Output, what: &str, srv: &TestServer) {
    let out = output_text(o);
    println!("{out}");
    assert!(
        o.status.success(),
        "{what} failed (exit {:?}):\n{out}\n--- server log ---\n{}",
        o.status.code(),
        srv.log()
    );
}

/// Done-when 1: the Python SDK, unmodified, through the whole conformance script.
#[tokio::test]
async fn python_sdk_passes_the_conformance_suite() {
    if !require_root("the E2B conformance suite") {
        return;
    }
    let Some(python) = python_sdk() else { return };
    // In a world of network namespaces, so `get_host(port)` reaches a server inside a sandbox
    // through burrow's port proxy (Host `<port>-<id>.<domain>`).
    let srv = TestServer::start_in_world(&[]).await;
    let mut env = e2b_env(&srv, "e2b-py").await;
    env.push(("E2B_DOMAIN".into(), common::world::DOMAIN.into()));
    env.push(("E2B_CONFORMANCE_PORT_PROXY".into(), "1".into()));
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/e2b/conformance.py"));
    let o = run_with(cmd, &env);
    assert_script(&o, "tests/e2b/conformance.py", &srv);
    assert!(output_text(&o).contains("all checks passed"));
}

/// Done-when 2: the core (create, commands.run, files read/write, kill) with the npm SDK.
#[tokio::test]
async fn js_sdk_passes_the_core_suite() {
    if !require_root("the E2B conformance suite") {
        return;
    }
    let Some(dir) = js_sdk() else { return };
    let srv = TestServer::start().await;
    let env = e2b_env(&srv, "e2b-js").await;
    // ES modules resolve packages next to the script, so it runs from the SDK's project.
    let script = dir.join("core.mjs");
    std::fs::copy(repo_root().join("tests/e2b/core.mjs"), &script).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(&script).current_dir(&dir);
    let o = run_with(cmd, &env);
    assert_script(&o, "tests/e2b/core.mjs", &srv);
    assert!(output_text(&o).contains("all checks passed"));
}

/// Done-when 3: the hello world in docs/e2b.md, copied out of the page and run unchanged.
#[tokio::test]
async fn the_docs_hello_world_runs_unchanged() {
    if !require_root("the E2B hello world") {
        return;
    }
    let Some(python) = python_sdk() else { return };
    let doc = std::fs::read_to_string(repo_root().join("docs/e2b.md")).unwrap();
    let script = doc
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/e2b.md has a python hello world");
    let srv = TestServer::start().await;
    // The key comes from the command the page shows.
    let o = srv.cli(&["admin", "create-user", "alice", "--e2b-key"]);
    assert_ok(&o);
    let key = stdout(&o).trim().to_string();
    assert!(key.starts_with("e2b_") && key.len() == 44, "key: {key}");
    let env = vec![
        ("E2B_API_KEY".to_string(), key),
        ("E2B_API_URL".to_string(), srv.url.clone()),
        ("E2B_SANDBOX_URL".to_string(), srv.url.clone()),
    ];
    let file = srv.home.join("hello_e2b.py");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(&file);
    let o = run_with(cmd, &env);
    assert_script(&o, "the docs hello world", &srv);
    assert!(
        output_text(&o).contains("Hello from burrow"),
        "hello world printed: {}",
        output_text(&o)
    );
}

async fn raw(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// envd's `filesystem.Filesystem/Stat` on the server at `base`.
async fn stat(base: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let url = format!("{base}/filesystem.Filesystem/Stat");
    raw(reqwest::Method::POST, &url, headers, body).await
}

/// Done-when 4: what the facade does not support answers with an error naming the feature; bad
/// tokens and killed sandboxes get the answers the SDKs expect; nothing is a 500.
#[tokio::test]
async fn unsupported_features_are_named_never_a_500() {
    if !require_root("the E2B facade") {
        return;
    }
    let srv = TestServer::start().await;
    let env = e2b_env(&srv, "e2b-raw").await;
    let key = env[2].1.clone();
    let api = |p: &str| format!("{}{p}", srv.url);
    let json = ("content-type", "application/json");
    let auth = ("x-api-key", key.as_str());

    let (st, body) = raw(
        reqwest::Method::POST,
        &api("/sandboxes"),
        &[json],
        r#"{"templateID":"base"}"#,
    )
    .await;
    assert_eq!(st, 401, "no key: {body}");

    for (body, feature) in [
        (r#"{"templateID":"base","mcp":{"x":{}}}"#, "mcp"),
        (
            r#"{"templateID":"base","volumeMounts":[{"name":"v","path":"/v"}]}"#,
            "volumeMounts",
        ),
        (
            r#"{"templateID":"base","autoResume":{"enabled":true}}"#,
            "autoResume",
        ),
        (
            r#"{"templateID":"base","network":{"maskRequestHost":"x"}}"#,
            "maskRequestHost",
        ),
        // This server runs without --network: an allow list cannot be honoured.
        (
            r#"{"templateID":"base","network":{"allowOut":["1.2.3.4"]}}"#,
            "allowOut",
        ),
    ] {
        let (st, text) = raw(
            reqwest::Method::POST,
            &api("/v2/sandboxes"),
            &[auth, json],
            body,
        )
        .await;
        assert_eq!(st, 501, "{body}: {text}");
        assert!(text.contains(feature), "{body}: {text}");
    }
    let (st, text) = raw(
        reqwest::Method::POST,
        &api("/v2/sandboxes"),
        &[auth, json],
        r#"{"templateID":"no-such-template"}"#,
    )
    .await;
    assert_eq!(st, 404, "{text}");
    assert!(text.contains("no-such-template"), "{text}");

    let (st, text) = raw(
        reqwest::Method::POST,
        &api("/v2/sandboxes"),
        &[auth, json],
        r#"{"templateID":"base","metadata":{"k":"v"}}"#,
    )
    .await;
    assert_eq!(st, 201, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["envdAccessToken"].as_str().unwrap().to_string();

    for (path, feature) in [
        (format!("/sandboxes/{id}/fork"), "fork"),
        (format!("/sandboxes/{id}/snapshots"), "snapshots"),
    ] {
        let (st, text) = raw(reqwest::Method::POST, &api(&path), &[auth, json], "{}").await;
        assert_eq!(st, 501, "{path}: {text}");
        assert!(text.contains(feature), "{path}: {text}");
    }

    // envd: the token is checked, the codec and unknown methods are named.
    let sid = ("e2b-sandbox-id", id.as_str());
    let tok = ("x-access-token", token.as_str());
    let (st, text) = stat(
        &srv.url,
        &[sid, json, ("x-access-token", "0000")],
        r#"{"path":"/"}"#,
    )
    .await;
    assert_eq!(st, 401, "{text}");
    let (st, text) = stat(&srv.url, &[sid, json, tok], r#"{"path":"/etc"}"#).await;
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("FILE_TYPE_DIRECTORY"), "{text}");
    let (st, text) = stat(
        &srv.url,
        &[sid, ("content-type", "application/proto"), tok],
        "",
    )
    .await;
    assert_eq!(st, 501, "{text}");
    assert!(text.contains("protobuf"), "{text}");
    let (st, text) = raw(
        reqwest::Method::POST,
        &api("/process.Process/Teleport"),
        &[sid, json, tok],
        "{}",
    )
    .await;
    assert_eq!(st, 501, "{text}");
    assert!(text.contains("Teleport"), "{text}");
    let (st, text) = stat(&srv.url, &[sid, json, tok], r#"{"path":"/nope"}"#).await;
    assert_eq!(st, 404, "{text}");
    assert!(text.contains("not_found"), "{text}");
    // The Host route reaches the same sandbox.
    let host = format!("49983-{id}.burrow.test");
    let (st, text) = stat(
        &srv.url,
        &[("host", host.as_str()), json, tok],
        r#"{"path":"/etc"}"#,
    )
    .await;
    assert_eq!(st, 200, "host route: {text}");

    // Another tenant gets the 404 of an id that never existed; another sandbox's token is refused.
    let other = e2b_env(&srv, "e2b-other").await;
    let other_auth = ("x-api-key", other[2].1.as_str());
    let (st, theirs) = raw(
        reqwest::Method::GET,
        &api(&format!("/sandboxes/{id}")),
        &[other_auth],
        "",
    )
    .await;
    let (st2, never) = raw(
        reqwest::Method::GET,
        &api("/sandboxes/anidthatneverexisted"),
        &[other_auth],
        "",
    )
    .await;
    assert_eq!((st, st2), (404, 404), "{theirs} / {never}");
    let (st, text) = raw(
        reqwest::Method::DELETE,
        &api(&format!("/sandboxes/{id}")),
        &[other_auth],
        "",
    )
    .await;
    assert_eq!(st, 404, "another tenant's kill: {text}");
    let (st, text) = raw(
        reqwest::Method::POST,
        &api("/v2/sandboxes"),
        &[other_auth, json],
        r#"{"templateID":"base"}"#,
    )
    .await;
    assert_eq!(st, 201, "{text}");
    let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let their_id = theirs["sandboxID"].as_str().unwrap();
    let (st, text) = stat(
        &srv.url,
        &[("e2b-sandbox-id", their_id), json, tok],
        r#"{"path":"/"}"#,
    )
    .await;
    assert_eq!(st, 401, "a token for another sandbox: {text}");

    // Double pause is 409, kill then get is 404, envd then says the sandbox was not found.
    use reqwest::Method as M;
    for (method, path, want) in [
        (M::POST, format!("/sandboxes/{id}/pause"), 204),
        (M::POST, format!("/sandboxes/{id}/pause"), 409),
        (M::DELETE, format!("/sandboxes/{id}"), 204),
        (M::GET, format!("/sandboxes/{id}"), 404),
        (M::DELETE, format!("/sandboxes/{id}"), 404),
    ] {
        let (st, text) = raw(method.clone(), &api(&path), &[auth], "").await;
        assert_eq!(st, want, "{method} {path}: {text}");
    }
    let (st, text) = raw(reqwest::Method::GET, &api("/health"), &[sid, tok], "").await;
    assert_eq!(st, 502, "{text}");
    assert!(text.contains("was not found"), "{text}");
    assert!(
        !srv.log().contains("request failed"),
        "a request failed with a 5xx inside the server:\n{}",
        srv.log()
    );
}

/// A `BURROW_ADMIN_KEY` in E2B's shape works as an E2B key.
#[tokio::test]
async fn an_e2b_shaped_admin_key_works() {
    if !require_root("the E2B facade") {
        return;
    }
    let key = format!("e2b_{}", "ab".repeat(20));
    let srv = TestServer::start_with_env(&[("BURROW_ADMIN_KEY", &key)]).await;
    let (st, text) = raw(
        reqwest::Method::GET,
        &format!("{}/v2/sandboxes", srv.url),
        &[("x-api-key", &key)],
        "",
    )
    .await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(text, "[]");
}
