//! Sandbox networking on the host: addresses, and burrow's one nftables table (`inet burrow`).
//!
//! Each sandbox gets a veth pair (built by `__init`, see [`crate::namespace::init`]): `eth0` inside
//! with its own /32 address, and `bw<id prefix>` on the host carrying the gateway address, with a
//! /32 route to the sandbox. Links are routed point to point: no bridge, so no shared L2 between
//! sandboxes. The pair, its addresses and its routes vanish with the sandbox's network namespace.
//!
//! The firewall is one table this module owns whole. It is installed (replacing any older copy)
//! before the first sandbox starts, and read back and compared at start-up. Per sandbox it holds
//! one chain `sb_<id>` (its egress policy, in the order of [`burrow_types::net`]), an element in
//! the `sandboxes` map that sends the sandbox's interface to that chain, and, when the policy names
//! domains, its address in the `proxied` set, whose HTTP and TLS connections are redirected to the
//! server's egress proxy. Everything else arriving from a sandbox interface is dropped.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use burrow_types::net::{Cidr, CompiledPolicy, ALWAYS_BLOCKED, PRIVATE};
use serde::{Deserialize, Serialize};

pub const TABLE: &str = "burrow";
/// Host-side interface names start with this (and the firewall matches `bw*`).
pub const IF_PREFIX: &str = "bw";
const NFT: &str = "/usr/sbin/nft";

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Sandbox addresses: the first is unused, the second is the gateway, then one per sandbox.
    pub range: Cidr,
    /// Name servers written to every sandbox's `/etc/resolv.conf` (reachable on port 53 whatever
    /// the policy, unless `deny_out` names them).
    pub resolvers: Vec<Ipv4Addr>,
    /// New connections a sandbox may have open at once (tracked by conntrack).
    pub conn_limit: u32,
    /// Port of the server's transparent egress proxy, on the gateway address.
    pub proxy_port: u16,
}

/// What `__init` needs to wire a sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    pub ifname: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub resolvers: Vec<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("sandbox slot {slot} has no address in {range} (make the range larger)")]
    RangeFull { slot: u32, range: Cidr },
    #[error("running nft (install nftables)")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the rules: {0}")]
    Nft(String),
    #[error("the firewall on the host differs from burrow's: {0}")]
    Drift(String),
    #[error("enabling IPv4 forwarding")]
    Forwarding(#[source] std::io::Error),
}

/// What burrow believes is in its table: chains with their rule counts, the map and the set. The
/// same shape is read back from `nft -j`, so the two can be compared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesSummary {
    pub chains: BTreeMap<String, usize>,
    /// Interface → chain it jumps to.
    pub sandboxes: BTreeMap<String, String>,
    pub proxied: Vec<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    ifname: String,
    address: Ipv4Addr,
    policy: CompiledPolicy,
}

pub struct Network {
    cfg: NetConfig,
    /// Sandboxes whose rules are installed, by id.
    installed: Mutex<BTreeMap<String, Entry>>,
}

fn set(items: impl IntoIterator<Item = String>) -> String {
    format!("{{ {} }}", items.into_iter().collect::<Vec<_>>().join(", "))
}

fn chain_name(id: &str) -> String {
    format!("sb_{id}")
}

impl Network {
    pub fn new(cfg: NetConfig) -> Network {
        Network {
            cfg,
            installed: Mutex::default(),
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.cfg.range.nth(1).unwrap_or(self.cfg.range.addr)
    }

    /// The address of the sandbox in uid slot `slot` (slots are unique among live sandboxes).
    pub fn address_of(&self, slot: u32) -> Result<Ipv4Addr, NetError> {
        slot.checked_add(2)
            .and_then(|n| {
                // Keep the last address (broadcast-looking) unused.
                (u64::from(n) + 1 < self.cfg.range.size()).then_some(n)
            })
            .and_then(|n| self.cfg.range.nth(n))
            .ok_or(NetError::RangeFull {
                slot,
                range: self.cfg.range,
            })
    }

    pub fn ifname(id: &str) -> String {
        format!("{IF_PREFIX}{}", id.chars().take(13).collect::<String>())
    }

    pub fn spec(&self, id: &str, slot: u32) -> Result<NetSpec, NetError> {
        Ok(NetSpec {
            ifname: Self::ifname(id),
            address: self.address_of(slot)?,
            gateway: self.gateway(),
            resolvers: self.cfg.resolvers.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.installed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rules of one sandbox's chain, in the order of `CompiledPolicy::decide`.
    fn sandbox_rules(&self, e: &Entry) -> Vec<String> {
        let p = &e.policy;
        let cidrs = |v: &[Cidr]| set(v.iter().map(|c| c.to_string()));
        let mut r = vec![
            // Only its own address leaves its interface (no spoofing).
            format!("ip saddr != {} drop", e.address),
            format!("ct state new ct count over {} drop", self.cfg.conn_limit),
            format!(
                "ip daddr {} drop",
                set(ALWAYS_BLOCKED.iter().map(|s| s.to_string()))
            ),
        ];
        if !p.deny_cidrs.is_empty() {
            r.push(format!("ip daddr {} drop", cidrs(&p.deny_cidrs)));
        }
        // Name servers answer while the sandbox may reach the internet or names on its allow
        // list; with the internet off and no names allowed, DNS would only be a tunnel out.
        if !self.cfg.resolvers.is_empty() && (p.internet || p.has_domains()) {
            r.push(format!(
                "ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept",
                set(self.cfg.resolvers.iter().map(|a| a.to_string()))
            ));
        }
        if p.has_domains() {
            // Redirected to the egress proxy, which decides with the name (and the same order).
            r.push("tcp dport { 80, 443 } accept".into());
        }
        if !p.allow_cidrs.is_empty() {
            r.push(format!("ip daddr {} accept", cidrs(&p.allow_cidrs)));
        }
        r.push(format!(
            "ip daddr {} drop",
            set(PRIVATE.iter().map(|s| s.to_string()))
        ));
        r.push(if p.internet { "accept" } else { "drop" }.into());
        r
    }

    /// The whole table, as `nft -f` input.
    pub fn render(&self) -> String {
        self.render_with(&self.lock())
    }

    fn render_with(&self, installed: &BTreeMap<String, Entry>) -> String {
        let port = self.cfg.proxy_port;
        let range = self.cfg.range;
        let mut t = format!(
            "table inet {TABLE} {{
  map sandboxes {{ type ifname : verdict; }}
  set proxied {{ type ipv4_addr; }}
  chain sandbox_pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname != \"{IF_PREFIX}*\" accept
    meta nfproto ipv6 drop
    ct state established,related accept
    iifname vmap @sandboxes
    drop
  }}
  chain nat_pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{IF_PREFIX}*\" ip saddr @proxied tcp dport {{ 80, 443 }} fib daddr type != local redirect to :{port}
  }}
  chain nat_post {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {range} oifname != \"{IF_PREFIX}*\" masquerade
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    tcp dport {port} iifname != \"{IF_PREFIX}*\" drop
    iifname != \"{IF_PREFIX}*\" accept
    ct state established,related accept
    ct status dnat tcp dport {port} accept
    drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    oifname != \"{IF_PREFIX}*\" accept
    ct state established,related accept
    drop
  }}
"
        );
        for (id, e) in installed.iter() {
            t.push_str(&format!("  chain {} {{\n", chain_name(id)));
            for rule in self.sandbox_rules(e) {
                t.push_str(&format!("    {rule}\n"));
            }
            t.push_str("  }\n");
        }
        t.push_str("}\n");
        let elems: Vec<String> = installed
            .iter()
            .map(|(id, e)| format!("\"{}\" : jump {}", e.ifname, chain_name(id)))
            .collect();
        if !elems.is_empty() {
            t.push_str(&format!(
                "add element inet {TABLE} sandboxes {}\n",
                set(elems)
            ));
        }
        let proxied: Vec<String> = installed
            .values()
            .filter(|e| e.policy.has_domains())
            .map(|e| e.address.to_string())
            .collect();
        if !proxied.is_empty() {
            t.push_str(&format!(
                "add element inet {TABLE} proxied {}\n",
                set(proxied)
            ));
        }
        t
    }

    /// What burrow has installed, in the shape `actual()` reads back.
    pub fn expected(&self) -> RulesSummary {
        self.expected_with(&self.lock())
    }

    fn expected_with(&self, installed: &BTreeMap<String, Entry>) -> RulesSummary {
        let chains = chain_rule_counts(&self.render_with(installed));
        let mut sandboxes = BTreeMap::new();
        let mut proxied = Vec::new();
        for (id, e) in installed.iter() {
            sandboxes.insert(e.ifname.clone(), chain_name(id));
            if e.policy.has_domains() {
                proxied.push(e.address.to_string());
            }
        }
        proxied.sort();
        RulesSummary {
            chains,
            sandboxes,
            proxied,
        }
    }

    /// Replaces the table with the base rules plus `kept` sandboxes' rules (start-up, after
    /// reconcile): anything a crashed server left behind goes. Then checks what the kernel holds.
    pub fn install(&self, kept: Vec<(String, Ipv4Addr, CompiledPolicy)>) -> Result<(), NetError> {
        burrow_linux::net::write_sysctl("net.ipv4.ip_forward", "1")
            .map_err(NetError::Forwarding)?;
        {
            let mut installed = self.lock();
            installed.clear();
            for (id, address, policy) in kept {
                installed.insert(
                    id.clone(),
                    Entry {
                        ifname: Self::ifname(&id),
                        address,
                        policy,
                    },
                );
            }
        }
        // `add` then `delete` makes the delete succeed whether or not the table existed; the
        // whole file is one transaction, so there is no moment without rules.
        let script = format!(
            "add table inet {TABLE}\ndelete table inet {TABLE}\n{}",
            self.render()
        );
        nft(&script)?;
        self.check()
    }

    /// burrow's table as `nft -f` input, the summary it expects and the kernel's, all taken while no
    /// sandbox's rules change.
    pub fn snapshot(&self) -> Result<(String, RulesSummary, RulesSummary), NetError> {
        let installed = self.lock();
        let actual = actual()?;
        Ok((
            self.render_with(&installed),
            self.expected_with(&installed),
            actual,
        ))
    }

    /// Compares the kernel's table with what burrow installed.
    pub fn check(&self) -> Result<(), NetError> {
        let (want, have) = (self.expected(), actual()?);
        if want != have {
            return Err(NetError::Drift(format!(
                "expected {}, found {}",
                serde_json::to_string(&want).unwrap_or_default(),
                serde_json::to_string(&have).unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Installs (or replaces) one sandbox's rules in one transaction.
    pub fn attach(
        &self,
        id: &str,
        address: Ipv4Addr,
        policy: CompiledPolicy,
    ) -> Result<(), NetError> {
        let mut installed = self.lock();
        let entry = Entry {
            ifname: Self::ifname(id),
            address,
            policy,
        };
        let chain = chain_name(id);
        let mut script = String::new();
        let old = installed.get(id).cloned();
        if let Some(old) = &old {
            // Same chain, new rules; the map element stays.
            script.push_str(&format!("flush chain inet {TABLE} {chain}\n"));
            if old.policy.has_domains() && !entry.policy.has_domains() {
                script.push_str(&format!(
                    "delete element inet {TABLE} proxied {{ {} }}\n",
                    old.address
                ));
            }
        } else {
            script.push_str(&format!("add chain inet {TABLE} {chain}\n"));
        }
        for rule in self.sandbox_rules(&entry) {
            script.push_str(&format!("add rule inet {TABLE} {chain} {rule}\n"));
        }
        if old.is_none() {
            script.push_str(&format!(
                "add element inet {TABLE} sandboxes {{ \"{}\" : jump {chain} }}\n",
                entry.ifname
            ));
        }
        if entry.policy.has_domains() && !old.is_some_and(|o| o.policy.has_domains()) {
            script.push_str(&format!(
                "add element inet {TABLE} proxied {{ {} }}\n",
                entry.address
            ));
        }
        nft(&script)?;
        installed.insert(id.to_string(), entry);
        Ok(())
    }

    /// Removes one sandbox's rules. Idempotent.
    pub fn detach(&self, id: &str) -> Result<(), NetError> {
        let mut installed = self.lock();
        let Some(e) = installed.get(id).cloned() else {
            return Ok(());
        };
        let chain = chain_name(id);
        let mut script = format!(
            "delete element inet {TABLE} sandboxes {{ \"{}\" }}\n",
            e.ifname
        );
        if e.policy.has_domains() {
            script.push_str(&format!(
                "delete element inet {TABLE} proxied {{ {} }}\n",
                e.address
            ));
        }
        script.push_str(&format!(
            "flush chain inet {TABLE} {chain}\ndelete chain inet {TABLE} {chain}\n"
        ));
        nft(&script)?;
        installed.remove(id);
        Ok(())
    }

    /// The installed sandbox with this address, for the egress proxy.
    pub fn sandbox_at(&self, addr: Ipv4Addr) -> Option<(String, CompiledPolicy)> {
        self.lock()
            .iter()
            .find(|(_, e)| e.address == addr)
            .map(|(id, e)| (id.clone(), e.policy.clone()))
    }
}

/// Rules per chain of a rendered table: every line of a `chain` block but its `type` line.
fn chain_rule_counts(script: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in script.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            counts.insert(name.to_string(), 0);
            current = Some(name.to_string());
        } else if line == "}" {
            current = None;
        } else if let Some(c) = &current {
            if !line.starts_with("type ") && !line.is_empty() {
                *counts.entry(c.clone()).or_insert(0) += 1;
            }
        }
    }
    counts
}

fn nft(script: &str) -> Result<(), NetError> {
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NetError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NetError::Spawn)?;
    if !out.status.success() {
        return Err(NetError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Reads burrow's table back from the kernel (`nft -j list table inet burrow`).
pub fn actual() -> Result<RulesSummary, NetError> {
    let out = Command::new(NFT)
        .args(["-j", "list", "table", "inet", TABLE])
        .stderr(Stdio::piped())
        .output()
        .map_err(NetError::Spawn)?;
    if !out.status.success() {
        return Err(NetError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| NetError::Nft(format!("unreadable nft -j output: {e}")))?;
    Ok(summarize(&v))
}

/// The [`RulesSummary`] of an `nft -j` listing.
pub fn summarize(v: &serde_json::Value) -> RulesSummary {
    let mut s = RulesSummary::default();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in &items {
        if let Some(c) = item.get("chain") {
            if let Some(name) = c["name"].as_str() {
                s.chains.entry(name.to_string()).or_insert(0);
            }
        } else if let Some(r) = item.get("rule") {
            if let Some(chain) = r["chain"].as_str() {
                *s.chains.entry(chain.to_string()).or_insert(0) += 1;
            }
        } else if let Some(m) = item.get("map") {
            for el in m["elem"].as_array().into_iter().flatten() {
                if let (Some(k), Some(t)) = (el[0].as_str(), el[1]["jump"]["target"].as_str()) {
                    s.sandboxes.insert(k.to_string(), t.to_string());
                }
            }
        } else if let Some(st) = item.get("set") {
            for el in st["elem"].as_array().into_iter().flatten() {
                if let Some(a) = el.as_str() {
                    s.proxied.push(a.to_string());
                }
            }
        }
    }
    s.proxied.sort();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use burrow_types::NetworkPolicy;

    fn net() -> Network {
        Network::new(NetConfig {
            range: Cidr::parse("10.200.0.0/16").unwrap(),
            resolvers: vec!["203.0.113.53".parse().unwrap()],
            conn_limit: 64,
            proxy_port: 15001,
        })
    }

    #[test]
    fn addresses_come_from_the_range_and_run_out_cleanly() {
        let n = net();
        assert_eq!(n.gateway(), "10.200.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(n.address_of(0).unwrap().to_string(), "10.200.0.2");
        assert_eq!(n.address_of(300).unwrap().to_string(), "10.200.1.46");
        assert!(n.address_of(65532).is_ok());
        assert!(n.address_of(65533).is_err());
        assert_eq!(Network::ifname("abcdefghijklmnopqrst"), "bwabcdefghijklm");
    }

    #[test]
    fn rules_follow_the_policy_order() {
        let n = net();
        let p = CompiledPolicy::compile(&NetworkPolicy {
            internet: false,
            allow_out: vec!["198.51.100.0/24".into(), "ok.test".into()],
            deny_out: vec!["203.0.113.7".into()],
        })
        .unwrap();
        let e = Entry {
            ifname: "bwx".into(),
            address: "10.200.0.2".parse().unwrap(),
            policy: p,
        };
        let r = n.sandbox_rules(&e);
        let pos = |needle: &str| r.iter().position(|l| l.contains(needle)).unwrap();
        assert!(pos("169.254.0.0/16") < pos("203.0.113.7"));
        assert!(pos("203.0.113.7") < pos("th dport 53"));
        assert!(pos("th dport 53") < pos("tcp dport { 80, 443 }"));
        assert!(pos("198.51.100.0/24") < pos("10.0.0.0/8"));
        assert_eq!(r.last().unwrap(), "drop");
    }

    #[test]
    fn without_internet_or_allowed_names_dns_is_closed_too() {
        let n = net();
        let rules = |internet: bool, allow: &[&str]| {
            let p = CompiledPolicy::compile(&NetworkPolicy {
                internet,
                allow_out: allow.iter().map(|a| a.to_string()).collect(),
                deny_out: Vec::new(),
            })
            .unwrap();
            n.sandbox_rules(&Entry {
                ifname: "bwx".into(),
                address: "10.200.0.2".parse().unwrap(),
                policy: p,
            })
        };
        let dns = |r: Vec<String>| r.iter().any(|l| l.contains("th dport 53"));
        assert!(dns(rules(true, &[])));
        assert!(dns(rules(false, &["ok.test"])));
        assert!(!dns(rules(false, &[])));
        assert!(!dns(rules(false, &["198.51.100.0/24"])));
    }

    #[test]
    fn expected_rule_counts_follow_the_rendered_table() {
        let n = net();
        let s = n.expected();
        assert_eq!(s.chains["sandbox_pre"], 5);
        assert_eq!(s.chains["input"], 5);
        assert_eq!(s.chains["forward"], 3);
        assert_eq!(s.chains["nat_pre"], 1);
    }

    #[test]
    fn summaries_read_nft_json() {
        let v = serde_json::json!({"nftables": [
            {"metainfo": {}},
            {"map": {"name": "sandboxes", "elem": [["bwa", {"jump": {"target": "sb_a"}}]]}},
            {"set": {"name": "proxied", "elem": ["10.200.0.2"]}},
            {"chain": {"name": "sb_a"}},
            {"chain": {"name": "input"}},
            {"rule": {"chain": "sb_a"}},
            {"rule": {"chain": "sb_a"}}
        ]});
        let s = summarize(&v);
        assert_eq!(s.chains["sb_a"], 2);
        assert_eq!(s.chains["input"], 0);
        assert_eq!(s.sandboxes["bwa"], "sb_a");
        assert_eq!(s.proxied, vec!["10.200.0.2".to_string()]);
    }
}
