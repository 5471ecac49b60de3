//! Run callbacks: when a run ends, burrow POSTs a JSON event to the run's `callback_url`, signed
//! with the server's callback key (`X-Burrow-Signature: sha256=<hex HMAC-SHA256 of the body>`).
//! Plain HTTP/1.1 over TCP is enough for the receivers burrow is given (an agent framework on the
//! same network); `https://` URLs are refused at create rather than silently not delivered.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 3;

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("run.callback_url {url:?}: {why}");
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// callback URLs are supported"))?;
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("too long or contains spaces or control characters"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(bad("user info is not allowed"));
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            match after {
                "" => (h, None),
                _ => (
                    h,
                    Some(after.strip_prefix(':').ok_or_else(|| bad("bad port"))?),
                ),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("bad port"))?,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Url {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        path: path.to_string(),
    })
}

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Delivers `event` in the background, retrying a few times; failures are logged, never raised.
pub fn send(url: String, event: serde_json::Value, key: Arc<Vec<u8>>) {
    tokio::spawn(async move {
        let body = event.to_string();
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(TIMEOUT, post(&url, &body, &key)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => return,
                Ok(Ok(status)) => tracing::warn!(%url, status, attempt, "run callback refused"),
                Ok(Err(e)) => tracing::warn!(%url, error = %e, attempt, "run callback failed"),
                Err(_) => tracing::warn!(%url, attempt, "run callback timed out"),
            }
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
    });
}

async fn post(url: &str, body: &str, key: &[u8]) -> std::io::Result<u16> {
    let u = parse_url(url).map_err(std::io::Error::other)?;
    let mut conn = tokio::net::TcpStream::connect((u.host.as_str(), u.port)).await?;
    let sig = hex::encode(hmac_sha256(key, body.as_bytes()));
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Burrow-Signature: sha256={sig}\r\nConnection: close\r\nUser-Agent: burrow\r\n\r\n{body}",
        u.path,
        u.host,
        body.len()
    );
    conn.write_all(req.as_bytes()).await?;
    let mut head = vec![0u8; 64];
    let n = conn.read(&mut head).await?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status in the reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_with_host_port_and_path() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/hook?x=1").unwrap(),
            Url {
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/hook?x=1".into()
            }
        );
        assert_eq!(parse_url("http://example.test").unwrap().port, 80);
        let v6 = parse_url("http://[::1]:9000/h").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.path.as_str()),
            ("::1", 9000, "/h")
        );
        assert_eq!(parse_url("http://[::1]").unwrap().port, 80);
        for bad in [
            "https://a/b",
            "ftp://a",
            "http://",
            "http://a:0/",
            "http://a:99999/",
            "http://u@a/",
            "http://a/ b",
            "http://[::1",
            "http://[::1]x/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
