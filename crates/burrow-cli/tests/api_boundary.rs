//! The API side of the sandbox boundary, against real servers: the port proxy and envd
//! authenticate before they look at a sandbox (one answer for every id, no effect on the idle
//! clock, burrow's credentials stripped in every spelling), plans are entitlements, and run
//! callbacks reach only allowed targets (at create and at connect), over https, signed with each
//! user's own key and a timestamp. Network tests run in a world of namespaces the test makes
//! (`common/world.rs`); callback receivers listen on loopback only.

mod common;

use std::io::BufRead;
use std::time::Duration;

use burrow_client::Client;
use burrow_types::{CreateSandbox, ExecRequest, OnTimeout, RunSpec, SandboxState};
use common::world;
use common::*;
use reqwest::Method;

const MISSING: &str = "zzzzzzzzzzzzzzzzzzzz";

/// Request headers, as `(name, value)`.
type Headers<'a> = Vec<(&'a str, String)>;

async fn world_server(extra: &[&str]) -> Option<TestServer> {
    if !require_root("port proxy tests (network namespaces, veth, nftables)") {
        return None;
    }
    Some(TestServer::start_in_world(extra).await)
}

async fn new_user(admin: &Client, name: &str) -> String {
    admin.create_user(name, None).await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string()
}

/// One request through the server at `base`: status and body.
async fn ask(
    base: &str,
    path: &str,
    host: Option<&str>,
    headers: &[(&str, String)],
) -> (u16, String) {
    let mut rb = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(h) = host {
        rb = rb.header("host", h);
    }
    for (k, v) in headers {
        rb = rb.header(*k, v.as_str());
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Item 4 and attack A10 (docs/threat-model.md): for a caller without rights, another tenant's running, paused
/// and deleted sandboxes and an id that never existed are indistinguishable on the path route,
/// the Host route and envd; a caller with rights still learns the state.
#[tokio::test(flavor = "multi_thread")]
async fn callers_without_rights_get_one_answer_for_every_id_on_both_routes_and_envd() {
    let Some(srv) = world_server(&["--callback-allow", "10.0.0.0/8"]).await else {
        return;
    };
    let alice = srv.client();
    let mk = || async { alice.create(&CreateSandbox::default()).await.unwrap() };
    let running = mk().await;
    let paused = mk().await;
    alice.pause(&paused.id).await.unwrap();
    let deleted = mk().await;
    alice.delete(&deleted.id).await.unwrap();
    let bob_key = new_user(&alice, "bob").await;
    let bob = srv.client_with(&bob_key);
    let bobs = bob.create(&CreateSandbox::default()).await.unwrap();
    let bob_token = bobs.access_token.clone().unwrap();
    let ids = [
        running.id.as_str(),
        paused.id.as_str(),
        deleted.id.as_str(),
        MISSING,
    ];

    let callers: Vec<(&str, Headers, &str)> = vec![
        ("no credential", vec![], ""),
        (
            "another tenant's key",
            vec![("authorization", format!("Bearer {bob_key}"))],
            "",
        ),
        (
            "another tenant's key, odd spelling",
            vec![("authorization", format!("bEaReR \t{bob_key}"))],
            "",
        ),
        (
            "another tenant's key (X-API-Key)",
            vec![("x-api-key", bob_key.clone())],
            "",
        ),
        (
            "another sandbox's token",
            vec![("x-access-token", bob_token.clone())],
            "",
        ),
        (
            "a forged signed URL",
            vec![],
            "?burrow_exp=99999999999&burrow_sig=00",
        ),
    ];
    for (who, headers, query) in &callers {
        let mut by_path = Vec::new();
        let mut by_host = Vec::new();
        for id in ids {
            by_path.push(
                ask(
                    &srv.url,
                    &format!("/v1/sandboxes/{id}/ports/8000/{query}"),
                    None,
                    headers,
                )
                .await,
            );
            let host = format!("8000-{id}.{}", world::DOMAIN);
            by_host.push(ask(&srv.url, &format!("/{query}"), Some(&host), headers).await);
        }
        for (route, answers) in [("path", &by_path), ("host", &by_host)] {
            assert!(
                answers.iter().all(|a| a == &answers[0]),
                "{who} on the {route} route: answers differ by id {ids:?}: {answers:#?}"
            );
            assert!(
                [401, 404].contains(&answers[0].0),
                "{who} on the {route} route: {:?}",
                answers[0]
            );
        }
    }

    // envd's health: without the sandbox's token, one answer, by header and by Host.
    for (who, token) in [
        ("no token", None),
        ("another sandbox's token", Some(bob_token.clone())),
        ("a made-up token", Some("bst_0000".to_string())),
    ] {
        let mut answers = Vec::new();
        for id in ids {
            let mut h = vec![("e2b-sandbox-id", id.to_string())];
            if let Some(t) = &token {
                h.push(("x-access-token", t.clone()));
            }
            answers.push(ask(&srv.url, "/health", None, &h).await);
            let host = format!("49983-{id}.{}", world::DOMAIN);
            answers.push(ask(&srv.url, "/health", Some(&host), &h[1..]).await);
        }
        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "envd health with {who}: answers differ by id: {answers:#?}"
        );
        assert_eq!(answers[0].0, 401, "{who}: {:?}", answers[0]);
    }

    // Rights still see the state: the owner's key on a paused sandbox, its token on envd.
    let key = vec![("authorization", format!("Bearer {}", srv.key))];
    let (st, body) = ask(
        &srv.url,
        &format!("/v1/sandboxes/{}/ports/8000/", paused.id),
        None,
        &key,
    )
    .await;
    assert_eq!(st, 409, "{body}");
    assert!(body.contains("sandbox_not_running"), "{body}");
    let (st, body) = ask(
        &srv.url,
        "/health",
        None,
        &[
            ("e2b-sandbox-id", paused.id.clone()),
            ("x-access-token", paused.access_token.clone().unwrap()),
        ],
    )
    .await;
    assert_eq!(st, 502, "{body}");
    let (st, _) = ask(
        &srv.url,
        "/health",
        None,
        &[
            ("e2b-sandbox-id", running.id.clone()),
            ("x-access-token", running.access_token.clone().unwrap()),
        ],
    )
    .await;
    assert_eq!(st, 204);

    // Item 6, the sandbox range: another tenant's sandbox is never a callback target, even
    // with 10.0.0.0/8 allowed by the operator.
    let addr = running.network.as_ref().unwrap().address.clone();
    let err = bob
        .create(&CreateSandbox {
            run: Some(RunSpec {
                callback_url: Some(format!("http://{addr}:8000/hook")),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("callback_not_allowed"), "{err}");
}

/// Item 4: unauthenticated and foreign traffic at a sandbox's ports and envd does not reset its
/// idle clock: a short idle timeout still pauses (or destroys) it while a twin, used with its
/// token, stays up.
#[tokio::test(flavor = "multi_thread")]
async fn traffic_without_rights_does_not_keep_a_sandbox_alive() {
    let Some(srv) = world_server(&[]).await else {
        return;
    };
    let alice = srv.client();
    let idle = |on_timeout| CreateSandbox {
        timeout_s: Some(3),
        on_timeout: Some(on_timeout),
        ..Default::default()
    };
    let to_pause = alice.create(&idle(OnTimeout::Pause)).await.unwrap();
    let to_destroy = alice.create(&idle(OnTimeout::Destroy)).await.unwrap();
    // The twin: a longer timeout, so a loaded machine's slow requests cannot let it lapse; it is
    // checked only once it would have paused without its traffic.
    let kept = alice
        .create(&CreateSandbox {
            timeout_s: Some(8),
            on_timeout: Some(OnTimeout::Pause),
            ..Default::default()
        })
        .await
        .unwrap();
    let kept_since = std::time::Instant::now();
    let bob_key = new_user(&alice, "bob").await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (stop, url) = (stop.clone(), srv.url.clone());
        let ids = [to_pause.id.clone(), to_destroy.id.clone()];
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for id in &ids {
                    let path = format!("/v1/sandboxes/{id}/ports/8000/");
                    let host = format!("8000-{id}.{}", world::DOMAIN);
                    ask(&url, &path, None, &[]).await;
                    ask(&url, "/", Some(&host), &[]).await;
                    ask(&url, &path, None, &[("x-api-key", bob_key.clone())]).await;
                    ask(&url, "/health", None, &[("e2b-sandbox-id", id.clone())]).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The same request with the sandbox's token counts as activity.
    let keeper = {
        let (stop, url) = (stop.clone(), srv.url.clone());
        let path = format!("/v1/sandboxes/{}/ports/8000/", kept.id);
        let token = kept.access_token.clone().unwrap();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                ask(&url, &path, None, &[("x-access-token", token.clone())]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut paused = false;
    let mut destroyed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(paused && destroyed) && std::time::Instant::now() < deadline {
        paused = alice.get(&to_pause.id).await.unwrap().state == SandboxState::Paused;
        destroyed = alice.get(&to_destroy.id).await.is_err();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled = kept_since + Duration::from_secs(12);
    tokio::time::sleep(settled.saturating_duration_since(std::time::Instant::now())).await;
    let kept_state = alice.get(&kept.id).await.unwrap().state;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    hammer.await.unwrap();
    keeper.await.unwrap();
    assert!(paused, "traffic without rights kept a sandbox from pausing");
    assert!(
        destroyed,
        "traffic without rights kept a sandbox from its destroy"
    );
    assert_eq!(
        kept_state,
        SandboxState::Running,
        "traffic with the token should count as activity"
    );
}

/// A sandbox-side server that answers every request with its request line and headers.
const ECHO_PY: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.requestline + "\n" + str(self.headers)).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// Item 4: burrow's credentials are removed before a request reaches the sandbox, in every
/// spelling HTTP allows, on both routes; the application's own `Authorization` passes.
#[tokio::test(flavor = "multi_thread")]
async fn burrows_credentials_never_reach_the_sandbox_in_any_spelling() {
    let Some(srv) = world_server(&[]).await else {
        return;
    };
    let alice = srv.client();
    let sb = alice.create(&CreateSandbox::default()).await.unwrap();
    let id = sb.id.clone();
    let token = sb.access_token.clone().unwrap();
    let bob_key = new_user(&alice, "bob").await;
    alice
        .start_process(
            &id,
            &ExecRequest {
                cmd: vec!["python3".into(), "-c".into(), ECHO_PY.into()],
                background: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let key = srv.key.clone();
    let tok = || ("x-access-token", token.clone());
    let path = format!("/v1/sandboxes/{id}/ports/8000/echo");
    let host = format!("8000-{id}.{}", world::DOMAIN);
    // Wait for the echo server.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ask(&srv.url, &path, None, &[tok()]).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "echo server did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cases: Vec<(&str, String, Headers)> = vec![
        (
            "the owner's key in an odd spelling beside the token",
            String::new(),
            vec![("authorization", format!("BEARER\t{key}")), tok()],
        ),
        ("token header", String::new(), vec![tok()]),
        (
            "token header, upper case",
            String::new(),
            vec![("X-ACCESS-TOKEN", token.clone())],
        ),
        (
            "token header twice",
            String::new(),
            vec![("x-access-token", "junk".into()), tok()],
        ),
        (
            "token header with whitespace",
            String::new(),
            vec![("x-access-token", format!(" {token}\t"))],
        ),
        (
            "token in the query",
            format!("?burrow_token={token}&keep=1"),
            vec![],
        ),
        (
            "token in the query, upper case",
            format!("?BURROW_TOKEN={token}"),
            vec![],
        ),
        (
            "token in the query, encoded name",
            format!("?burrow%5Ftoken={token}"),
            vec![],
        ),
        (
            "bearer",
            String::new(),
            vec![("authorization", format!("Bearer {key}"))],
        ),
        (
            "bearer, lower case",
            String::new(),
            vec![("authorization", format!("bearer {key}"))],
        ),
        (
            "bearer, upper case, spaces",
            String::new(),
            vec![("authorization", format!("BEARER    {key}"))],
        ),
        (
            "bearer, tab",
            String::new(),
            vec![("authorization", format!("Bearer\t{key}"))],
        ),
        ("X-API-Key", String::new(), vec![("x-api-key", key.clone())]),
        (
            "Authorization twice",
            String::new(),
            vec![
                ("authorization", "Basic YXBwOm93bg==".into()),
                ("authorization", format!("Bearer {key}")),
            ],
        ),
        (
            "another tenant's key beside the token",
            String::new(),
            vec![("authorization", format!("Bearer {bob_key}")), tok()],
        ),
        (
            "the token as a bearer",
            String::new(),
            vec![("authorization", format!("bearer {token}"))],
        ),
        (
            "the key in Proxy-Authorization (addressed to the proxy)",
            String::new(),
            vec![("proxy-authorization", format!("Bearer {key}")), tok()],
        ),
        (
            "E2B's traffic token header",
            String::new(),
            vec![("e2b-traffic-access-token", "e2b-secret-123".into()), tok()],
        ),
        (
            "the application's own bearer",
            String::new(),
            vec![("authorization", "Bearer app-own-token".into()), tok()],
        ),
    ];
    let secrets = [
        key.as_str(),
        token.as_str(),
        bob_key.as_str(),
        "e2b-secret-123",
        "burrow_token",
        "BURROW_TOKEN",
        "burrow%5Ftoken",
    ];
    for (what, query, headers) in &cases {
        for (route, p, h) in [
            ("path", format!("{path}{query}"), None),
            ("host", format!("/echo{query}"), Some(host.as_str())),
        ] {
            let (st, echo) = ask(&srv.url, &p, h, headers).await;
            assert_eq!(st, 200, "{what} on the {route} route: {echo}");
            assert!(echo.starts_with("GET /echo"), "{what}: {echo}");
            for s in secrets {
                assert!(
                    !echo.contains(s),
                    "{what} on the {route} route: the sandbox saw {s:?}:\n{echo}"
                );
            }
        }
    }
    // What is not burrow's passes: the application's own credentials and parameters.
    let (_, echo) = ask(
        &srv.url,
        &format!("{path}?burrow_token={token}&keep=1"),
        None,
        &[
            ("authorization", "Bearer app-own-token".into()),
            ("authorization", "Basic YXBwOm93bg==".into()),
        ],
    )
    .await;
    assert!(echo.contains("GET /echo?keep=1 "), "{echo}");
    assert!(echo.contains("Bearer app-own-token"), "{echo}");
    assert!(echo.contains("Basic YXBwOm93bg=="), "{echo}");
}

/// Item 5 and attack A11 (docs/threat-model.md): a user's plan bounds the plans they may ask for (every limit at
/// most their plan's); above it is `403 plan_not_allowed` naming what is allowed, before a warm
/// sandbox is claimed; admins set plans by API and CLI; E2B creates take the user's own plan.
#[tokio::test(flavor = "multi_thread")]
async fn a_users_plan_bounds_the_plans_they_may_ask_for() {
    if !require_root("starting sandboxes") {
        return;
    }
    let plans = tempfile::NamedTempFile::new().unwrap();
    let limits = |cpu: u32, mem: u64| {
        serde_json::json!({"cpu_millis": cpu, "memory_mib": mem, "pids": 128, "disk_mib": 1024,
            "nofile": 1024, "output_bytes": 1048576, "max_duration_s": 600, "tool_calls": 20})
    };
    std::fs::write(
        plans.path(),
        serde_json::json!([
            {"name": "mini", "limits": limits(250, 256)},
            // More CPU than free, less memory: not within free.
            {"name": "lopsided", "limits": limits(1000, 256)},
        ])
        .to_string(),
    )
    .unwrap();
    let pools = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        pools.path(),
        serde_json::json!({"big": {"plan": "scale", "size": 1}}).to_string(),
    )
    .unwrap();
    let srv = TestServer::start_with_env(&[
        ("BURROW_PLANS", plans.path().to_str().unwrap()),
        ("BURROW_POOLS", pools.path().to_str().unwrap()),
    ])
    .await;
    let admin = srv.client();
    let bob_key = new_user(&admin, "bob").await;
    let bob = srv.client_with(&bob_key);
    let big = || async {
        admin
            .pools()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.name == "big")
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while big().await.ready < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool did not fill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ask_plan = |plan: &str| CreateSandbox {
        plan: Some(plan.into()),
        ..Default::default()
    };
    for plan in ["scale", "pro", "lopsided"] {
        let (st, body) = bob
            .raw(Method::POST, "/v1/sandboxes", Some(&ask_plan(plan)))
            .await
            .unwrap();
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(st.as_u16(), 403, "{plan}: {err}");
        assert_eq!(err["code"], "plan_not_allowed", "{err}");
        assert_eq!(err["details"]["plan"], plan);
        assert_eq!(err["details"]["user_plan"], "free");
        assert_eq!(
            err["details"]["allowed"],
            serde_json::json!(["free", "mini"]),
            "{err}"
        );
    }
    // Nothing was claimed or made for the refused creates.
    let p = big().await;
    assert_eq!((p.ready, p.claims), (1, 0));
    assert!(bob.list().await.unwrap().is_empty());
    for plan in ["free", "mini"] {
        assert_eq!(bob.create(&ask_plan(plan)).await.unwrap().plan, plan);
    }
    // Only admins set plans.
    assert_eq!(
        bob.set_user_plan("bob", "scale").await.unwrap_err().code(),
        Some("forbidden")
    );
    assert_eq!(
        admin.set_user_plan("bob", "nope").await.unwrap_err().code(),
        Some("unknown_plan")
    );
    let out = srv.cli(&["admin", "set-plan", "bob", "pro"]);
    assert_ok(&out);
    assert!(stdout(&out).starts_with("bob pro"), "{}", stdout(&out));
    assert_eq!(bob.create(&ask_plan("pro")).await.unwrap().plan, "pro");
    assert_eq!(
        bob.create(&ask_plan("scale")).await.unwrap_err().code(),
        Some("plan_not_allowed")
    );
    // E2B creates have no plan field: they take the user's own plan.
    let (st, body) = reqwest::Client::new()
        .post(format!("{}/sandboxes", srv.url))
        .header("x-api-key", &bob_key)
        .json(&serde_json::json!({"templateID": "base", "timeout": 60}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    let created: serde_json::Value = body.json().await.unwrap();
    assert_eq!(st, 201, "{created}");
    let sid = created["sandboxID"].as_str().unwrap();
    assert_eq!(bob.get(sid).await.unwrap().plan, "pro");
    // An admin may ask for any plan, and claims the warm one. (Bob's creates above may have
    // claimed the pool's sandbox: a warm sandbox serves any plan with its disk and open-file
    // limit. Wait for the pool to be refilled.)
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while big().await.ready < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool did not refill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let warm = admin.create(&ask_plan("scale")).await.unwrap();
    assert!(warm.warm_hit);
}

/// Item 6 and attack A12 (docs/threat-model.md): callback URLs at loopback, link-local/metadata, private ranges,
/// multicast or unspecified addresses are refused at create and at a new run, in every
/// spelling, names included.
#[tokio::test(flavor = "multi_thread")]
async fn callback_targets_are_refused_in_every_spelling() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let with = |url: &str| CreateSandbox {
        run: Some(RunSpec {
            callback_url: Some(url.into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let refused = [
        "http://127.0.0.1:9/hook",
        "https://127.0.0.1/hook",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://127.0.0.1./",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://localhost:9/",
        "http://localhost./",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]/",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.0.1/",
        "http://100.64.0.1/",
        "http://[fd00::1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://0/",
        "http://[::]/",
    ];
    for url in refused {
        let err = c.create(&with(url)).await.unwrap_err();
        assert_eq!(err.code(), Some("callback_not_allowed"), "{url}: {err}");
    }
    assert!(
        c.list().await.unwrap().is_empty(),
        "a refused create made a sandbox"
    );
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    for url in ["http://127.0.0.1:9/", "http://localhost/"] {
        let err = c
            .start_run(
                &sb.id,
                &RunSpec {
                    callback_url: Some(url.into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("callback_not_allowed"), "{url}: {err}");
    }
    // Malformed URLs stay plain bad requests.
    for url in ["ftp://example.test/", "http://user@example.test/"] {
        let err = c.create(&with(url)).await.unwrap_err();
        assert_eq!(err.code(), Some("bad_request"), "{url}: {err}");
    }
}

async fn metrics(srv: &TestServer) -> String {
    reqwest::get(format!("{}/metrics", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Item 6 at connect time: a name that resolved somewhere allowed at create and resolves to
/// loopback when the callback is sent is refused then (the HTTP client's resolver applies the
/// rules to every address). A twin name that stays allowed is delivered. Names come from a
/// private `/etc/hosts` of the server's, so no DNS query leaves the machine.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_turns_to_loopback_after_create_is_refused_at_connect() {
    if !require_root("starting sandboxes") {
        return;
    }
    let (bad_port, bad_calls) = http_receiver("127.0.0.1:0");
    let (good_port, good_calls) = http_receiver("127.0.0.2:0");
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let table = |flip: &str| {
        format!("127.0.0.1 localhost\n::1 localhost\n127.0.0.2 good.test\n{flip} flip.test\n")
    };
    std::fs::write(&hosts, table("203.0.113.10")).unwrap();
    let srv =
        TestServer::start_with_hosts_file(&hosts, &[("BURROW_CALLBACK_ALLOW", "127.0.0.2/32")])
            .await;
    let c = srv.client();
    let with = |url: String| CreateSandbox {
        run: Some(RunSpec {
            callback_url: Some(url),
            ..Default::default()
        }),
        ..Default::default()
    };
    let flip = c
        .create(&with(format!("http://flip.test:{bad_port}/hook")))
        .await
        .expect("flip.test is 203.0.113.10 at create: allowed");
    let good = c
        .create(&with(format!("http://good.test:{good_port}/hook")))
        .await
        .unwrap();
    // Edited in place (same inode), so the server's bind mount sees it.
    std::fs::write(&hosts, table("127.0.0.1")).unwrap();

    c.end_run(&good.id).await.unwrap();
    let (head, body) = good_calls
        .recv_timeout(Duration::from_secs(30))
        .expect("the allowed name's callback was not delivered");
    assert!(head.starts_with("POST /hook"), "{head}");
    assert!(body.contains("run.ended"), "{body}");

    c.end_run(&flip.id).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = metrics(&srv).await;
    let counted = |m: &str| {
        m.lines()
            .any(|l| l == "burrow_callbacks_total{result=\"refused\"} 1")
    };
    while !counted(&seen) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        seen = metrics(&srv).await;
    }
    let refused = counted(&seen);
    assert!(
        bad_calls.try_recv().is_err(),
        "the callback reached loopback through a name"
    );
    assert!(refused, "no refused callback counted:\n{seen}");
    // And a new run naming it now is refused at once.
    let err = c
        .create(&with(format!("http://flip.test:{bad_port}/hook")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("callback_not_allowed"), "{err}");
}

/// Items 10 and 13: `https://` callbacks are delivered (rustls, with the operator's CA), signed
/// with the calling user's own key over a timestamp and the body; `GET /v1/callback-key` shows
/// each user theirs only.
#[tokio::test(flavor = "multi_thread")]
async fn https_callbacks_are_signed_with_the_users_own_key_and_a_timestamp() {
    if !require_root("starting sandboxes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A CA of the test's own (what `--callback-ca` trusts) and a leaf for 127.0.0.2 it signed.
    let p = |f: &str| dir.path().join(f);
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(
        p("leaf.ext"),
        "subjectAltName=IP:127.0.0.2\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for args in [
        [
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=burrow test CA"],
        ]
        .concat(),
        [&["req"][..], &ec, &["-subj", "/CN=127.0.0.2"]].concat(),
    ] {
        let (k, out) = if args.contains(&"-x509") {
            ("ca.key", "ca.pem")
        } else {
            ("key.pem", "leaf.csr")
        };
        let made = std::process::Command::new("openssl")
            .args(&args)
            .arg("-keyout")
            .arg(p(k))
            .arg("-out")
            .arg(p(out))
            .output()
            .expect("openssl");
        assert_ok(&made);
    }
    let signed = std::process::Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
        .arg("-in")
        .arg(p("leaf.csr"))
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("leaf.ext"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert_ok(&signed);
    let receiver_py = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        print(json.dumps({"sig": self.headers.get("x-burrow-signature"), "body": body.decode()}), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.2", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut receiver = std::process::Command::new("python3")
        .arg("-c")
        .arg(receiver_py)
        .arg(&cert)
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lines = std::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let _receiver = Kill(receiver);
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let (tx, calls) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });

    let srv = TestServer::start_with_env(&[
        ("BURROW_CALLBACK_ALLOW", "127.0.0.2/32"),
        ("BURROW_CALLBACK_CA", ca.to_str().unwrap()),
    ])
    .await;
    let admin = srv.client();
    let bob = srv.client_with(&new_user(&admin, "bob").await);
    let bob_key = bob.callback_key().await.unwrap();
    let admin_key = admin.callback_key().await.unwrap();
    let bk = bob_key["key"].as_str().unwrap().to_string();
    assert_eq!(bk.len(), 64);
    assert_ne!(
        bk,
        admin_key["key"].as_str().unwrap(),
        "users share a callback key"
    );
    assert_eq!(bob.callback_key().await.unwrap()["key"], bob_key["key"]);
    assert_eq!(bob_key["replay_window_s"], 300);

    let sb = bob
        .create(&CreateSandbox {
            run: Some(RunSpec {
                task: "t".into(),
                callback_url: Some(format!("https://127.0.0.2:{port}/hook")),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("https callbacks are accepted");
    bob.end_run(&sb.id).await.unwrap();
    let line = calls
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no https callback:\n{}", srv.log()));
    let got: serde_json::Value = serde_json::from_str(&line).unwrap();
    let body = got["body"].as_str().unwrap();
    let event: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["event"], "run.ended");
    assert_eq!(event["sandbox_id"], sb.id.as_str());
    assert!(event["id"].as_str().is_some_and(|i| i.starts_with("evt_")));
    let t = event["timestamp"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - t).abs() <= 300, "timestamp {t} is not now ({now})");
    let sig = got["sig"].as_str().unwrap();
    let mac = |k: &str| {
        let m =
            burrow_server::callback::hmac_sha256(k.as_bytes(), format!("{t}.{body}").as_bytes());
        format!(
            "t={t},v1={}",
            m.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    assert_eq!(sig, mac(&bk), "not signed with bob's key over t.body");
    assert_ne!(sig, mac(admin_key["key"].as_str().unwrap()));
    assert!(metrics(&srv)
        .await
        .lines()
        .any(|l| l == "burrow_callbacks_total{result=\"delivered\"} 1"));
}
