//! The transparent egress proxy: sandboxes whose policy names domains have their HTTP (80) and TLS
//! (443) connections redirected here by the firewall. It reads the name the client asks for (HTTP
//! `Host`, TLS SNI), finds where the connection was going (`SO_ORIGINAL_DST`), applies the
//! sandbox's policy with that name (`CompiledPolicy::decide`), and either splices the connection
//! through or closes it (HTTP gets a 403 that says why). HTTP heads are parsed by `httparse` and
//! ClientHellos by rustls; this module only decides.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use burrow_types::net::Verdict;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Control;

/// The first bytes of a connection must name the host within this many bytes and this long.
const MAX_HEAD: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, control: Arc<Control>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(why) = handle(conn, peer, &control).await {
                tracing::debug!(%peer, why, "egress connection refused");
            }
        });
    }
}

async fn handle(mut conn: TcpStream, peer: SocketAddr, control: &Control) -> Result<(), String> {
    let IpAddr::V4(src) = peer.ip() else {
        return Err("not IPv4".into());
    };
    let (id, policy) = control
        .sandbox_at(src)
        .ok_or("not from a sandbox with a network")?;
    let dst = burrow_linux::net::original_dst(&conn)
        .map_err(|e| format!("no original destination: {e}"))?;
    let range = control
        .network()
        .map(|n| n.config().range)
        .ok_or("no network")?;
    let mut head = Vec::with_capacity(2048);
    let name = tokio::time::timeout(HEAD_TIMEOUT, read_name(&mut conn, &mut head))
        .await
        .map_err(|_| "no host name in time".to_string())??;
    let mut verdict = if range.contains(*dst.ip()) {
        Verdict::Deny("another sandbox")
    } else {
        policy.decide(*dst.ip(), name.as_deref())
    };
    // An allowed name opens only the addresses it resolves to (no domain fronting).
    if let Some(n) = name
        .as_deref()
        .filter(|n| policy.allowed_only_by_name(*dst.ip(), n))
    {
        let resolvers = control
            .network()
            .map(|net| net.config().resolvers.clone())
            .unwrap_or_default();
        let mut resolved = false;
        for r in resolvers {
            if crate::dns::resolve_a(r, n).await.contains(dst.ip()) {
                resolved = true;
                break;
            }
        }
        if !resolved {
            verdict = Verdict::Deny("the address is not one the allowed name resolves to");
        }
    }
    if let Verdict::Deny(why) = verdict {
        tracing::info!(sandbox_id = %id, dst = %dst, name = name.as_deref().unwrap_or("-"), why, "egress refused");
        if !is_tls(&head) {
            let body = format!("burrow: blocked by the sandbox's egress policy ({why})\n");
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
        return Err(why.into());
    }
    let mut up = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| "upstream connect timed out".to_string())?
        .map_err(|e| format!("upstream: {e}"))?;
    up.write_all(&head).await.map_err(|e| e.to_string())?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
    Ok(())
}

fn is_tls(head: &[u8]) -> bool {
    head.first() == Some(&0x16)
}

/// Reads until the host name is known: `Ok(Some(name))`, or `Ok(None)` when the protocol has none
/// (then only address rules apply).
async fn read_name(conn: &mut TcpStream, head: &mut Vec<u8>) -> Result<Option<String>, String> {
    let mut buf = [0u8; 4096];
    loop {
        let parsed = if is_tls(head) {
            sni(head)
        } else {
            http_host(head)
        };
        match parsed {
            Parsed::Name(n) => return Ok(Some(n)),
            Parsed::NoName => return Ok(None),
            Parsed::More if head.len() >= MAX_HEAD => return Ok(None),
            Parsed::More => {}
        }
        let n = conn.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before naming a host".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Name(String),
    NoName,
    More,
}

/// Most request headers read while looking for `Host`; a request with more names no host.
const MAX_HEADERS: usize = 100;

/// The `Host` of an HTTP/1 request head (parsed by `httparse`). A head that does not parse, has
/// two `Host` headers, or whose absolute-form target names another host names none: then only
/// the address rules apply, so an ambiguity cannot open a name the upstream would not see.
fn http_host(head: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => return Parsed::More,
        Ok(httparse::Status::Complete(_)) => {}
        Err(_) => return Parsed::NoName,
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Parsed::NoName;
    };
    let Some(host) = std::str::from_utf8(host.value)
        .ok()
        .map(|v| strip_port(v.trim()).to_ascii_lowercase())
        .filter(|h| !h.is_empty())
    else {
        return Parsed::NoName;
    };
    // `GET http://other/ HTTP/1.1` with `Host: allowed`: the upstream may route by either.
    if let Some(target) = req
        .path
        .and_then(|p| p.split_once("://").map(|(_, rest)| rest))
    {
        let authority = target.split(['/', '?', '#']).next().unwrap_or_default();
        if !strip_port(authority).eq_ignore_ascii_case(&host) {
            return Parsed::NoName;
        }
    }
    Parsed::Name(host)
}

fn strip_port(h: &str) -> &str {
    h.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(h, |(h, _)| h)
}

/// The server name of a TLS ClientHello, read by rustls' `Acceptor` (which checks it is one DNS
/// name, RFC 6066 §3); the connection itself is never terminated here.
fn sni(head: &[u8]) -> Parsed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = head;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Parsed::NoName,
        }
    }
    match acceptor.accept() {
        Ok(None) => Parsed::More,
        Ok(Some(accepted)) => match accepted.client_hello().server_name() {
            Some(name) => Parsed::Name(name.to_ascii_lowercase()),
            None => Parsed::NoName,
        },
        Err(_) => Parsed::NoName,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_host_is_read_without_its_port() {
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n"),
            Parsed::Name("example.com".into())
        );
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHo"), Parsed::More);
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), Parsed::NoName);
        assert_eq!(
            http_host(b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            Parsed::Name("a.test".into())
        );
    }

    /// Bad and ambiguous heads name no host, so only the address rules apply to them.
    #[test]
    fn bad_or_ambiguous_http_heads_name_no_host() {
        for bad in [
            &b"\x00\x01\x02garbage\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            b"GET http://evil.test/ HTTP/1.1\r\nHost: good.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
        ] {
            assert_eq!(
                http_host(bad),
                Parsed::NoName,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"Host: a.test\r\n\r\n");
        assert_eq!(http_host(&many), Parsed::NoName);
    }

    /// A minimal ClientHello as real clients send it: server_name, then signature_algorithms
    /// (TLS 1.3 requires it; rustls refuses a hello without it) unless `sig_algs` is false.
    fn hello_with(name: &[u8], sig_algs: bool) -> Vec<u8> {
        let mut sni_ext = vec![0, 0]; // type server_name
        let list_len = name.len() + 3;
        sni_ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        sni_ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_ext.extend_from_slice(name);
        if sig_algs {
            // type 13, length 4, list length 2, ecdsa_secp256r1_sha256
            sni_ext.extend_from_slice(&[0, 13, 0, 4, 0, 2, 4, 3]);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // compression
        body.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&sni_ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn client_hello(name: &[u8]) -> Vec<u8> {
        hello_with(name, true)
    }

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let rec = client_hello(b"API.example.test");
        assert_eq!(sni(&rec), Parsed::Name("api.example.test".into()));
        assert_eq!(sni(&rec[..10]), Parsed::More);
        assert_eq!(sni(&rec[..rec.len() - 1]), Parsed::More);
    }

    #[test]
    fn bad_client_hellos_name_no_host() {
        // An address is not a server name (RFC 6066): address rules only.
        assert_eq!(sni(&client_hello(b"203.0.113.10")), Parsed::NoName);
        // Without signature_algorithms (no TLS 1.3 client omits it): rustls refuses the hello.
        assert_eq!(sni(&hello_with(b"a.test", false)), Parsed::NoName);
        // Not a DNS name at all.
        assert_eq!(sni(&client_hello(b"a b\x00c")), Parsed::NoName);
        // A handshake that is not a ClientHello, a record that is not a handshake, garbage.
        let mut not_hello = client_hello(b"a.test");
        not_hello[5] = 2;
        assert_eq!(sni(&not_hello), Parsed::NoName);
        assert_eq!(sni(&[0x16, 3, 1, 0, 0]), Parsed::NoName);
        assert_eq!(
            sni(&[0x16, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
            Parsed::NoName
        );
        // Lengths that point past the end of the message.
        let mut lying = client_hello(b"a.test");
        let at = lying.windows(6).position(|w| w == b"a.test").unwrap() - 2;
        lying[at] = 0xff; // the name's length
        assert_eq!(sni(&lying), Parsed::NoName);
    }
}
