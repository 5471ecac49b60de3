//! The code-interpreter template (issue 14, docs/code-interpreter.md), driven by the unmodified
//! `e2b-code-interpreter` SDK from PyPI against a real `burrow up` with sandbox networking (the
//! SDK reaches the kernel server through burrow's port proxy). The SDK and the template's
//! bundle (`images/code-interpreter/build-bundle.sh`) are built once into `target/`; the only
//! tests that skip are those whose registry cannot be reached, and they say so.

mod common;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The pinned SDKs: the code-interpreter SDK and the `e2b` SDK it builds on (the one
/// tests/e2b.rs checks).
const CI_SDK: &str = "2.11.5";
const E2B_SDK: &str = "2.63.0";

fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("code-interpreter")
}

/// A venv with both SDKs at their pinned versions. None (with the reason printed) when PyPI
/// cannot be reached.
fn python_sdk() -> Option<PathBuf> {
    pip_venv_all(
        &cache(),
        &format!("sdk-{CI_SDK}-{E2B_SDK}"),
        &[
            &format!("e2b-code-interpreter=={CI_SDK}"),
            &format!("e2b=={E2B_SDK}"),
        ],
    )
    .map(|venv| venv.join("bin/python"))
}

/// The template's bundle, built by the script an operator runs, cached under target/ by the
/// contents of the files it is made from (a changed server.py makes a new one).
fn bundle() -> Option<PathBuf> {
    let dir = repo_root().join("images/code-interpreter");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in ["server.py", "requirements.txt", "build-bundle.sh"] {
        std::fs::read(dir.join(f)).unwrap().hash(&mut h);
    }
    let name = format!("bundle-{:016x}", h.finish());
    cached_install(&cache(), &name, |out| {
        let o = Command::new(dir.join("build-bundle.sh"))
            .arg(out.join("code-interpreter-v1.tar.zst"))
            .output()
            .expect("run images/code-interpreter/build-bundle.sh");
        installed(&o, "images/code-interpreter/build-bundle.sh")
    })
    .map(|d| d.join("code-interpreter-v1.tar.zst"))
}

/// Installs the bundle where a server looks for it (`<data>/templates/`).
fn install_bundle(srv: &TestServer, bundle: &Path) {
    let dir = srv.data.join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(bundle, dir.join("code-interpreter-v1.tar.zst")).unwrap();
}

/// A server with sandbox networking and the template installed, the SDK's python, and the E2B
/// variables of a new user; None when a registry cannot be reached.
async fn server_with_template(user: &str) -> Option<(PathBuf, TestServer, Vec<(String, String)>)> {
    let python = python_sdk()?;
    let bundle = bundle()?;
    let srv = TestServer::start_in_world(&[]).await;
    install_bundle(&srv, &bundle);
    let env = e2b_env(&srv, user).await;
    Some((python, srv, env))
}

/// The SDK, unmodified, through every check of tests/e2b/code_interpreter.py: results, display
/// data (HTML, JSON, a matplotlib PNG), streaming callbacks, errors with tracebacks, state
/// between cells, contexts, languages refused by name, a timeout that interrupts, a kernel
/// that dies.
#[tokio::test]
async fn the_code_interpreter_sdk_runs_its_checks() {
    if !require_root("the code-interpreter template") {
        return;
    }
    let Some((python, srv, env)) = server_with_template("ci-py").await else {
        return;
    };
    let mut cmd = Command::new(&python);
    cmd.arg(repo_root().join("tests/e2b/code_interpreter.py"));
    let o = run_with(cmd, &env);
    let out = output_text(&o);
    println!("{out}");
    assert!(
        o.status.success() && out.contains("all checks passed"),
        "tests/e2b/code_interpreter.py failed (exit {:?}):\n{out}\n--- server log ---\n{}",
        o.status.code(),
        srv.log()
    );
}

async fn create(srv: &TestServer, key: &str, template: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/sandboxes", srv.url))
        .header("x-api-key", key)
        .json(&serde_json::json!({ "templateID": template }))
        .send()
        .await
        .expect("send");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// What a server cannot offer is said at create, and nothing is left behind: without the
/// bundle the template is not installed (the answer names the script that builds it); without
/// sandbox networking the SDK could not reach the kernel server.
#[tokio::test]
async fn a_server_that_cannot_offer_the_template_says_why() {
    if !require_root("the code-interpreter template") {
        return;
    }
    let srv = TestServer::start_in_world(&[]).await;
    let env = e2b_env(&srv, "ci-missing").await;
    let (st, body) = create(&srv, &env[2].1, "code-interpreter-v1").await;
    assert_eq!(st, 404, "{body}");
    assert!(
        body.contains("code-interpreter-v1") && body.contains("build-bundle.sh"),
        "{body}"
    );
    let (st, body) = create(&srv, &env[2].1, "no-such-template").await;
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("no-such-template"), "{body}");
    let list = srv.client_with(&env[2].1).list().await.expect("list");
    assert!(list.is_empty(), "a refused create left {list:?}");

    let plain = TestServer::start().await;
    let env = e2b_env(&plain, "ci-nonet").await;
    let (st, body) = create(&plain, &env[2].1, "code-interpreter-v1").await;
    assert_eq!(st, 501, "{body}");
    assert!(body.contains("--network"), "{body}");
}

/// A sandbox of the template that hibernates and comes back cold has its files but no
/// processes: the first request to the kernel server starts it again (its state is new).
#[tokio::test]
async fn the_server_comes_back_after_a_cold_start() {
    if !require_root("the code-interpreter template") {
        return;
    }
    let Some((python, srv, env)) = server_with_template("ci-cold").await else {
        return;
    };
    let script = srv.home.join("cold.py");
    std::fs::write(
        &script,
        r#"
import sys
from e2b_code_interpreter import Sandbox
sbx = Sandbox.create()
assert sbx.run_code("v = 5\nv").text == "5"
print(sbx.sandbox_id, flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit("no go")
back = Sandbox.connect(sbx.sandbox_id)
ex = back.run_code("'v' in globals()")
assert ex.text == "False", ex
assert back.run_code("21 * 2").text == "42"
back.kill()
print("cold start ok", flush=True)
"#,
    )
    .unwrap();
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn().expect("run the SDK script");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut id = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut id).unwrap();
    let id = id.trim().to_string();
    assert!(!id.is_empty(), "the script printed no sandbox id");
    // burrow's own hibernate: the processes end, the files stay.
    srv.client_with(&env[2].1)
        .hibernate(&id)
        .await
        .expect("hibernate the sandbox");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "go").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = format!("{rest}{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.status.success() && out.contains("cold start ok"),
        "{out}\n--- server log ---\n{}",
        srv.log()
    );
}

/// The header route (`E2b-Sandbox-Port`) is the port proxy's: access is decided before the
/// sandbox is looked at, so a caller without the sandbox's token gets one answer whether the
/// sandbox exists or not, and a malformed port is named.
#[tokio::test]
async fn the_port_header_route_asks_for_the_token_first() {
    if !require_root("the code-interpreter template") {
        return;
    }
    let srv = TestServer::start_in_world(&[]).await;
    let env = e2b_env(&srv, "ci-route").await;
    let (st, body) = create(&srv, &env[2].1, "base").await;
    assert_eq!(st, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = created["sandboxID"].as_str().unwrap();
    assert_eq!(
        created["trafficAccessToken"], created["envdAccessToken"],
        "the traffic token is the sandbox's access token"
    );
    let send = |id: &str, port: &str, token: Option<&str>| {
        let mut req = reqwest::Client::new()
            .post(format!("{}/execute", srv.url))
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", port)
            .body(r#"{"code":"1"}"#);
        if let Some(t) = token {
            req = req.header("e2b-traffic-access-token", t);
        }
        async move {
            let resp = req.send().await.expect("send");
            (
                resp.status().as_u16(),
                resp.text().await.unwrap_or_default(),
            )
        }
    };
    let (st_real, real) = send(id, "49999", Some("wrong")).await;
    let (st_none, none) = send("anidthatneverexisted", "49999", Some("wrong")).await;
    assert_eq!((st_real, st_none), (401, 401), "{real} / {none}");
    assert_eq!(
        real, none,
        "the same answer for a real and a missing sandbox"
    );
    let (st, body) = send(id, "not-a-port", None).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("E2b-Sandbox-Port"), "{body}");
    // With the token: a base sandbox has no kernel server, and the answer says nothing listens.
    let token = created["trafficAccessToken"].as_str().unwrap();
    let (st, body) = send(id, "49999", Some(token)).await;
    assert_eq!(st, 502, "{body}");
    assert!(body.contains("port_closed"), "{body}");
}
