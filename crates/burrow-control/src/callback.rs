//! Run callbacks: when a run ends, burrow POSTs a signed JSON event to the run's `callback_url`.
//! This module owns who may be called, how, and how it is signed.
//!
//! **Targets.** The server makes the request, so a URL must not turn it against itself or its
//! neighbours: loopback, link-local (cloud metadata at 169.254.169.254), private and shared
//! ranges, reserved, multicast and unspecified addresses, the server's own interface addresses,
//! and the sandboxes' range are refused ([`Targets`]), in every spelling of an address (the URL
//! is parsed the WHATWG way, so `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.0.0.1.` are all
//! 127.0.0.1; IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 addresses are judged by the IPv4
//! address inside). A name is judged by every address it resolves to, at create *and* at connect
//! time: the HTTP client resolves through [`CheckedResolver`], which applies the same rules to
//! each address, so a name that resolved somewhere safe at create and to loopback later is
//! refused when it matters. An operator opens chosen ranges with `burrow up --callback-allow
//! CIDR` (repeatable); the sandboxes' range can never be opened.
//!
//! **Transport.** `reqwest` over rustls (`http://` and `https://`; the system's roots plus
//! `--callback-ca`), no proxy from the environment (it would be what gets checked instead of the
//! target), no redirects followed (a 3xx is a failed delivery), bounded time per attempt.
//!
//! **Signing.** Each user has their own key, derived and never stored: HMAC-SHA256 of the user's
//! id under the server's callback key (`<data>/callback.key`), shown to its user by
//! `GET /v1/callback-key` as 64 hex characters; that text (its ASCII bytes) is the HMAC key.
//! `X-Burrow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`; the body also
//! carries `timestamp` (= t) and an event `id` that stays the same across retries. Receivers
//! refuse a `t` more than [`REPLAY_WINDOW_S`] from their clock and remember ids seen within it.
//! Rotation: replacing `callback.key` (and restarting) changes every user's key at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;

/// Time for one delivery attempt (connect, TLS, request, response head).
const TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 3;
/// How long a name may take to resolve when a callback URL is checked.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How far a callback's timestamp may be from a receiver's clock before it refuses it.
pub const REPLAY_WINDOW_S: u64 = 300;
pub const SIGNATURE_HEADER: &str = "x-burrow-signature";
const MAX_URL: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("{host} is {address}, {why}: callbacks may not go there (an operator can allow a range with `burrow up --callback-allow CIDR`)")]
    Refused {
        host: String,
        address: IpAddr,
        why: &'static str,
    },
    #[error("{host} does not resolve to any address")]
    NoAddress { host: String },
    #[error("resolving {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {host} took longer than {RESOLVE_TIMEOUT:?}")]
    ResolveTimeout { host: String },
    #[error("the HTTP client for callbacks could not be built")]
    Client(#[source] reqwest::Error),
}

/// Which addresses a callback may reach.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// Ranges the operator opened (`--callback-allow`).
    allow: Vec<IpNet>,
    /// The sandboxes' range: another tenant's sandbox is never a target, whatever is allowed.
    sandboxes: Option<IpNet>,
}

impl Targets {
    pub fn new(allow: Vec<IpNet>, sandboxes: Option<IpNet>) -> Targets {
        Targets { allow, sandboxes }
    }

    /// Why `ip` may not be called, or `None` when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        // One address, one spelling: an IPv6 address that carries an IPv4 one is that address.
        let ip = embedded_v4(ip).map_or(ip, IpAddr::V4);
        if self.sandboxes.is_some_and(|r| r.contains(&ip)) {
            return Some("in the sandboxes' range");
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        if let Some(why) = classify(ip) {
            return Some(why);
        }
        // The server's own addresses (a public one included) reach its own services.
        match burrow_linux::net::local_addresses() {
            Ok(own) if own.contains(&ip) => Some("one of this server's own addresses"),
            Ok(_) => None,
            Err(_) => Some("unchecked (this server's own addresses could not be read)"),
        }
    }

    fn check(&self, host: &str, ip: IpAddr) -> Result<(), CallbackError> {
        match self.refusal(ip) {
            None => Ok(()),
            Some(why) => Err(CallbackError::Refused {
                host: host.to_string(),
                address: ip,
                why,
            }),
        }
    }
}

/// The IPv4 address an IPv6 one stands for: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated but routable by some stacks), NAT64 (`64:ff9b::/96`) and 6to4
/// (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // `::` and `::1` are IPv6's own unspecified and loopback, judged as such.
    if s[..6] == [0; 6] && !matches!(v6, Ipv6Addr::UNSPECIFIED | Ipv6Addr::LOCALHOST) {
        return Some(low);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The address classes no callback may reach unless allowed.
fn classify(ip: IpAddr) -> Option<&'static str> {
    let in4 = |a: Ipv4Addr, net: [u8; 4], prefix: u8| {
        ipnet::Ipv4Net::new(Ipv4Addr::from(net), prefix).is_ok_and(|n| n.contains(&a))
    };
    match ip {
        IpAddr::V4(a) => {
            if a.is_loopback() {
                Some("loopback")
            } else if a.octets()[0] == 0 {
                Some("unspecified (0.0.0.0/8)")
            } else if a.is_link_local() {
                Some("link-local (169.254.0.0/16, where cloud metadata lives)")
            } else if a.is_private() {
                Some("in a private range (10/8, 172.16/12, 192.168/16)")
            } else if in4(a, [100, 64, 0, 0], 10) {
                Some("in the shared address space (100.64.0.0/10)")
            } else if a.is_multicast() {
                Some("multicast")
            } else if a.octets()[0] >= 240 {
                Some("reserved or broadcast (240.0.0.0/4)")
            } else if in4(a, [192, 0, 0, 0], 24) || in4(a, [198, 18, 0, 0], 15) {
                Some("reserved (192.0.0.0/24, 198.18.0.0/15)")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s0 = a.segments()[0];
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if s0 & 0xffc0 == 0xfe80 || s0 & 0xffc0 == 0xfec0 {
                Some("link-local or site-local (fe80::/10, fec0::/10)")
            } else if s0 & 0xfe00 == 0xfc00 {
                Some("a unique local address (fc00::/7)")
            } else if a.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// Resolves `host` and checks every address; all must be allowed.
async fn resolve_checked(targets: &Targets, host: &str) -> Result<Vec<IpAddr>, CallbackError> {
    // `name.` and `name` are one name; the system resolver's files (/etc/hosts) know only the
    // second spelling.
    let host = host.strip_suffix('.').unwrap_or(host).to_string();
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0)))
        .await
        .map_err(|_| CallbackError::ResolveTimeout { host: host.clone() })?
        .map_err(|source| CallbackError::Resolve {
            host: host.clone(),
            source,
        })?;
    let mut addrs: Vec<IpAddr> = found.map(|a| a.ip()).collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(CallbackError::NoAddress { host });
    }
    for ip in &addrs {
        targets.check(&host, *ip)?;
    }
    Ok(addrs)
}

/// The callback client's resolver: the target rules on every address of every name, at the
/// moment of connecting.
struct CheckedResolver(Arc<Targets>);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let targets = self.0.clone();
        Box::pin(async move {
            let addrs = resolve_checked(&targets, name.as_str()).await?;
            let addrs: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// A callback URL, syntax only: `http://` or `https://`, a host, no user info.
pub fn parse_url(raw: &str) -> Result<url::Url, String> {
    let bad = |why: &str| format!("run.callback_url {raw:?}: {why}");
    if raw.len() > MAX_URL || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("too long or contains spaces or control characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("only http:// and https:// callback URLs are supported"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("user info is not allowed"));
    }
    if url.host().is_none() {
        return Err(bad("no host"));
    }
    if url.port() == Some(0) {
        return Err(bad("bad port"));
    }
    Ok(url)
}

/// Sends run callbacks and checks their URLs.
pub struct Callbacks {
    /// The server's callback key (hex text); users' keys derive from it.
    server_key: Vec<u8>,
    targets: Arc<Targets>,
    extra_roots: Vec<reqwest::Certificate>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl Callbacks {
    /// `server_key` signs (through the users' derived keys); `targets` says where callbacks may
    /// go; `extra_roots` are trusted for `https://` besides the system's roots.
    pub fn new(
        server_key: Vec<u8>,
        targets: Targets,
        extra_roots: Vec<reqwest::Certificate>,
    ) -> Callbacks {
        Callbacks {
            server_key,
            targets: Arc::new(targets),
            extra_roots,
            client: OnceLock::new(),
        }
    }

    /// Builds the HTTP client now, so a server whose TLS cannot start says so at start-up.
    pub fn ready(&self) -> Result<(), String> {
        self.client().map(|_| ()).map_err(str::to_string)
    }

    fn build(&self) -> Result<reqwest::Client, CallbackError> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .user_agent(concat!("burrow/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(CheckedResolver(self.targets.clone())));
        for cert in &self.extra_roots {
            b = b.add_root_certificate(cert.clone());
        }
        b.build().map_err(CallbackError::Client)
    }

    fn client(&self) -> Result<&reqwest::Client, &str> {
        self.client
            .get_or_init(|| self.build().map_err(|e| crate::control::error_chain(&e)))
            .as_ref()
            .map_err(String::as_str)
    }

    /// A user's callback key: derived from the server's key and the user's id, never stored.
    pub fn user_key(&self, user_id: &str) -> String {
        hex::encode(hmac_sha256(
            &self.server_key,
            format!("callback-key:{user_id}").as_bytes(),
        ))
    }

    /// Whether callbacks may go to `raw`: its syntax, then its host's every address now. The
    /// same rules apply again when a callback connects.
    pub async fn check(&self, raw: &str) -> Result<(), String> {
        let url = parse_url(raw)?;
        let refused = |e: CallbackError| {
            format!(
                "run.callback_url {raw:?}: {}",
                crate::control::error_chain(&e)
            )
        };
        match url.host() {
            Some(url::Host::Ipv4(a)) => self.targets.check(&a.to_string(), IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => self.targets.check(&a.to_string(), IpAddr::V6(a)),
            Some(url::Host::Domain(d)) => resolve_checked(&self.targets, d).await.map(|_| ()),
            None => return Err(format!("run.callback_url {raw:?}: no host")),
        }
        .map_err(refused)
    }

    /// Delivers `event` for `user_id` in the background, retrying a few times; a refused target
    /// is not retried. Outcomes are counted in `burrow_callbacks_total{result}` and logged,
    /// never raised.
    pub fn send(self: &Arc<Self>, user_id: &str, url: String, mut event: serde_json::Value) {
        let key = self.user_key(user_id);
        event["id"] = format!("evt_{}", hex::encode(rand::random::<[u8; 12]>())).into();
        let this = self.clone();
        tokio::spawn(async move {
            for attempt in 1..=ATTEMPTS {
                let result = tokio::time::timeout(TIMEOUT * 2, this.post(&url, &key, &mut event))
                    .await
                    .unwrap_or(Err(Delivery::Failed("timed out".into())));
                match result {
                    Ok(()) => {
                        metrics::counter!("burrow_callbacks_total", "result" => "delivered")
                            .increment(1);
                        return;
                    }
                    Err(Delivery::Refused(why)) => {
                        metrics::counter!("burrow_callbacks_total", "result" => "refused")
                            .increment(1);
                        tracing::warn!(%url, why, "run callback refused: target not allowed");
                        return;
                    }
                    Err(Delivery::Failed(why)) => {
                        tracing::warn!(%url, why, attempt, "run callback failed")
                    }
                }
                if attempt < ATTEMPTS {
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
            }
            metrics::counter!("burrow_callbacks_total", "result" => "failed").increment(1);
        });
    }

    async fn post(
        &self,
        raw: &str,
        key: &str,
        event: &mut serde_json::Value,
    ) -> Result<(), Delivery> {
        let url = parse_url(raw).map_err(Delivery::Refused)?;
        // Addresses written in the URL never reach the resolver: checked here, each attempt.
        let literal = match url.host() {
            Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
            _ => None,
        };
        if let Some(ip) = literal {
            self.targets
                .check(&ip.to_string(), ip)
                .map_err(|e| Delivery::Refused(e.to_string()))?;
        }
        let client = self.client().map_err(|e| Delivery::Failed(e.into()))?;
        let t = burrow_store::now_unix();
        event["timestamp"] = t.into();
        let body = event.to_string();
        let resp = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(key.as_bytes(), t, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let mut cur: Option<&dyn std::error::Error> = Some(&e);
                while let Some(c) = cur {
                    if let Some(ce @ CallbackError::Refused { .. }) = c.downcast_ref() {
                        return Delivery::Refused(ce.to_string());
                    }
                    cur = c.source();
                }
                Delivery::Failed(crate::control::error_chain(&e))
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Delivery::Failed(format!("answered {}", resp.status())))
        }
    }
}

enum Delivery {
    /// The target is not allowed: retrying cannot help.
    Refused(String),
    Failed(String),
}

/// `t=<t>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`.
pub fn signature(key: &[u8], t: i64, body: &str) -> String {
    let mac = hmac_sha256(key, format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac))
}

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(raw: &str) -> IpAddr {
        match parse_url(raw).unwrap().host().unwrap() {
            url::Host::Ipv4(a) => IpAddr::V4(a),
            url::Host::Ipv6(a) => IpAddr::V6(a),
            url::Host::Domain(d) => panic!("{raw} parsed as the name {d}"),
        }
    }

    #[test]
    fn urls_are_http_or_https_with_a_host() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/hook?x=1")
                .unwrap()
                .port_or_known_default(),
            Some(9000)
        );
        assert_eq!(
            parse_url("https://hooks.example/x")
                .unwrap()
                .port_or_known_default(),
            Some(443)
        );
        for bad in [
            "ftp://a",
            "http://",
            "http://a:99999/",
            "http://u@a/",
            "http://u:p@a/",
            "http://a/ b",
            "http://[::1",
            "http://[::1]x/",
            "file:///etc/passwd",
            "http://a:0/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    /// Every spelling of a refused address is that address (the URL parser normalises them), and
    /// each class is refused.
    #[test]
    fn refused_targets_in_every_spelling() {
        let t = Targets::new(Vec::new(), "10.200.0.0/16".parse().ok());
        for raw in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:169.254.169.254]/",
            "http://0xa9fea9fe/",
            "http://[fe80::1]/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://10.200.0.5:8000/",
            "http://224.0.0.1/",
            "http://[ff02::1]/",
            "http://0.0.0.0/",
            "http://0/",
            "http://[::]/",
            "http://255.255.255.255/",
        ] {
            let ip = host_of(raw);
            assert!(t.refusal(ip).is_some(), "{raw} ({ip}) allowed");
        }
        for ok in [
            "http://203.0.113.10/",
            "http://[2001:db8::1]/",
            "https://8.8.8.8/",
        ] {
            assert_eq!(t.refusal(host_of(ok)), None, "{ok} refused");
        }
    }

    #[test]
    fn allowed_ranges_open_all_but_the_sandboxes() {
        let t = Targets::new(
            vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            "10.200.0.0/16".parse().ok(),
        );
        assert_eq!(t.refusal("127.0.0.1".parse().unwrap()), None);
        assert_eq!(t.refusal("::ffff:127.0.0.1".parse().unwrap()), None);
        assert_eq!(t.refusal("10.1.2.3".parse().unwrap()), None);
        assert!(t.refusal("10.200.0.9".parse().unwrap()).is_some());
        assert!(t.refusal("::1".parse().unwrap()).is_some());
        assert!(t.refusal("169.254.169.254".parse().unwrap()).is_some());
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to() {
        let c = Callbacks::new(b"k".to_vec(), Targets::default(), Vec::new());
        // /etc/hosts names: no packet leaves the machine.
        for raw in [
            "http://localhost:9/x",
            "http://localhost./x",
            "https://LOCALHOST/",
        ] {
            let e = c.check(raw).await.unwrap_err();
            assert!(e.contains("loopback"), "{raw}: {e}");
        }
        assert!(c.check("http://203.0.113.10/").await.is_ok());
        let open = Callbacks::new(
            b"k".to_vec(),
            Targets::new(
                vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
                None,
            ),
            Vec::new(),
        );
        assert!(open.check("http://localhost:9/x").await.is_ok());
    }

    #[test]
    fn keys_are_per_user_and_signatures_cover_the_timestamp() {
        let c = Callbacks::new(b"server".to_vec(), Targets::default(), Vec::new());
        let (a, b) = (c.user_key("alice"), c.user_key("bob"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            Callbacks::new(b"server".to_vec(), Targets::default(), Vec::new()).user_key("alice")
        );
        assert_ne!(
            a,
            Callbacks::new(b"rotated".to_vec(), Targets::default(), Vec::new()).user_key("alice")
        );
        let s = signature(a.as_bytes(), 1700000000, "{}");
        assert!(s.starts_with("t=1700000000,v1="), "{s}");
        assert_ne!(s, signature(a.as_bytes(), 1700000001, "{}"));
        assert_ne!(s, signature(b.as_bytes(), 1700000000, "{}"));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
