//! Sandbox networking (issue 3) and attacks N1-N7 (docs/threat-model.md), run for real: `burrow up --network` inside a
//! network namespace this test makes, whose only "internet" is another namespace it makes (see
//! `common/world.rs`). No packet leaves them. Each test fails if the protection it names is
//! removed: every "unreachable" check has a twin that shows the same path works when allowed.

mod common;

use std::time::Duration;

use burrow_client::Client;
use burrow_types::{CreateSandbox, ExecRequest, NetworkPolicy};
use common::world::{self, FAKE_HOST, METADATA, PRIVATE_HOST, SERVER_UPLINK};
use common::*;
use futures_util::{SinkExt, StreamExt};

/// `curl` inside the sandbox: the body on success, None on any failure (HTTP errors included).
async fn curl(c: &Client, id: &str, url: &str) -> Option<String> {
    let r = run(c, id, &format!("curl -sS -f --max-time 4 {url}")).await;
    (r.exit_code == Some(0)).then_some(r.stdout)
}

/// TCP connects from inside the sandbox, in parallel (2 s each): true where one was accepted.
async fn reach(c: &Client, id: &str, targets: &[(&str, u16)]) -> Vec<bool> {
    let list: Vec<String> = targets
        .iter()
        .map(|(h, p)| format!("(\"{h}\",{p})"))
        .collect();
    let code = format!(
        r#"
import socket, threading
t = [{}]
res = [False] * len(t)
def go(i):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(t[i]); res[i] = True
    except Exception:
        pass
th = [threading.Thread(target=go, args=(i,)) for i in range(len(t))]
[x.start() for x in th]; [x.join() for x in th]
print("".join("1" if r else "0" for r in res))
"#,
        list.join(",")
    );
    let r = py(c, id, &code).await;
    assert_eq!(r.exit_code, Some(0), "probe failed: {}", r.stderr);
    r.stdout.trim().chars().map(|c| c == '1').collect()
}

/// Sends a TLS ClientHello naming `sni` to FAKE_HOST:443; true when the fake host answered.
async fn tls_reaches(c: &Client, id: &str, sni: &str) -> bool {
    let code = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context(); i = ssl.MemoryBIO(); o = ssl.MemoryBIO()
obj = ctx.wrap_bio(i, o, server_hostname="{sni}")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection(("{FAKE_HOST}", 443), timeout=4); s.settimeout(4)
s.sendall(o.read())
try:
    print(s.recv(100).decode())
except Exception:
    print("")
"#
    );
    let r = py(c, id, &code).await;
    r.stdout.contains("tls-ok")
}

async fn world(extra: &[&str]) -> Option<TestServer> {
    if !require_root("network tests (network namespaces, veth, nftables)") {
        return None;
    }
    Some(TestServer::start_in_world(extra).await)
}

fn policy(internet: bool, allow: &[&str], deny: &[&str]) -> Option<NetworkPolicy> {
    Some(NetworkPolicy {
        internet,
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
    })
}

async fn create(c: &Client, network: Option<NetworkPolicy>) -> burrow_types::Sandbox {
    c.create(&CreateSandbox {
        network,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn address(sb: &burrow_types::Sandbox) -> String {
    sb.network.as_ref().expect("a network").address.clone()
}

// ------------------------------------------------------------------ done-when 1 and 2

#[tokio::test(flavor = "multi_thread")]
async fn curl_by_name_and_address_and_the_internet_switch_takes_effect_live() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let id = create(&c, None).await.id;
    let by_name = curl(&c, &id, "http://fake.internet/").await;
    assert!(
        by_name
            .as_deref()
            .is_some_and(|b| b.contains("host=fake.internet")),
        "by name: {by_name:?}\n{}",
        srv.log()
    );
    let resolv = run(&c, &id, "cat /etc/resolv.conf").await.stdout;
    assert!(
        resolv.contains(&format!("nameserver {FAKE_HOST}")),
        "{resolv}"
    );
    assert!(curl(&c, &id, &format!("http://{FAKE_HOST}/"))
        .await
        .is_some());

    // Off through the CLI, on a running sandbox: no restart.
    assert_ok(&srv.cli(&["net", &id, "--internet", "off"]));
    assert!(curl(&c, &id, &format!("http://{FAKE_HOST}/"))
        .await
        .is_none());
    assert!(curl(&c, &id, "http://fake.internet/").await.is_none());
    // No name resolution either: with nothing reachable, DNS would be a tunnel out.
    let dns =
        "timeout 10 python3 -c 'import socket; print(socket.gethostbyname(\"fake.internet\"))'";
    assert_ne!(
        run(&c, &id, dns).await.exit_code,
        Some(0),
        "DNS answered with the internet off"
    );
    assert_ok(&srv.cli(&["net", &id, "--internet", "on"]));
    assert_eq!(
        run(&c, &id, dns).await.exit_code,
        Some(0),
        "DNS is back with the internet on"
    );
    assert!(curl(&c, &id, &format!("http://{FAKE_HOST}/"))
        .await
        .is_some());

    // `create --no-internet` from the CLI.
    let out = srv.cli(&["create", "--no-internet"]);
    assert_ok(&out);
    let off = stdout(&out).trim().to_string();
    assert!(curl(&c, &off, &format!("http://{FAKE_HOST}/"))
        .await
        .is_none());
    let shown = stdout(&srv.cli(&["net", &off]));
    assert!(shown.contains("internet   off"), "{shown}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_out_allow_out_and_domain_rules_are_each_enforced() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let fake = format!("http://{FAKE_HOST}/");

    // deny_out (address): the one address goes, the rest of the internet stays.
    let d = create(&c, policy(true, &[], &[FAKE_HOST])).await.id;
    assert!(
        curl(&c, &d, &fake).await.is_none(),
        "deny_out address not enforced"
    );
    assert_eq!(reach(&c, &d, &[("198.51.100.2", 80)]).await, [true]);

    // allow_out (address) with the internet off: only what it names.
    let a = create(&c, policy(false, &[FAKE_HOST], &[])).await.id;
    assert!(
        curl(&c, &a, &fake).await.is_some(),
        "allow_out address not honoured"
    );
    assert_eq!(reach(&c, &a, &[("198.51.100.2", 80)]).await, [false]);

    // allow_out opens a private range, which is otherwise dropped.
    let p = create(&c, policy(true, &["192.168.77.0/24"], &[])).await.id;
    assert_eq!(reach(&c, &p, &[(PRIVATE_HOST, 80)]).await, [true]);

    // Domain allow list, internet off: HTTP by Host, TLS by SNI.
    let n = create(&c, policy(false, &["allowed.test"], &[])).await.id;
    let ok = curl(&c, &n, "http://api.allowed.test/").await;
    assert!(
        ok.as_deref()
            .is_some_and(|b| b.contains("host=api.allowed.test")),
        "{ok:?}\n{}",
        srv.log()
    );
    assert!(
        curl(&c, &n, "http://other.test/").await.is_none(),
        "unlisted name reached"
    );
    // The same address by another name, or by no name, stays shut.
    assert!(curl(&c, &n, &fake).await.is_none());
    // An allowed name opens only the addresses it resolves to: no fronting to another host
    // (198.51.100.2 serves the same web server, but api.allowed.test is 203.0.113.10).
    let fronted = run(
        &c,
        &n,
        "curl -sS -f --max-time 4 -H 'Host: api.allowed.test' http://198.51.100.2/",
    )
    .await;
    assert_ne!(
        fronted.exit_code,
        Some(0),
        "domain fronting passed: {}",
        fronted.stdout
    );
    assert!(
        tls_reaches(&c, &n, "allowed.test").await,
        "TLS to an allowed SNI failed"
    );
    assert!(
        !tls_reaches(&c, &n, "other.test").await,
        "TLS to an unlisted SNI passed"
    );

    // Domain deny list, internet on.
    let b = create(&c, policy(true, &[], &["blocked.test"])).await.id;
    assert!(curl(&c, &b, "http://fine.test/").await.is_some());
    assert!(
        curl(&c, &b, "http://www.blocked.test/").await.is_none(),
        "deny_out name not enforced"
    );
    assert!(tls_reaches(&c, &b, "fine.test").await);
    assert!(!tls_reaches(&c, &b, "blocked.test").await);

    // Changing a running sandbox's domains works too (PATCH through the CLI).
    assert_ok(&srv.cli(&["net", &b, "--clear-deny"]));
    assert!(curl(&c, &b, "http://www.blocked.test/").await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_policies_and_ports_get_structured_errors() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    for (allow, deny) in [
        (vec!["10.0.0.1/8"], vec![]),
        (vec!["not a domain"], vec![]),
        (vec!["fe80::/10"], vec![]),
        (vec!["1.2.3.0/24"], vec!["1.2.3.0/24"]),
        (vec!["169.254.169.254"], vec![]),
    ] {
        let e = c
            .create(&CreateSandbox {
                network: policy(true, &allow, &deny),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("bad_request"), "{allow:?} {deny:?}: {e}");
    }
    let id = create(&c, None).await.id;
    for port in ["0", "70000", "http"] {
        let (status, body) = c
            .raw::<()>(
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{id}/ports/{port}"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{port}: {}", String::from_utf8_lossy(&body));
    }
    let out = srv.cli(&["net", &id, "--allow-out", "999.1.1.1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_request"));
}

// ------------------------------------------------------------------ attacks N1-N7

#[tokio::test(flavor = "multi_thread")]
async fn n1_no_raw_sockets_no_address_theft_no_shared_l2() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let a = create(&c, None).await;
    let b = create(&c, None).await;
    let r = run(
        &c,
        &a.id,
        "python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)' 2>&1; \
         python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)' 2>&1",
    )
    .await;
    assert_eq!(
        r.stdout.matches("PermissionError").count(),
        2,
        "{}",
        r.stdout
    );
    let steal = run(
        &c,
        &a.id,
        &format!("ip addr add {}/32 dev eth0 2>&1", address(&b)),
    )
    .await;
    assert_ne!(
        steal.exit_code,
        Some(0),
        "took the neighbour's address: {}",
        steal.stdout
    );
    // Each sandbox has its own routed link: no bridge, nothing else on its L2.
    let links = srv.world().server_stdout(&["ip", "-d", "link", "show"]);
    assert!(!links.contains("bridge"), "{links}");
    let neigh = run(
        &c,
        &a.id,
        &format!("ping -c1 -W1 {} >/dev/null 2>&1; ip neigh", address(&b)),
    )
    .await;
    assert!(
        !neigh.stdout.contains(&address(&b)),
        "B is a neighbour of A: {}",
        neigh.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn n2_gateway_host_addresses_api_port_and_host_loopback_are_unreachable() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    // Even a policy that names every address cannot open the host.
    let id = create(&c, policy(true, &["0.0.0.0/0"], &[])).await.id;
    let gw = "10.200.0.1";
    let api = world::API_PORT;
    let got = reach(
        &c,
        &id,
        &[
            (gw, api),
            (SERVER_UPLINK, api),
            (gw, 15001),
            ("127.0.0.1", api),
            (gw, 22),
        ],
    )
    .await;
    assert_eq!(
        got, [false; 5],
        "gateway/API/proxy/loopback reached: {got:?}"
    );
    // The twin: the API does listen on those addresses (so only the firewall stops the sandbox).
    let listening = srv.world().server_stdout(&["ss", "-ltn"]);
    assert!(listening.contains(&format!("0.0.0.0:{api}")), "{listening}");
    // And the same sandbox does reach the internet.
    assert_eq!(reach(&c, &id, &[(FAKE_HOST, 80)]).await, [true]);
}

#[tokio::test(flavor = "multi_thread")]
async fn n3_link_local_and_metadata_are_dropped_whatever_the_policy() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let id = create(&c, policy(true, &["0.0.0.0/0"], &[])).await.id;
    assert_eq!(
        reach(&c, &id, &[(METADATA, 80), ("169.254.1.1", 80)]).await,
        [false, false]
    );
    // Twin: the fake metadata service answers the server's own namespace.
    let out = srv.world().server(&[
        "curl",
        "-sf",
        "--max-time",
        "3",
        &format!("http://{METADATA}/"),
    ]);
    assert!(out.status.success(), "fake metadata service is down");
    // A domain policy (egress proxy path) cannot open it either.
    let d = create(&c, policy(true, &["metadata.test"], &[])).await.id;
    assert!(curl(&c, &d, &format!("http://{METADATA}/")).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn n4_other_sandboxes_and_private_ranges_are_dropped() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let a = create(&c, None).await;
    let b = create(&c, policy(true, &["10.0.0.0/8"], &[])).await;
    c.start_process(
        &a.id,
        &ExecRequest {
            cmd: vec![
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                "8000".into(),
            ],
            background: true,
            cwd: Some("/tmp".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A serves (the twin: it answers itself) ...
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reach(&c, &a.id, &[("127.0.0.1", 8000)]).await != [true] {
        assert!(
            std::time::Instant::now() < deadline,
            "server in A did not start"
        );
    }
    // ... but B cannot reach it, even with 10/8 allowed, nor scan the private ranges.
    let got = reach(
        &c,
        &b.id,
        &[(&address(&a), 8000), (PRIVATE_HOST, 80), ("172.16.0.1", 80)],
    )
    .await;
    assert_eq!(got, [false, false, false], "{got:?}");
    let d = create(&c, None).await.id;
    assert_eq!(reach(&c, &d, &[(PRIVATE_HOST, 80)]).await, [false]);
}

#[tokio::test(flavor = "multi_thread")]
async fn n5_ipv6_is_off_inside() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let sb = create(&c, None).await;
    let r = run(
        &c,
        &sb.id,
        "cat /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 addr; \
         python3 -c 'import socket; s=socket.socket(socket.AF_INET6); s.settimeout(2); print(s.connect_ex((\"fe80::1%eth0\", 80)))' 2>&1",
    )
    .await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.first().copied(), Some("1"), "{}", r.stdout);
    assert_eq!(lines.get(1).copied(), Some("1"), "{}", r.stdout);
    assert!(!r.stdout.contains("inet6"), "{}", r.stdout);
    assert!(
        !r.stdout.trim_end().ends_with("\n0"),
        "IPv6 connect succeeded: {}",
        r.stdout
    );
    // The host end has no IPv6 either (no link-local for router advertisements to use).
    let ifname = format!("bw{}", &sb.id[..13]);
    let host = srv
        .world()
        .server_stdout(&["ip", "-6", "addr", "show", "dev", &ifname]);
    assert!(!host.contains("inet6"), "{host}");
}

const WS_ECHO_PY: &str = r#"
import base64, hashlib, socket, threading
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    while True:
        h = c.recv(2)
        if len(h) < 2: return
        n = h[1] & 127
        if n == 126: n = int.from_bytes(c.recv(2), "big")
        mask = c.recv(4); data = b""
        while len(data) < n: data += c.recv(n - len(data))
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        if h[0] & 15 == 8: return
        c.sendall(bytes([0x81, len(data)]) + data)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8001)); s.listen(8)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"#;

/// done-when 4 and N6: a server inside is unreachable from the network, reachable through both
/// proxy routes with a token, refused without one, open without one only once public, and a
/// WebSocket echo works through the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn n6_ports_only_through_the_authenticated_proxy_by_path_and_host_with_websockets() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let sb = create(&c, None).await;
    let id = sb.id.clone();
    let token = sb
        .access_token
        .clone()
        .expect("create returns the access token");
    run(
        &c,
        &id,
        "mkdir -p /tmp/site && echo hello-from-inside > /tmp/site/index.html",
    )
    .await;
    for cmd in [
        vec![
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "-d",
            "/tmp/site",
        ],
        vec!["python3", "-c", WS_ECHO_PY],
    ] {
        c.start_process(
            &id,
            &ExecRequest {
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                background: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reach(&c, &id, &[("127.0.0.1", 8000), ("127.0.0.1", 8001)]).await != [true, true] {
        assert!(
            std::time::Instant::now() < deadline,
            "servers inside did not start"
        );
    }
    // N6: from the (fake) internet, which routes the sandbox range to the server, nothing.
    let addr = address(&sb);
    let direct = srv.world().inet(&[
        "curl",
        "-sf",
        "--max-time",
        "3",
        &format!("http://{addr}:8000/"),
    ]);
    assert!(
        !direct.status.success(),
        "reached a sandbox port from outside"
    );

    let http = reqwest::Client::new();
    let base = srv.url.clone();
    let path = format!("{base}/v1/sandboxes/{id}/ports/8000/index.html");
    let host = format!("8000-{id}.{}", world::DOMAIN);
    let get = |url: String, host: Option<String>, hdr: Option<(&'static str, String)>| {
        let mut rb = http.get(url);
        if let Some(h) = host {
            rb = rb.header("host", h);
        }
        if let Some((k, v)) = hdr {
            rb = rb.header(k, v);
        }
        async move {
            let r = rb.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let host_url = format!("{base}/index.html");
    // Without a token: refused on both routes.
    assert_eq!(get(path.clone(), None, None).await.0, 401);
    assert_eq!(get(host_url.clone(), Some(host.clone()), None).await.0, 401);
    // With the API key, the access token (header or query), or a signed URL: served.
    let key = ("authorization", format!("Bearer {}", srv.key));
    let tok = ("x-access-token", token.clone());
    for (url, h, hdr) in [
        (path.clone(), None, Some(key.clone())),
        (path.clone(), None, Some(tok.clone())),
        (format!("{path}?burrow_token={token}"), None, None),
        (host_url.clone(), Some(host.clone()), Some(tok.clone())),
        (host_url.clone(), Some(host.clone()), Some(key.clone())),
    ] {
        let (status, body) = get(url.clone(), h, hdr).await;
        assert_eq!((status, body.trim()), (200, "hello-from-inside"), "{url}");
    }
    let info = c.port(&id, 8000, Some(60)).await.unwrap();
    assert_eq!(
        info.url.as_deref(),
        Some(format!("http://{host}/").as_str())
    );
    let signed = info
        .signed_url
        .unwrap()
        .replace("http://", "")
        .split_once('/')
        .map(|(_, p)| format!("{base}/{p}"))
        .unwrap();
    assert_eq!(get(signed.clone(), None, None).await.0, 200, "{signed}");
    let forged = format!(
        "{}0",
        signed.trim_end_matches(|ch: char| ch.is_ascii_hexdigit())
    );
    assert_eq!(get(forged, None, None).await.0, 401);
    // A token of another sandbox, and another tenant's key, do not open it.
    let other = create(&c, None).await.access_token.unwrap();
    assert_eq!(
        get(path.clone(), None, Some(("x-access-token", other)))
            .await
            .0,
        401
    );
    let bob = srv.cli(&["admin", "create-user", "bob"]);
    assert_ok(&bob);
    let bob_key = stdout(&bob).trim().to_string();
    assert_eq!(
        get(
            path.clone(),
            None,
            Some(("authorization", format!("Bearer {bob_key}")))
        )
        .await
        .0,
        404
    );

    // Public: open without a token, by path and by Host, until made private again.
    let out = srv.cli(&["port", &id, "8000", "--public"]);
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), format!("http://{host}/"));
    assert_eq!(get(path.clone(), None, None).await.0, 200);
    assert_eq!(get(host_url.clone(), Some(host.clone()), None).await.0, 200);
    assert_ok(&srv.cli(&["port", &id, "8000", "--private"]));
    assert_eq!(get(path.clone(), None, None).await.0, 401);

    // WebSocket echo through the proxy (path route, token in the query).
    let ws_url = format!(
        "{}/v1/sandboxes/{id}/ports/8001/?burrow_token={token}",
        base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("ws through the proxy");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "echo me".into(),
    ))
    .await
    .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .unwrap()
        .unwrap();
    assert_eq!(msg.into_text().unwrap().as_str(), "echo me");

    // Closed port and stopped sandbox: structured errors, not hangs.
    let (st, body) = get(
        format!("{base}/v1/sandboxes/{id}/ports/8999/"),
        None,
        Some(key.clone()),
    )
    .await;
    assert_eq!(st, 502, "{body}");
    assert!(body.contains("port_closed"), "{body}");
    c.pause(&id).await.unwrap();
    let (st, body) = get(path.clone(), None, Some(key.clone())).await;
    assert_eq!(st, 409, "{body}");
    assert!(body.contains("sandbox_not_running"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn n7_connections_per_sandbox_are_limited_and_others_are_unaffected() {
    let limit = 16;
    let Some(srv) = world(&["--net-conn-limit", &limit.to_string()]).await else {
        return;
    };
    let c = srv.client();
    let a = create(&c, None).await.id;
    let b = create(&c, None).await.id;
    let code = format!(
        r#"
import socket, struct, time
socks, ok = [], 0
for i in range(60):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex(("{FAKE_HOST}", {port})); socks.append(s)
time.sleep(3)
for s in socks:
    try:
        s.getpeername(); ok += 1
    except OSError:
        pass
print(ok)
# Reset (not FIN) so conntrack forgets them at once: the listener never accepts, so a FIN would
# leave them half-closed, still counted.
for s in socks:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
"#,
        port = world::HOLD_PORT
    );
    let burst = ExecRequest {
        cmd: vec!["/usr/bin/python3".into(), "-c".into(), code],
        timeout_ms: Some(60_000),
        background: false,
        ..Default::default()
    };
    // While A holds its connections open in one process, B is unaffected.
    let c2 = c.clone();
    let a2 = a.clone();
    let held = tokio::spawn(async move { c2.exec(&a2, &burst).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        reach(&c, &b, &[(FAKE_HOST, 80)]).await,
        [true],
        "B starved by A"
    );
    let r = held.await.unwrap();
    let n: usize = r.stdout.trim().parse().unwrap_or_else(|_| panic!("{r:?}"));
    assert!(n <= limit, "{n} connections open, limit {limit}");
    assert!(
        n >= limit - 2,
        "only {n} connections: something else than the limit stopped them"
    );
    // Once they are closed, A connects again.
    assert_eq!(reach(&c, &a, &[(FAKE_HOST, 80)]).await, [true]);
}

// ------------------------------------------------------------------ done-when 5

/// Chain names and map elements of burrow's table, read straight from the kernel.
fn kernel_table(srv: &TestServer) -> (Vec<String>, Vec<String>, Vec<String>) {
    let out = srv.world().server_stdout(&["nft", "-j", "list", "ruleset"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (mut tables, mut chains, mut elems) = (Vec::new(), Vec::new(), Vec::new());
    for item in v["nftables"].as_array().unwrap() {
        if let Some(t) = item.get("table") {
            tables.push(format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            ));
        }
        if let Some(ch) = item.get("chain") {
            chains.push(ch["name"].as_str().unwrap().to_string());
        }
        if let Some(m) = item.get("map") {
            for e in m["elem"].as_array().into_iter().flatten() {
                elems.push(e[0].as_str().unwrap().to_string());
            }
        }
    }
    chains.sort();
    elems.sort();
    (tables, chains, elems)
}

/// Everything of sandbox `id` in the server namespace: veth, route, address, chain, map element.
fn net_leftovers(srv: &TestServer, id: &str, addr: &str) -> Vec<String> {
    let w = srv.world();
    let ifname = format!("bw{}", &id[..13]);
    let mut left = Vec::new();
    if w.server_stdout(&["ip", "link"]).contains(&ifname) {
        left.push(format!("veth {ifname}"));
    }
    if w.server_stdout(&["ip", "route"]).contains(addr) {
        left.push(format!("route to {addr}"));
    }
    if w.server_stdout(&["ip", "addr"]).contains(&ifname) {
        left.push("address".into());
    }
    let rules = w.server_stdout(&["nft", "list", "ruleset"]);
    if rules.contains(id) || rules.contains(&ifname) || rules.contains(&format!("{addr} ")) {
        left.push("nft rule".into());
    }
    left
}

/// burrow's report of its firewall, and the kernel's ruleset read independently, agree. Retried for
/// a few seconds: a pool replenishing in the background may be adding a sandbox between two reads.
async fn assert_in_sync(srv: &TestServer) {
    let mut tries = 0;
    loop {
        tries += 1;
        let fw = srv.client().firewall().await.unwrap();
        let (tables, chains, elems) = kernel_table(srv);
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let (want, want_el) = (
            keys(&fw["expected"]["chains"]),
            keys(&fw["expected"]["sandboxes"]),
        );
        let ok = fw["in_sync"] == true && chains == want && elems == want_el;
        if ok || tries >= 20 {
            assert_eq!(fw["in_sync"], true, "{fw:#}");
            assert_eq!(
                tables,
                ["inet burrow"],
                "other tables in the server namespace"
            );
            assert_eq!(chains, want);
            assert_eq!(elems, want_el);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // `burrow net rules` says the same.
    assert_ok(&srv.cli(&["net", "rules"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_and_a_crash_leave_no_veth_route_address_or_rule_behind() {
    let Some(mut srv) = world(&[]).await else {
        return;
    };
    let c = srv.client();
    let a = create(&c, policy(true, &[], &["blocked.test"])).await;
    let b = create(&c, None).await;
    assert_in_sync(&srv).await;
    assert!(
        !net_leftovers(&srv, &a.id, &address(&a)).is_empty(),
        "A's network is not visible"
    );

    let out = srv.cli(&["rm", &a.id]);
    assert_ok(&out);
    assert_eq!(
        net_leftovers(&srv, &a.id, &address(&a)),
        Vec::<String>::new()
    );
    assert_in_sync(&srv).await;

    // Crash: the server dies, C's processes die with no one to clean up, and a stray chain
    // appears in burrow's table.
    let cc = create(&c, None).await;
    srv.kill9();
    force_clean(&cc.id);
    let w = srv.world();
    assert!(w
        .server(&["nft", "add", "chain", "inet", "burrow", "sb_strayleftover"])
        .status
        .success());
    srv.restart().await;
    let c = srv.client();
    assert_eq!(c.get(&cc.id).await.unwrap().state.as_str(), "hibernated");
    assert_eq!(
        net_leftovers(&srv, &cc.id, &address(&cc)),
        Vec::<String>::new()
    );
    assert!(!srv
        .world()
        .server_stdout(&["nft", "list", "ruleset"])
        .contains("stray"));
    assert_in_sync(&srv).await;
    // B was adopted with its rules and still reaches the internet.
    assert_eq!(reach(&c, &b.id, &[(FAKE_HOST, 80)]).await, [true]);
    // Hibernate and resume at once: the new veth takes the name of one still being torn down.
    c.hibernate(&b.id).await.unwrap();
    assert_eq!(
        net_leftovers(&srv, &b.id, &address(&b)),
        Vec::<String>::new()
    );
    c.resume(&b.id).await.unwrap();
    assert_eq!(reach(&c, &b.id, &[(FAKE_HOST, 80)]).await, [true]);
    // A cold resume wires C again.
    c.resume(&cc.id).await.unwrap();
    assert_eq!(reach(&c, &cc.id, &[(FAKE_HOST, 80)]).await, [true]);
    assert_in_sync(&srv).await;

    for sb in [&b, &cc] {
        assert_ok(&srv.cli(&["rm", &sb.id]));
        assert_eq!(
            net_leftovers(&srv, &sb.id, &address(sb)),
            Vec::<String>::new()
        );
        assert_eq!(host_leftovers(&srv, &sb.id), Vec::<String>::new());
    }
    assert_in_sync(&srv).await;
}

/// A warm sandbox has no egress until it is claimed; the claim gives it the creator's policy.
#[tokio::test(flavor = "multi_thread")]
async fn warm_sandboxes_get_the_creators_policy_at_claim() {
    let Some(srv) = world(&[]).await else { return };
    let c = srv.client();
    let (st, body) = c
        .raw(
            reqwest::Method::PUT,
            "/v1/pools/default",
            Some(&serde_json::json!({"size": 1})),
        )
        .await
        .unwrap();
    assert!(st.is_success(), "{}", String::from_utf8_lossy(&body));
    let ready = || async {
        let (_, body) = c
            .raw::<()>(reqwest::Method::GET, "/v1/pools", None)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|p| p["ready"].as_u64())
            .unwrap_or(0)
            >= 1
    };
    for policy_ in [policy(false, &[], &[]), None] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !ready().await {
            assert!(std::time::Instant::now() < deadline, "pool never ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sb = create(&c, policy_.clone()).await;
        assert!(sb.warm_hit, "not served from the pool");
        let internet = policy_.is_none();
        assert_eq!(
            curl(&c, &sb.id, &format!("http://{FAKE_HOST}/"))
                .await
                .is_some(),
            internet,
            "policy {policy_:?} not applied at claim"
        );
    }
    assert_in_sync(&srv).await;
}

/// done-when 6: `burrow bench` measures create with a network and a `curl` round trip (no numbers
/// are asserted: benchmarks are not tests; this checks the rows are there).
#[tokio::test(flavor = "multi_thread")]
async fn bench_has_the_network_rows() {
    let Some(srv) = world(&[]).await else { return };
    let out = srv.cli(&[
        "bench",
        "--runs",
        "2",
        "--no-peers",
        "--throughput",
        "0",
        "--density",
        "0",
        "--net-url",
        &format!("http://{FAKE_HOST}/"),
    ]);
    assert_ok(&out);
    let table = stdout(&out);
    for row in ["net create -> first command", "net exec round trip (curl)"] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
}
