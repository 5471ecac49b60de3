//! A small DNS client (A records over UDP), for the egress proxy to check that a connection opened
//! in the name of an allowed host goes to an address that name resolves to. Messages are built
//! and parsed by `hickory-proto`; this module only sends one query and reads one answer.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

const TIMEOUT: Duration = Duration::from_secs(3);

/// The A records of `name` from `server`; empty on NXDOMAIN or any failure.
pub async fn resolve_a(server: Ipv4Addr, name: &str) -> Vec<Ipv4Addr> {
    let id: u16 = rand::random();
    let Some(query) = build_query(id, name) else {
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
        Ok(Ok(n)) => parse_answers(id, &buf[..n]),
        _ => Vec::new(),
    }
}

/// A recursive query for `name`'s A records; `None` for a name DNS cannot carry.
fn build_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let name = Name::from_ascii(name).ok()?;
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, RecordType::A));
    m.to_vec().ok()
}

/// The A records of a response to query `id`; nothing for another id, an error code, or a
/// message that does not parse.
fn parse_answers(id: u16, m: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(msg) = Message::from_vec(m) else {
        return Vec::new();
    };
    if msg.id() != id
        || msg.message_type() != MessageType::Response
        || msg.response_code() != ResponseCode::NoError
    {
        return Vec::new();
    }
    msg.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::Record;

    fn response(id: u16, code: ResponseCode, ips: &[Ipv4Addr]) -> Vec<u8> {
        let name = Name::from_ascii("api.example.test.").unwrap();
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_response_code(code)
            .add_query(Query::query(name.clone(), RecordType::A));
        for ip in ips {
            m.add_answer(Record::from_rdata(name.clone(), 60, RData::A(A(*ip))));
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn answers_are_read_from_a_response_to_our_query() {
        let q = Message::from_vec(&build_query(0x1234, "api.example.test").unwrap()).unwrap();
        assert_eq!(q.queries()[0].name().to_ascii(), "api.example.test.");
        assert!(q.recursion_desired());
        let ips = [
            Ipv4Addr::new(203, 0, 113, 10),
            Ipv4Addr::new(203, 0, 113, 11),
        ];
        let r = response(0x1234, ResponseCode::NoError, &ips);
        assert_eq!(parse_answers(0x1234, &r), ips);
    }

    #[test]
    fn bad_answers_give_nothing() {
        let ip = [Ipv4Addr::new(203, 0, 113, 10)];
        // Another id, an error code, a query instead of a response, garbage, a cut message.
        assert!(parse_answers(1, &response(2, ResponseCode::NoError, &ip)).is_empty());
        assert!(parse_answers(1, &response(1, ResponseCode::NXDomain, &ip)).is_empty());
        assert!(parse_answers(1, &build_query(1, "a.test").unwrap()).is_empty());
        assert!(parse_answers(1, b"\x00\x01garbage").is_empty());
        let r = response(1, ResponseCode::NoError, &ip);
        assert!(parse_answers(1, &r[..r.len() - 2]).is_empty());
        // Names DNS cannot carry.
        assert!(build_query(1, "a..b").is_none());
        assert!(build_query(1, &format!("{}.test", "x".repeat(64))).is_none());
    }
}
