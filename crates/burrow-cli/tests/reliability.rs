//! Reliability (issue 10, items 4-8 and 11, and issue 9's host pid budget), against a real
//! `burrow up`: a database locked by another process or made unwritable, the data directory's
//! permissions, slow and idle connections, numbers out of range, idempotency keys, quotas, the
//! host's pid budget, and the OpenAPI document checked against the server by schemathesis.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burrow_types::{CreateSandbox, SandboxState};
use common::*;
use serde_json::{json, Value};

/// No request here may take this long: a response slower than this is a hang.
const HANG: Duration = Duration::from_secs(30);

/// A response: status, headers, body as JSON (Null when it is not JSON).
struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Resp {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or_default()
    }

    fn retry_after(&self) -> Option<u64> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

/// One request with `key` (as a bearer token), an optional JSON body and extra headers. Panics
/// if it does not answer within [`HANG`].
async fn call(
    base: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Resp {
    send(&http_client(), base, key, method, path, body, headers).await
}

/// A client whose requests give up after [`HANG`]. Building one loads the system's root
/// certificates: a test making many requests at once shares one.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(HANG).build().unwrap()
}

/// [`call`] through `http`.
async fn send(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut rb = http
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .bearer_auth(key);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let t = Instant::now();
    let resp = rb.send().await.unwrap_or_else(|e| {
        panic!(
            "{method} {path} did not answer (after {:?}): {e:?}",
            t.elapsed()
        )
    });
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    Resp {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

impl TestServer {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        call(&self.url, &self.key, method, path, body.as_ref(), &[]).await
    }
}

/// A second process holding SQLite's write lock on `db` (`BEGIN IMMEDIATE` or `EXCLUSIVE`)
/// until it is killed. Returns once it holds it.
fn lock_database(db: &Path, mode: &str) -> Proc {
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
             c.execute('BEGIN ' + sys.argv[2])\n\
             print('locked', flush=True)\n\
             time.sleep(600)\n",
        )
        .arg(db)
        .arg(mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked", "the locking process failed");
    Proc(child)
}

/// A child process this test started; ended (by its pid) when dropped, also on a panic.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ends a child process this test started, by its pid.
fn end(child: Proc) {
    drop(child);
}

/// Polls `/v1/health` until its `status` is `want` (for up to 30 s); returns the last answer.
async fn health_becomes(srv: &TestServer, want: &str) -> Resp {
    let deadline = Instant::now() + HANG;
    loop {
        let h = srv.call("GET", "/v1/health", None).await;
        if h.body["status"] == want || Instant::now() > deadline {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_locked_by_another_process_is_503_while_reads_go_on() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    let db = srv.data.join("burrow.db");
    for mode in ["IMMEDIATE", "EXCLUSIVE"] {
        let locker = lock_database(&db, mode);

        let health = health_becomes(&srv, "degraded").await;
        assert_eq!(health.status, 200);
        assert_eq!(health.body["status"], "degraded", "{health:?}");
        assert_eq!(health.body["database"]["writable"], false);
        assert_eq!(
            health.body["problems"][0]["code"], "database_busy",
            "{health:?}"
        );
        // Reads go on: list, get, metrics, and an exec that writes nothing.
        let list = srv.call("GET", "/v1/sandboxes", None).await;
        assert_eq!(list.status, 200, "{list:?}");
        assert_eq!(list.body[0]["id"], sb.id.as_str());
        let get = srv
            .call("GET", &format!("/v1/sandboxes/{}", sb.id), None)
            .await;
        assert_eq!(get.status, 200, "{get:?}");
        assert_eq!(srv.call("GET", "/metrics", None).await.status, 200);
        let exec = srv
            .call(
                "POST",
                &format!("/v1/sandboxes/{}/exec", sb.id),
                Some(json!({"cmd": ["echo", "hi"]})),
            )
            .await;
        assert_eq!(
            (exec.status, exec.body["stdout"].as_str()),
            (200, Some("hi\n")),
            "{exec:?}"
        );
        // Writes answer 503 with Retry-After and a stable code, and make nothing.
        let before = srv.host_sandbox_dirs().len();
        for _ in 0..3 {
            let create = srv.call("POST", "/v1/sandboxes", Some(json!({}))).await;
            assert_eq!(
                (create.status, create.code()),
                (503, "database_busy"),
                "{create:?}"
            );
            assert!(create.retry_after().is_some(), "no Retry-After: {create:?}");
        }
        let timeout = srv
            .call(
                "POST",
                &format!("/v1/sandboxes/{}/timeout", sb.id),
                Some(json!({"timeout_s": 600})),
            )
            .await;
        assert_eq!(
            (timeout.status, timeout.code()),
            (503, "database_busy"),
            "{timeout:?}"
        );
        assert!(timeout.retry_after().is_some());
        assert_eq!(
            srv.host_sandbox_dirs().len(),
            before,
            "a refused create left a sandbox"
        );

        end(locker);
        let health = health_becomes(&srv, "ok").await;
        assert_eq!(health.body["status"], "ok", "never recovered: {health:?}");
        let made = c.create(&CreateSandbox::default()).await.unwrap();
        c.delete(&made.id).await.unwrap();
    }
    c.delete(&sb.id).await.unwrap();
}

/// Many requests at once while another process holds the write lock: the writes wait for the
/// lock (each for its bounded time) on the blocking pool, so they cannot occupy the runtime's
/// few workers, and health checks, lists and the writes themselves all get their answers. (On a
/// server whose store calls ran on its workers, 150 writes each holding a worker for up to a
/// second left health and lists queued behind them for minutes.) The deadline is only there so
/// a hang fails instead of waiting forever; nothing here is timed.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_stalls_no_worker_under_many_concurrent_requests() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    let locker = lock_database(&srv.data.join("burrow.db"), "IMMEDIATE");
    // Health caches its probe briefly: from here on it has seen the lock.
    let health = health_becomes(&srv, "degraded").await;
    assert_eq!(health.body["status"], "degraded", "{health:?}");

    const WRITES: usize = 150;
    const READS: usize = 50;
    let timeout_path = format!("/v1/sandboxes/{}/timeout", sb.id);
    // One client for all (building one per request costs more than the request); each request
    // that finds no idle connection opens its own, so these are as many connections at once.
    let http = http_client();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..WRITES + 2 * READS {
        let (http, base, key) = (http.clone(), srv.url.clone(), srv.key.clone());
        let (what, method, path, body) = if i < WRITES {
            let body = json!({"timeout_s": 600});
            ("write", "POST", timeout_path.clone(), Some(body))
        } else if i % 2 == 0 {
            ("health", "GET", "/v1/health".to_string(), None)
        } else {
            ("list", "GET", "/v1/sandboxes".to_string(), None)
        };
        calls.spawn(async move {
            let r = send(&http, &base, &key, method, &path, body.as_ref(), &[]).await;
            (what, r)
        });
    }
    let mut seen = BTreeMap::<&str, usize>::new();
    while let Some(done) = calls.join_next().await {
        // `call` panics on a request that does not answer within its deadline.
        let (what, r) = done.unwrap_or_else(|e| {
            let log = srv.log();
            let tail = &log[log.len().saturating_sub(3000)..];
            panic!("a request did not answer: {e}\nthe server's log ends:\n{tail}")
        });
        *seen.entry(what).or_default() += 1;
        match what {
            "write" => {
                assert_eq!((r.status, r.code()), (503, "database_busy"), "{r:?}");
                assert!(r.retry_after().is_some(), "no Retry-After: {r:?}");
            }
            "health" => {
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(r.body["status"], "degraded", "{r:?}");
                assert_eq!(r.body["problems"][0]["code"], "database_busy", "{r:?}");
            }
            _ => {
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(r.body[0]["id"], sb.id.as_str(), "{r:?}");
            }
        }
    }
    assert_eq!(
        seen,
        BTreeMap::from([("health", READS), ("list", READS), ("write", WRITES)])
    );

    end(locker);
    let health = health_becomes(&srv, "ok").await;
    assert_eq!(health.body["status"], "ok", "never recovered: {health:?}");
    let done = srv
        .call("POST", &timeout_path, Some(json!({"timeout_s": 600})))
        .await;
    assert_eq!(done.status, 200, "{done:?}");
    c.delete(&sb.id).await.unwrap();
}

/// `chattr +i` on files while it lives: even root cannot write them (the read-only database of
/// the issue; file modes do not stop root).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Immutable {
        for p in paths {
            let s = Command::new("chattr").arg("+i").arg(p).status().unwrap();
            assert!(s.success(), "chattr +i {}", p.display());
        }
        Immutable(paths.to_vec())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_cannot_be_written_is_503_and_recovers() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    let db = srv.data.join("burrow.db");
    let wal = srv.data.join("burrow.db-wal");
    {
        let _ro = Immutable::set(&[db.clone(), wal.clone()]);
        let health = health_becomes(&srv, "degraded").await;
        assert_eq!(health.body["status"], "degraded", "{health:?}");
        assert_eq!(
            health.body["problems"][0]["code"], "database_unavailable",
            "{health:?}"
        );
        assert!(
            health.body["problems"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("burrow.db"),
            "health does not say which file: {health:?}"
        );
        let list = srv.call("GET", "/v1/sandboxes", None).await;
        assert_eq!(
            (list.status, list.body[0]["id"].as_str()),
            (200, Some(sb.id.as_str()))
        );
        let get = srv
            .call("GET", &format!("/v1/sandboxes/{}", sb.id), None)
            .await;
        assert_eq!(get.status, 200);
        let before = srv.host_sandbox_dirs().len();
        let create = srv.call("POST", "/v1/sandboxes", Some(json!({}))).await;
        assert_eq!(
            (create.status, create.code()),
            (503, "database_unavailable"),
            "{create:?}"
        );
        assert!(create.retry_after().is_some(), "{create:?}");
        assert_eq!(srv.host_sandbox_dirs().len(), before);
        let list = srv.call("GET", "/v1/sandboxes", None).await;
        assert_eq!(list.body.as_array().map(Vec::len), Some(1), "{list:?}");
    }
    // Writable again: the server carries on without a restart.
    let health = health_becomes(&srv, "ok").await;
    assert_eq!(health.body["status"], "ok", "{health:?}");
    let made = c.create(&CreateSandbox::default()).await.unwrap();
    c.delete(&made.id).await.unwrap();
    c.delete(&sb.id).await.unwrap();
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_directory_is_checked_at_start_and_the_database_is_private() {
    if !require_root("burrow up") {
        return;
    }
    // A directory above the data directory that sandboxes cannot pass through: refused at
    // start, naming it and the mode it needs (not a 500 at every create).
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o711);
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    chmod(&locked, 0o700);
    let up = Command::new(BURROW)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(locked.join("data"))
        .env("HOME", tmp.path())
        .env("BURROW_ADMIN_KEY", "burrow_test_0123456789abcdef0123456789")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = Proc(up);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = up.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "burrow up started with a data directory sandboxes cannot reach"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    up.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&locked.display().to_string()) && err.contains("0700") && err.contains("0711"),
        "the refusal does not name the directory and the modes: {err}"
    );

    // The data directory itself at 0700 is burrow's own: given search permission at start.
    let mut srv = TestServer::start().await;
    srv.kill9();
    chmod(&srv.data, 0o700);
    srv.restart().await;
    assert_eq!(
        mode_of(&srv.data) & 0o001,
        0o001,
        "data dir still not traversable"
    );
    let c = srv.client();
    let sb = c
        .create(&CreateSandbox {
            env: BTreeMap::from([("SECRET".to_string(), "s3cret".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap();
    // The database holds env values: the server's alone.
    for f in ["burrow.db", "burrow.db-wal", "burrow.db-shm"] {
        assert_eq!(mode_of(&srv.data.join(f)), 0o600, "{f}");
    }
    c.delete(&sb.id).await.unwrap();
}

/// A raw connection to the server, for clients that misbehave.
fn raw(srv: &TestServer) -> std::net::TcpStream {
    let addr: std::net::SocketAddr = srv.url.trim_start_matches("http://").parse().unwrap();
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// Whether the server has closed `s` (EOF or reset), reading and dropping anything it sent.
/// Returns what was read before.
fn closed_by_server(s: &mut std::net::TcpStream, seen: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => {
            seen.extend_from_slice(&buf[..n]);
            false
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_slow_bodies_and_long_keep_alives_are_cut_off() {
    if !require_root("burrow up") {
        return;
    }
    let srv = TestServer::start_with_env(&[
        ("BURROW_HEADER_TIMEOUT", "2"),
        ("BURROW_BODY_TIMEOUT", "2"),
        ("BURROW_BODY_MIN_RATE", "1000"),
        ("BURROW_MAX_REQUESTS_PER_CONNECTION", "3"),
    ])
    .await;

    // Slowloris: a header line every 300 ms, never finished.
    let mut loris = raw(&srv);
    loris
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Slow POST: headers at once, then one byte of body every 300 ms.
    let mut slow = raw(&srv);
    slow.write_all(
        format!(
            "POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{",
            srv.key
        )
        .as_bytes(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut loris_closed, mut slow_closed) = (false, false);
    let (mut loris_seen, mut slow_seen) = (Vec::new(), Vec::new());
    let mut others_served = 0;
    while !(loris_closed && slow_closed) && Instant::now() < deadline {
        if !loris_closed {
            let _ = loris.write_all(b"X-A: b\r\n");
            loris_closed = closed_by_server(&mut loris, &mut loris_seen);
        }
        if !slow_closed {
            let _ = slow.write_all(b" ");
            slow_closed = closed_by_server(&mut slow, &mut slow_seen);
        }
        // Everyone else is served meanwhile.
        let h = srv.call("GET", "/v1/health", None).await;
        assert_eq!(h.status, 200);
        others_served += 1;
    }
    assert!(
        loris_closed,
        "a request whose headers never end was kept open for 60 s"
    );
    assert!(slow_closed, "a body sent at 3 bytes/s was read for 60 s");
    let slow_text = String::from_utf8_lossy(&slow_seen);
    assert!(
        slow_seen.is_empty() || slow_text.starts_with("HTTP/1.1 408"),
        "a slow body got {slow_text}"
    );
    assert!(others_served > 0);

    // Keep-alive: the third request on one connection is its last; then the server closes it.
    let mut ka = raw(&srv);
    let mut seen = Vec::new();
    for i in 1..=3 {
        ka.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let deadline = Instant::now() + HANG;
        loop {
            let before = seen.len();
            let closed = closed_by_server(&mut ka, &mut seen);
            let text = String::from_utf8_lossy(&seen);
            if text.matches("HTTP/1.1 200").count() >= i && seen.len() == before {
                break;
            }
            assert!(!closed || i == 3, "closed after {i} requests: {text}");
            assert!(Instant::now() < deadline, "no answer to request {i}");
        }
    }
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert_eq!(text.matches("connection: close").count(), 1, "{text}");
    let deadline = Instant::now() + HANG;
    while !closed_by_server(&mut ka, &mut seen) {
        assert!(
            Instant::now() < deadline,
            "the connection stayed open after its last request"
        );
    }

    // An idle kept-alive connection is closed after the header timeout.
    let mut idle = raw(&srv);
    idle.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !closed_by_server(&mut idle, &mut seen) {
        assert!(
            Instant::now() < deadline,
            "an idle kept-alive connection stayed open"
        );
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
}

/// One process of the flood: opens `n` connections from 127.0.0.2, sends half a request on each,
/// prints how many it holds, then sleeps until killed.
const FLOOD: &str = r#"
import resource, selectors, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.bind(("127.0.0.2", 0))
    s.connect_ex((host, port))
    socks.append(s)
sel = selectors.DefaultSelector()
for s in socks:
    sel.register(s, selectors.EVENT_WRITE)
pending, sent, deadline = len(socks), 0, time.time() + 60
while pending and time.time() < deadline:
    for key, _ in sel.select(timeout=1):
        s = key.fileobj
        sel.unregister(s)
        pending -= 1
        try:
            s.send(b"GET /v1/health HTTP/1.1\r\nHost: flood\r\n")
            sent += 1
        except OSError:
            pass
print(sent, flush=True)
time.sleep(3600)
"#;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn nofile_limit(pid: u32) -> usize {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_idle_connections_from_one_address_leave_others_served() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let addr: std::net::SocketAddr = srv.url.trim_start_matches("http://").parse().unwrap();
    // 20,000 in four processes of 5,000 (each process has the same open-files limit as ours).
    let mut flood: Vec<Proc> = (0..4)
        .map(|_| {
            Proc(
                Command::new("/usr/bin/python3")
                    .arg("-c")
                    .arg(FLOOD)
                    .arg(addr.ip().to_string())
                    .arg(addr.port().to_string())
                    .arg("5000")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("run python3"),
            )
        })
        .collect();
    let mut sent = 0;
    for child in &mut flood {
        let mut line = String::new();
        std::io::BufReader::new(child.0.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        sent += line.trim().parse::<u64>().unwrap_or(0);
    }
    eprintln!("the flood sent half a request on {sent} connections");

    // While they sit there, a client on 127.0.0.1 gets everything done.
    let health = srv.call("GET", "/v1/health", None).await;
    assert_eq!(health.status, 200);
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    let r = run(&c, &sb.id, "echo still-here").await;
    assert_eq!(r.stdout, "still-here\n");
    assert_eq!(srv.call("GET", "/v1/sandboxes", None).await.status, 200);
    // The server kept descriptors for its own work.
    let (fds, limit) = (open_fds(srv.pid()), nofile_limit(srv.pid()));
    eprintln!("server holds {fds} of {limit} descriptors");
    assert!(
        fds < limit * 9 / 10,
        "server holds {fds} of {limit} descriptors"
    );
    c.delete(&sb.id).await.unwrap();
    for child in flood {
        end(child);
    }
    assert!(sent > 0, "the flood never connected");
}

#[tokio::test(flavor = "multi_thread")]
async fn numbers_out_of_range_are_400s_that_name_the_field_and_range() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let big = json!(9_223_372_036_854_775_808_u64); // i64::MAX + 1
    let max = json!(u64::MAX);
    let expect = |r: &Resp, field: &str, range: &str| {
        assert_eq!(r.status, 400, "{r:?}");
        assert!(
            r.message().contains(field) && r.message().contains(range),
            "400 does not name {field} and {range}: {r:?}"
        );
    };
    for t in [&big, &max, &json!(0)] {
        let r = srv
            .call("POST", "/v1/sandboxes", Some(json!({"timeout_s": t})))
            .await;
        expect(&r, "timeout_s", "1 and 31536000");
    }
    assert!(
        srv.host_sandbox_dirs().is_empty(),
        "a refused create left something"
    );
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    let id = &sb.id;
    let r = srv
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/timeout"),
            Some(json!({"timeout_s": big})),
        )
        .await;
    expect(&r, "timeout_s", "1 and 31536000");
    for t in [json!(0), max.clone()] {
        let r = srv
            .call(
                "POST",
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"cmd": ["true"], "timeout_ms": t})),
            )
            .await;
        expect(&r, "timeout_ms", "1 and 604800000");
    }
    for limit in ["0", "5000"] {
        let r = srv
            .call(
                "GET",
                &format!("/v1/sandboxes/{id}/files/list?path=/&limit={limit}"),
                None,
            )
            .await;
        expect(&r, "limit", "1 and 1000");
    }
    let r = srv
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/processes/1/signal"),
            Some(json!({"signal": 500})),
        )
        .await;
    expect(&r, "signal", "1 and 64");
    // JSON has one kind of number: 60.0 is the integer 60.
    let r = srv
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/timeout"),
            Some(json!({"timeout_s": 60.0})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["timeout_s"].as_u64()),
        (200, Some(60)),
        "{r:?}"
    );

    // The E2B facade, with E2B's field names.
    let e2b = |method: &'static str, path: String, body: Value| {
        let (url, key) = (srv.url.clone(), srv.key.clone());
        async move {
            let http = reqwest::Client::builder().timeout(HANG).build().unwrap();
            let resp = http
                .request(method.parse().unwrap(), format!("{url}{path}"))
                .header("X-API-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                body["message"].as_str().unwrap_or_default().to_string(),
            )
        }
    };
    for body in [
        json!({"templateID": "base", "timeout": big}),
        json!({"timeout": max}),
    ] {
        let (status, msg) = e2b("POST", "/sandboxes".into(), body).await;
        assert_eq!(status, 400, "{msg}");
        assert!(msg.contains("timeout") && msg.contains("31536000"), "{msg}");
    }
    let (status, msg) = e2b(
        "POST",
        format!("/sandboxes/{id}/timeout"),
        json!({"timeout": big}),
    )
    .await;
    assert!(status == 400 && msg.contains("timeout"), "{status} {msg}");
    let (status, msg) = e2b(
        "POST",
        format!("/sandboxes/{id}/refreshes"),
        json!({"duration": big}),
    )
    .await;
    assert!(status == 400 && msg.contains("duration"), "{status} {msg}");
    let (status, msg) = e2b("GET", "/v2/sandboxes?limit=0".into(), json!({})).await;
    assert!(status == 400 && msg.contains("limit"), "{status} {msg}");
    c.delete(id).await.unwrap();
}

/// Sandboxes of the caller whose metadata `tag` is `value`.
async fn tagged(srv: &TestServer, key: &str, tag: &str, value: &str) -> Vec<String> {
    let list = call(&srv.url, key, "GET", "/v1/sandboxes", None, &[]).await;
    list.body
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["metadata"][tag] == value)
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_makes_one_sandbox_however_often_it_is_sent() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let body = |n: &str| json!({"metadata": {"k": n}});
    let create = |key: &'static str, b: Value| {
        let (url, k) = (srv.url.clone(), srv.key.clone());
        async move {
            call(
                &url,
                &k,
                "POST",
                "/v1/sandboxes",
                Some(&b),
                &[("Idempotency-Key", key)],
            )
            .await
        }
    };

    // A repeat answers with the first sandbox; the same key with another body is a 422.
    let first = create("key-1", body("one")).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = create("key-1", body("one")).await;
    assert_eq!(
        (again.status, &again.body["id"]),
        (201, &first.body["id"]),
        "{again:?}"
    );
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let other = create("key-1", body("two")).await;
    assert_eq!(
        (other.status, other.code()),
        (422, "idempotency_key_reused"),
        "{other:?}"
    );
    assert_eq!(tagged(&srv, &srv.key, "k", "one").await.len(), 1);
    assert!(tagged(&srv, &srv.key, "k", "two").await.is_empty());

    // Concurrent repeats: one sandbox, every answer names it.
    let answers =
        futures_util::future::join_all((0..8).map(|_| create("key-2", body("concurrent")))).await;
    let ids: std::collections::BTreeSet<_> = answers
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{r:?}");
            r.body["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "concurrent repeats made {ids:?}");
    assert_eq!(tagged(&srv, &srv.key, "k", "concurrent").await.len(), 1);

    // A client that gives up before the answer and retries gets the one sandbox.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(5))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/sandboxes", srv.url))
        .bearer_auth(&srv.key)
        .header("Idempotency-Key", "key-3")
        .json(&body("retried"))
        .send()
        .await;
    assert!(gave_up.is_err(), "the create answered within 5 ms");
    let retry = create("key-3", body("retried")).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let made = tagged(&srv, &srv.key, "k", "retried").await;
    assert_eq!(made, vec![retry.body["id"].as_str().unwrap().to_string()]);

    // Keys are per user: another user's "key-1" is theirs.
    let bob = c.create_user("bob", None).await.unwrap();
    let bob_key = bob["api_key"].as_str().unwrap();
    let theirs = call(
        &srv.url,
        bob_key,
        "POST",
        "/v1/sandboxes",
        Some(&body("one")),
        &[("Idempotency-Key", "key-1")],
    )
    .await;
    assert_eq!(theirs.status, 201, "{theirs:?}");
    assert_ne!(theirs.body["id"], first.body["id"]);
    assert_eq!(theirs.header("idempotent-replayed"), None);

    // A malformed key is refused before anything is made.
    let long = "x".repeat(300);
    let bad = call(
        &srv.url,
        &srv.key,
        "POST",
        "/v1/sandboxes",
        Some(&body("bad")),
        &[("Idempotency-Key", long.as_str())],
    )
    .await;
    assert_eq!(bad.status, 400, "{bad:?}");

    // The E2B facade honours the header too.
    let e2b = |b: Value| {
        let (url, key) = (srv.url.clone(), srv.key.clone());
        async move {
            let resp = reqwest::Client::builder()
                .timeout(HANG)
                .build()
                .unwrap()
                .post(format!("{url}/sandboxes"))
                .header("X-API-Key", key)
                .header("Idempotency-Key", "e2b-1")
                .json(&b)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (s1, b1) = e2b(json!({"templateID": "base", "metadata": {"k": "e2b"}})).await;
    let (s2, b2) = e2b(json!({"metadata": {"k": "e2b"}, "templateID": "base"})).await;
    assert_eq!((s1, s2), (201, 201), "{b1} {b2}");
    assert_eq!(b1["sandboxID"], b2["sandboxID"]);
    let (s3, b3) = e2b(json!({"templateID": "base", "metadata": {"k": "other"}})).await;
    assert_eq!(s3, 422, "{b3}");
    assert_eq!(tagged(&srv, &srv.key, "k", "e2b").await.len(), 1);

    for id in c.list().await.unwrap() {
        c.delete(&id.id).await.unwrap();
    }
    let bob_c = srv.client_with(bob_key);
    bob_c
        .delete(theirs.body["id"].as_str().unwrap())
        .await
        .unwrap();
}

/// A server whose `capped` plan allows two live sandboxes per user, and a user on it.
async fn capped_server() -> (TestServer, tempfile::NamedTempFile, String) {
    let plans = tempfile::NamedTempFile::new().unwrap();
    let capped = json!([{ "name": "capped", "limits": {
        "cpu_millis": 500, "memory_mib": 256, "pids": 64, "disk_mib": 256, "nofile": 1024,
        "output_bytes": 1048576, "max_duration_s": 3600, "tool_calls": 20 },
        "quota": { "sandboxes": 2 } }]);
    std::fs::write(plans.path(), capped.to_string()).unwrap();
    let srv = TestServer::start_with_env(&[("BURROW_PLANS", plans.path().to_str().unwrap())]).await;
    let user = srv
        .client()
        .create_user("quinn", Some("capped"))
        .await
        .unwrap();
    let key = user["api_key"].as_str().unwrap().to_string();
    (srv, plans, key)
}

/// One create (empty body) as `key`.
async fn create_as(srv: &TestServer, key: &str) -> Resp {
    call(
        &srv.url,
        key,
        "POST",
        "/v1/sandboxes",
        Some(&json!({})),
        &[],
    )
    .await
}

/// `n` creates at once as `key`; returns the answers.
async fn burst(srv: &TestServer, key: &str, n: usize) -> Vec<Resp> {
    futures_util::future::join_all((0..n).map(|_| create_as(srv, key))).await
}

fn assert_quota_refusal(r: &Resp, quota: &str, limit: u64, observed: u64) {
    assert_eq!((r.status, r.code()), (429, "quota_exceeded"), "{r:?}");
    let d = &r.body["details"];
    assert_eq!(
        (
            d["code"].as_str(),
            d["quota"].as_str(),
            d["limit"].as_u64(),
            d["observed"].as_u64()
        ),
        (
            Some("quota_exceeded"),
            Some(quota),
            Some(limit),
            Some(observed)
        ),
        "{r:?}"
    );
    assert!(r.message().contains(quota), "{r:?}");
    assert!(r.retry_after().is_some(), "no Retry-After: {r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_refuse_past_each_cap_with_429_naming_it_and_nothing_half_made() {
    if !require_root("starting sandboxes") {
        return;
    }
    let (srv, _plans, key) = capped_server().await;
    let user = srv.client_with(&key);
    let cli = |args: &[&str]| {
        let o = srv.cli(args);
        assert_ok(&o);
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    // The plan's cap: two live sandboxes.
    let a = user.create(&CreateSandbox::default()).await.unwrap();
    let b = user.create(&CreateSandbox::default()).await.unwrap();
    let third = create_as(&srv, &key).await;
    assert_quota_refusal(&third, "sandboxes", 2, 3);
    assert_eq!(user.list().await.unwrap().len(), 2);
    assert_eq!(
        srv.host_sandbox_dirs().len(),
        2,
        "a refused create left a sandbox"
    );
    // Hibernated sandboxes keep their promise: still two.
    user.hibernate(&a.id).await.unwrap();
    let r = create_as(&srv, &key).await;
    assert_quota_refusal(&r, "sandboxes", 2, 3);

    // An operator override per user, through the CLI: memory and disk promised.
    let q = cli(&[
        "admin",
        "quota",
        "quinn",
        "--sandboxes",
        "10",
        "--memory-mib",
        "768",
    ]);
    assert_eq!(q["effective"]["sandboxes"], 10, "{q}");
    assert_eq!(q["usage"]["sandboxes"], 2, "{q}");
    let c3 = user.create(&CreateSandbox::default()).await.unwrap();
    let r = create_as(&srv, &key).await;
    assert_quota_refusal(&r, "memory_mib", 768, 1024);
    cli(&[
        "admin",
        "quota",
        "quinn",
        "--sandboxes",
        "10",
        "--disk-mib",
        "800",
    ]);
    let r = create_as(&srv, &key).await;
    assert_quota_refusal(&r, "disk_mib", 800, 1024);
    for id in [&a.id, &b.id, &c3.id] {
        user.delete(id).await.unwrap();
    }

    // A burst past the cap (the attack list's 1,000 creates, scaled down): exactly the cap is
    // made, the rest are 429s, and nothing is half-made.
    cli(&["admin", "quota", "quinn", "--sandboxes", "3"]);
    let answers = burst(&srv, &key, 12).await;
    let made: Vec<&Resp> = answers.iter().filter(|r| r.status == 201).collect();
    for r in answers.iter().filter(|r| r.status != 201) {
        assert_quota_refusal(r, "sandboxes", 3, 4);
    }
    assert_eq!(made.len(), 3, "{answers:?}");
    assert_eq!(user.list().await.unwrap().len(), 3);
    assert_eq!(srv.host_sandbox_dirs().len(), 3);
    for s in user.list().await.unwrap() {
        user.delete(&s.id).await.unwrap();
    }

    // Creates per second.
    cli(&[
        "admin",
        "quota",
        "quinn",
        "--sandboxes",
        "100",
        "--creates-per-s",
        "1",
    ]);
    let answers = burst(&srv, &key, 6).await;
    let made = answers.iter().filter(|r| r.status == 201).count();
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
    assert!(made >= 1 && !refused.is_empty(), "{answers:?}");
    assert_eq!(made + refused.len(), 6, "{answers:?}");
    for r in refused {
        assert_eq!(r.body["details"]["quota"], "creates_per_s", "{r:?}");
        assert!(r.retry_after().is_some_and(|s| s >= 1), "{r:?}");
    }
    assert_eq!(user.list().await.unwrap().len(), made);

    // The E2B facade answers the same refusal in its shape, with Retry-After.
    cli(&["admin", "quota", "quinn", "--sandboxes", &made.to_string()]);
    let resp = reqwest::Client::new()
        .post(format!("{}/sandboxes", srv.url))
        .header("X-API-Key", &key)
        .json(&json!({"templateID": "base"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("sandboxes"),
        "{body}"
    );

    // --clear returns the user to the plan's quota.
    let q = cli(&["admin", "quota", "quinn", "--clear"]);
    assert_eq!(q["effective"], json!({"sandboxes": 2}), "{q}");
    for s in user.list().await.unwrap() {
        user.delete(&s.id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_pid_budget_refuses_creates_past_it() {
    if !require_root("starting sandboxes") {
        return;
    }
    // Keep all of pid_max for the host but 1,100 pids: two free sandboxes (512 each) fit.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let reserve = (pid_max - 1100).to_string();
    let srv = TestServer::start_with_env(&[("BURROW_PID_RESERVE", reserve.as_str())]).await;
    let c = srv.client();
    let a = c.create(&CreateSandbox::default()).await.unwrap();
    let b = c.create(&CreateSandbox::default()).await.unwrap();
    let r = srv.call("POST", "/v1/sandboxes", Some(json!({}))).await;
    assert_eq!((r.status, r.code()), (503, "host_full"), "{r:?}");
    let d = &r.body["details"];
    assert_eq!(
        (
            d["quota"].as_str(),
            d["limit"].as_u64(),
            d["observed"].as_u64()
        ),
        (Some("pids"), Some(1100), Some(1536)),
        "{r:?}"
    );
    assert!(r.retry_after().is_some());
    assert_eq!(
        srv.host_sandbox_dirs().len(),
        2,
        "a refused create left a sandbox"
    );

    // Warm pools take their share: with the budget promised, none is built.
    c.put_pool(
        "warm",
        &burrow_types::PoolSpec {
            image: None,
            plan: None,
            size: 2,
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = c.pools().await.unwrap();
    assert_eq!((p[0].ready, p[0].starting), (0, 0), "{p:?}");
    // Room for one: the pool builds one and stops there; a create claims it.
    c.delete(&a.id).await.unwrap();
    let mut ready = false;
    for _ in 0..600 {
        let p = c.pools().await.unwrap();
        if p[0].ready == 1 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "the pool never built the one sandbox the budget has room for"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = c.pools().await.unwrap();
    assert_eq!((p[0].ready, p[0].starting), (1, 0), "{p:?}");
    let warm = c.create(&CreateSandbox::default()).await.unwrap();
    assert!(warm.warm_hit);
    assert_eq!(warm.state, SandboxState::Running);
    c.delete_pool("warm").await.unwrap();
    for id in [&b.id, &warm.id] {
        c.delete(id).await.unwrap();
    }
}

/// schemathesis, pinned; installed once into `target/` (like the E2B SDKs).
const SCHEMATHESIS: &str = "4.32.5";
/// A fixed seed and a bounded number of examples per operation: the same run every time.
const SEED: &str = "20261202";
const EXAMPLES: &str = "10";

fn schemathesis() -> Option<PathBuf> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    pip_venv(
        &cache,
        &format!("st-{SCHEMATHESIS}"),
        &format!("schemathesis=={SCHEMATHESIS}"),
    )
    // Through the venv's python: the installed scripts name the directory the venv was made in,
    // before it was moved into place.
    .map(|venv| venv.join("bin/python"))
}

/// schemathesis (`--checks all`) against the document a real server serves: every answer is one
/// the document lists, in the shape it gives; requests valid by the document are accepted and
/// invalid ones refused; routes without a key are the ones it marks open. The exceptions are in
/// `tests/schemathesis/schemathesis.toml`, each a refusal a schema cannot express. WebSocket routes
/// are left out (schemathesis speaks HTTP only); their plain-HTTP answer (`426`) is in the document.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_matches_the_server() {
    if !require_root("starting sandboxes") {
        return;
    }
    let Some(st) = schemathesis() else {
        return;
    };
    let srv = TestServer::start().await;
    let admin = srv.client();
    // A tenant, not an admin, with a quota, so the run makes a bounded number of sandboxes.
    let user = admin.create_user("fuzz", None).await.unwrap();
    let key = user["api_key"].as_str().unwrap().to_string();
    admin
        .set_quota(
            "fuzz",
            Some(&burrow_types::Quota {
                sandboxes: Some(3),
                creates_per_s: Some(5),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis/schemathesis.toml");
    let work = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(&st);
    cmd.args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .args(["run", &format!("{}/v1/openapi.json", srv.url)])
        .args([
            "--checks",
            "all",
            "--seed",
            SEED,
            "--max-examples",
            EXAMPLES,
        ])
        .args(["--workers", "1", "--no-color", "--request-timeout", "60"])
        .args(["--generation-database", "none"])
        // A pull would reach for whatever registry the fuzzer names: no packet may leave.
        .args([
            "--exclude-path-regex",
            "/(exec/ws|terminal|attach)$|^/v1/images$",
        ])
        .arg("--header")
        .arg(format!("Authorization: Bearer {key}"))
        .current_dir(work.path())
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run schemathesis"))
        .await
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let fuzz = srv.client_with(&key);
    for s in fuzz.list().await.unwrap_or_default() {
        let _ = fuzz.delete(&s.id).await;
    }
    assert!(
        out.status.success(),
        "schemathesis found the server and its document apart:\n{report}\nserver log:\n{}",
        srv.log()
    );
}
