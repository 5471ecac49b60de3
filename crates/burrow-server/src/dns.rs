//! A minimal DNS client (A records over UDP), for the egress proxy to check that a connection
//! opened in the name of an allowed host goes to an address that name resolves to.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

/// The A records of `name` from `server`; empty on NXDOMAIN or any failure.
pub async fn resolve_a(server: Ipv4Addr, name: &str) -> Vec<Ipv4Addr> {
    let Some(query) = build_query(rand::random(), name) else {
        return Vec::new();
    };
    let Ok(sock) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
        return Vec::new();
    };
    if sock.connect(SocketAddr::from((server, 53))).await.is_err()
        || sock.send(&query).await.is_err()
    {
        return Vec::new();
    }
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(TIMEOUT, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => parse_answers(&query[..2], &buf[..n]),
        _ => Vec::new(),
    }
}

fn build_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]); // recursion desired, one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    Some(q)
}

/// Skips a (possibly compressed) name at `at`; returns the offset after it.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)?;
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        if len == 0 {
            return Some(at + 1);
        }
        at += 1 + usize::from(len);
    }
}

fn parse_answers(id: &[u8], m: &[u8]) -> Vec<Ipv4Addr> {
    let parse = || -> Option<Vec<Ipv4Addr>> {
        if m.get(..2)? != id || m.get(3)? & 0x0f != 0 {
            return None;
        }
        let qd = u16::from_be_bytes([*m.get(4)?, *m.get(5)?]);
        let an = u16::from_be_bytes([*m.get(6)?, *m.get(7)?]);
        let mut at = 12;
        for _ in 0..qd {
            at = skip_name(m, at)? + 4;
        }
        let mut out = Vec::new();
        for _ in 0..an {
            at = skip_name(m, at)?;
            let ty = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
            let len = usize::from(u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]));
            at += 10;
            if ty == 1 && len == 4 {
                let d = m.get(at..at + 4)?;
                out.push(Ipv4Addr::new(d[0], d[1], d[2], d[3]));
            }
            at += len;
        }
        Some(out)
    };
    parse().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_through_compressed_names() {
        let q = build_query(0x1234, "api.example.test").unwrap();
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2; // two answers
        for ip in [[203, 0, 113, 10], [203, 0, 113, 11]] {
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&ip);
        }
        assert_eq!(
            parse_answers(&q[..2], &r),
            vec![
                Ipv4Addr::new(203, 0, 113, 10),
                Ipv4Addr::new(203, 0, 113, 11)
            ]
        );
        // Another id, or an error code, gives nothing.
        assert!(parse_answers(&[0, 0], &r).is_empty());
        r[3] = 0x83;
        assert!(parse_answers(&q[..2], &r).is_empty());
        assert!(build_query(1, "a..b").is_none());
    }
}
