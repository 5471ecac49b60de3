//! The transparent egress proxy: sandboxes whose policy names domains have their HTTP (80) and TLS
//! (443) connections redirected here by the firewall. It reads the name the client asks for (HTTP
//! `Host`, TLS SNI), finds where the connection was going (`SO_ORIGINAL_DST`), applies the
//! sandbox's policy with that name (`CompiledPolicy::decide`), and either splices the connection
//! through or closes it (HTTP gets a 403 that says why).

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

fn http_host(head: &[u8]) -> Parsed {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parsed::More;
    };
    let text = String::from_utf8_lossy(&head[..end]);
    for line in text.split("\r\n").skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("host") {
                let v = v.trim();
                let host = v
                    .rsplit_once(':')
                    .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                    .map_or(v, |(h, _)| h);
                return Parsed::Name(host.to_ascii_lowercase());
            }
        }
    }
    Parsed::NoName
}

/// The server name of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3).
fn sni(head: &[u8]) -> Parsed {
    if head.len() < 5 {
        return Parsed::More;
    }
    let rec_len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if head.len() < 5 + rec_len {
        return Parsed::More;
    }
    let hs = &head[5..5 + rec_len];
    let get = |b: &[u8], at: usize, n: usize| -> Option<usize> {
        let s = b.get(at..at + n)?;
        Some(s.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x)))
    };
    let parse = || -> Option<String> {
        if *hs.first()? != 1 {
            return None;
        }
        // type 1, length 3, version 2, random 32
        let mut at = 4 + 2 + 32;
        at += 1 + get(hs, at, 1)?; // session id
        at += 2 + get(hs, at, 2)?; // cipher suites
        at += 1 + get(hs, at, 1)?; // compression
        let ext_end = at + 2 + get(hs, at, 2)?;
        at += 2;
        while at + 4 <= ext_end.min(hs.len()) {
            let (ty, len) = (get(hs, at, 2)?, get(hs, at + 2, 2)?);
            at += 4;
            if ty == 0 {
                // server_name_list length 2, name type 1, name length 2
                let name_len = get(hs, at + 3, 2)?;
                let name = hs.get(at + 5..at + 5 + name_len)?;
                return Some(String::from_utf8_lossy(name).to_ascii_lowercase());
            }
            at += len;
        }
        None
    };
    match parse() {
        Some(n) => Parsed::Name(n),
        None => Parsed::NoName,
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
    }

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let name = b"api.example.test";
        let mut sni_ext = vec![0, 0]; // type server_name
        let list_len = name.len() + 3;
        sni_ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        sni_ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_ext.extend_from_slice(name);
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
        assert_eq!(sni(&rec), Parsed::Name("api.example.test".into()));
        assert_eq!(sni(&rec[..10]), Parsed::More);
    }
}
