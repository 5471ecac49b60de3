//! Sandbox networking as the API shows it: the egress policy, its parsed form, and the one decision
//! function that both the firewall (for addresses) and the egress proxy (for HTTP Host and TLS SNI
//! names) follow. No I/O.
//!
//! Precedence, first match wins (docs/architecture.md, "Networking"):
//! 1. always dropped: loopback, link-local (cloud metadata), multicast, reserved, the host, other
//!    sandboxes, whatever the policy says;
//! 2. `deny_out` (addresses, then names);
//! 3. `allow_out` addresses;
//! 4. the private ranges (RFC 1918, CGNAT) are dropped;
//! 5. `allow_out` names;
//! 6. `internet`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Most entries in `allow_out` or `deny_out`.
pub const MAX_RULES: usize = 64;

/// Never reachable from a sandbox: "this network", loopback, link-local (169.254.169.254 and the
/// other metadata services), multicast, reserved and broadcast.
pub const ALWAYS_BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Dropped unless `allow_out` names them: RFC 1918 and carrier-grade NAT.
pub const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

fn yes() -> bool {
    true
}

/// A sandbox's egress policy. `allow_out` and `deny_out` hold IPv4 CIDRs (`203.0.113.0/24`,
/// `198.51.100.7`) and domain names (`example.com` also covers its subdomains; `*.example.com`
/// only them). Names are enforced on HTTP (port 80, by `Host`) and TLS (port 443, by SNI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Whether public addresses not named in `allow_out` are reachable.
    #[serde(default = "yes")]
    pub internet: bool,
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

/// Body of `PATCH /v1/sandboxes/{id}/network`: absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkPatch {
    #[serde(default)]
    pub internet: Option<bool>,
    #[serde(default)]
    pub allow_out: Option<Vec<String>>,
    #[serde(default)]
    pub deny_out: Option<Vec<String>>,
}

impl NetworkPolicy {
    pub fn patched(&self, p: &NetworkPatch) -> NetworkPolicy {
        NetworkPolicy {
            internet: p.internet.unwrap_or(self.internet),
            allow_out: p
                .allow_out
                .clone()
                .unwrap_or_else(|| self.allow_out.clone()),
            deny_out: p.deny_out.clone().unwrap_or_else(|| self.deny_out.clone()),
        }
    }
}

/// A sandbox's network as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxNetwork {
    /// The sandbox's own IPv4 address (its `eth0`).
    pub address: String,
    pub policy: NetworkPolicy,
    /// Ports anyone may reach through the port proxy without a token.
    #[serde(default)]
    pub public_ports: Vec<u16>,
}

/// Body of `PUT /v1/sandboxes/{id}/ports/{port}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetPort {
    /// Reachable through the proxy without a token.
    pub public: bool,
}

/// Where a sandbox's port is reachable through the server's port proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortInfo {
    pub port: u16,
    /// `http://<port>-<id>.<domain>/` when the server has a `--domain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `<server>/v1/sandboxes/<id>/ports/<port>/`: works without wildcard DNS.
    pub path_url: String,
    pub public: bool,
    /// `path_url` with a signature that works without any other token until `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_url: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// An IPv4 network: address and prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?} has a bad prefix length (0-32)"))?;
        let c = Cidr { addr, prefix };
        if c.network() != addr {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}/{prefix}?",
                c.network()
            ));
        }
        Ok(c)
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The `n`-th address of the network.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        (u64::from(n) < self.size()).then(|| Ipv4Addr::from(u32::from(self.network()) + n))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().filter_map(|s| Cidr::parse(s).ok()).collect()
}

/// A domain rule: `example.com` (itself and subdomains) or `*.example.com` (subdomains only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRule {
    pub name: String,
    pub subdomains_only: bool,
}

impl DomainRule {
    pub fn parse(s: &str) -> Result<DomainRule, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (name, subdomains_only) = match lower.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (lower, false),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a domain name or an IPv4 CIDR (IPv6 is off inside sandboxes)"
            ));
        }
        Ok(DomainRule {
            name,
            subdomains_only,
        })
    }

    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let sub = host
            .strip_suffix(&self.name)
            .is_some_and(|rest| rest.ends_with('.'));
        sub || (!self.subdomains_only && host == self.name)
    }
}

/// A policy, parsed and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub internet: bool,
    pub allow_cidrs: Vec<Cidr>,
    pub deny_cidrs: Vec<Cidr>,
    pub allow_domains: Vec<DomainRule>,
    pub deny_domains: Vec<DomainRule>,
}

/// Why the egress proxy or the firewall refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(&'static str),
}

impl CompiledPolicy {
    pub fn compile(p: &NetworkPolicy) -> Result<CompiledPolicy, String> {
        let mut out = CompiledPolicy {
            internet: p.internet,
            ..Default::default()
        };
        for (list, what) in [(&p.allow_out, "allow_out"), (&p.deny_out, "deny_out")] {
            if list.len() > MAX_RULES {
                return Err(format!(
                    "{what} has {} entries, at most {MAX_RULES} allowed",
                    list.len()
                ));
            }
            for entry in list {
                let looks_like_ip = entry.contains(':')
                    || entry
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
                let allow = what == "allow_out";
                if looks_like_ip {
                    if entry.contains(':') {
                        return Err(format!(
                            "{what}: {entry:?}: IPv6 is off inside sandboxes; use IPv4 CIDRs or names"
                        ));
                    }
                    let c = Cidr::parse(entry).map_err(|e| format!("{what}: {e}"))?;
                    if allow {
                        out.allow_cidrs.push(c)
                    } else {
                        out.deny_cidrs.push(c)
                    }
                } else {
                    let d = DomainRule::parse(entry).map_err(|e| format!("{what}: {e}"))?;
                    if allow {
                        out.allow_domains.push(d)
                    } else {
                        out.deny_domains.push(d)
                    }
                }
            }
        }
        if let Some(c) = out.allow_cidrs.iter().find(|c| out.deny_cidrs.contains(c)) {
            return Err(format!("{c} is in both allow_out and deny_out"));
        }
        if let Some(d) = out
            .allow_domains
            .iter()
            .find(|d| out.deny_domains.contains(d))
        {
            return Err(format!("{:?} is in both allow_out and deny_out", d.name));
        }
        for c in &out.allow_cidrs {
            if let Some(b) = cidrs(ALWAYS_BLOCKED)
                .iter()
                .find(|b| b.contains(c.addr) && c.prefix >= b.prefix)
            {
                return Err(format!(
                    "allow_out {c} lies in {b}, which is never reachable from a sandbox"
                ));
            }
        }
        Ok(out)
    }

    /// Whether names matter: then HTTP and TLS go through the egress proxy.
    pub fn has_domains(&self) -> bool {
        !self.allow_domains.is_empty() || !self.deny_domains.is_empty()
    }

    /// Whether only an `allow_out` name lets this connection through (the address alone would not):
    /// then the address must be one the name resolves to, or any Host would open any address.
    pub fn allowed_only_by_name(&self, dst: Ipv4Addr, name: &str) -> bool {
        self.decide(dst, Some(name)) == Verdict::Allow && self.decide(dst, None) != Verdict::Allow
    }

    /// The decision for a connection to `dst`, with the name the client asked for when known
    /// (HTTP `Host`, TLS SNI). The firewall applies the same order to addresses alone.
    pub fn decide(&self, dst: Ipv4Addr, name: Option<&str>) -> Verdict {
        if cidrs(ALWAYS_BLOCKED).iter().any(|c| c.contains(dst)) {
            return Verdict::Deny("always blocked (loopback, link-local, multicast, reserved)");
        }
        if self.deny_cidrs.iter().any(|c| c.contains(dst)) {
            return Verdict::Deny("deny_out address");
        }
        if let Some(n) = name {
            if self.deny_domains.iter().any(|d| d.matches(n)) {
                return Verdict::Deny("deny_out name");
            }
        }
        if self.allow_cidrs.iter().any(|c| c.contains(dst)) {
            return Verdict::Allow;
        }
        if cidrs(PRIVATE).iter().any(|c| c.contains(dst)) {
            return Verdict::Deny("private range");
        }
        if let Some(n) = name {
            if self.allow_domains.iter().any(|d| d.matches(n)) {
                return Verdict::Allow;
            }
        }
        if self.internet {
            Verdict::Allow
        } else {
            Verdict::Deny("internet is off")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(internet: bool, allow: &[&str], deny: &[&str]) -> CompiledPolicy {
        CompiledPolicy::compile(&NetworkPolicy {
            internet,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().prefix, 8);
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().prefix, 32);
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "300.1.1.1", "1.2.3.4/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Cidr::parse("10.200.0.0/16")
            .unwrap()
            .contains("10.200.3.4".parse().unwrap()));
    }

    #[test]
    fn bad_and_contradicting_policies_are_refused() {
        let bad = |allow: &[&str], deny: &[&str]| {
            CompiledPolicy::compile(&NetworkPolicy {
                internet: true,
                allow_out: allow.iter().map(|s| s.to_string()).collect(),
                deny_out: deny.iter().map(|s| s.to_string()).collect(),
            })
            .is_err()
        };
        assert!(bad(&["exa mple.com"], &[]));
        assert!(bad(&["::1/128"], &[]));
        assert!(bad(&["-bad.com"], &[]));
        assert!(bad(&["1.2.3.4/40"], &[]));
        assert!(bad(&["1.2.3.0/24"], &["1.2.3.0/24"]));
        assert!(bad(&["a.com"], &["A.com"]));
        assert!(bad(&["169.254.169.254"], &[]));
        assert!(!bad(&["0.0.0.0/0"], &[]));
        let many: Vec<String> = (0..65).map(|i| format!("h{i}.com")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(bad(&many, &[]));
    }

    #[test]
    fn precedence_is_deny_then_allow_then_private_then_internet() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let p = pol(
            false,
            &["10.1.0.0/16", "good.com", "192.168.1.0/24"],
            &["192.168.1.7", "bad.good.com"],
        );
        assert_eq!(p.decide(ip("10.1.2.3"), None), Verdict::Allow);
        assert!(matches!(p.decide(ip("10.2.0.1"), None), Verdict::Deny(_)));
        assert!(matches!(
            p.decide(ip("192.168.1.7"), None),
            Verdict::Deny(_)
        ));
        assert_eq!(p.decide(ip("192.168.1.8"), None), Verdict::Allow);
        assert_eq!(
            p.decide(ip("8.8.8.8"), Some("api.good.com")),
            Verdict::Allow
        );
        assert!(matches!(
            p.decide(ip("8.8.8.8"), Some("bad.good.com")),
            Verdict::Deny(_)
        ));
        assert!(matches!(p.decide(ip("8.8.8.8"), None), Verdict::Deny(_)));
        // A name never opens a private or blocked address (Host and SNI are the client's to choose).
        assert!(matches!(
            p.decide(ip("10.9.9.9"), Some("good.com")),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            p.decide(ip("169.254.169.254"), Some("good.com")),
            Verdict::Deny(_)
        ));
        let open = pol(true, &[], &[]);
        assert_eq!(open.decide(ip("8.8.8.8"), None), Verdict::Allow);
        assert!(matches!(
            open.decide(ip("10.0.0.1"), None),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn domain_rules_match_names_and_subdomains() {
        let d = DomainRule::parse("Example.com").unwrap();
        assert!(
            d.matches("example.com") && d.matches("a.b.example.com") && d.matches("EXAMPLE.COM.")
        );
        assert!(!d.matches("badexample.com") && !d.matches("example.com.evil"));
        let w = DomainRule::parse("*.example.com").unwrap();
        assert!(w.matches("a.example.com") && !w.matches("example.com"));
    }
}
