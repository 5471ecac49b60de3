//! Networking in the CLI: `burrow up` options, `create --no-internet --allow-out --deny-out`,
//! `burrow net ID ...` and `burrow port ID PORT`.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use burrow_node::network::NetConfig;
use burrow_types::net::Cidr;
use burrow_types::{NetworkPatch, NetworkPolicy};
use clap::Args;

use crate::config;

#[derive(Args)]
pub struct NetArgs {
    /// Give sandboxes a network: a veth each, NAT egress, burrow's nftables table.
    #[arg(long, env = "BURROW_NETWORK")]
    network: bool,
    /// Sandbox addresses (the second is the gateway on the host side of every veth).
    #[arg(long, env = "BURROW_NET_RANGE", default_value = "10.200.0.0/16")]
    net_range: String,
    /// Name server for sandboxes (repeatable); default: the host's non-loopback ones.
    #[arg(long = "dns", env = "BURROW_DNS", value_delimiter = ',')]
    dns: Vec<Ipv4Addr>,
    /// New connections a sandbox may have open at once.
    #[arg(long, env = "BURROW_NET_CONN_LIMIT", default_value_t = 512)]
    net_conn_limit: u32,
    /// Port of the transparent egress proxy (domain rules), on the sandboxes' gateway.
    #[arg(long, env = "BURROW_EGRESS_PROXY_PORT", default_value_t = 15001)]
    egress_proxy_port: u16,
    /// Domain of port URLs: `<port>-<id>.<domain>` (needs wildcard DNS to this server).
    #[arg(long, env = "BURROW_DOMAIN")]
    pub domain: Option<String>,
}

/// Non-loopback name servers of the host's `/etc/resolv.conf`.
fn host_resolvers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

impl NetArgs {
    pub fn config(&self) -> Result<Option<NetConfig>> {
        if !self.network {
            return Ok(None);
        }
        let range = Cidr::parse(&self.net_range)
            .map_err(anyhow::Error::msg)
            .context("--net-range")?;
        if range.prefix > 28 {
            bail!("--net-range {range} is too small (a /28 or larger)");
        }
        let resolvers = if self.dns.is_empty() {
            host_resolvers()
        } else {
            self.dns.clone()
        };
        if resolvers.is_empty() {
            eprintln!(
                "warning: no name server for sandboxes (the host's are loopback only); pass --dns"
            );
        }
        if self.net_conn_limit == 0 {
            bail!("--net-conn-limit must be positive");
        }
        Ok(Some(NetConfig {
            range,
            resolvers,
            conn_limit: self.net_conn_limit,
            proxy_port: self.egress_proxy_port,
        }))
    }
}

#[derive(Args)]
pub struct CreateNetArgs {
    /// Only what `--allow-out` names is reachable.
    #[arg(long)]
    no_internet: bool,
    /// CIDR or domain name to allow (repeatable; wins over the private-range block).
    #[arg(long = "allow-out")]
    allow_out: Vec<String>,
    /// CIDR or domain name to block (repeatable; wins over everything but the built-in blocks).
    #[arg(long = "deny-out")]
    deny_out: Vec<String>,
}

impl CreateNetArgs {
    pub fn policy(&self) -> Option<NetworkPolicy> {
        if !self.no_internet && self.allow_out.is_empty() && self.deny_out.is_empty() {
            return None;
        }
        Some(NetworkPolicy {
            internet: !self.no_internet,
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        })
    }
}

#[derive(Args)]
pub struct NetCmd {
    /// Sandbox id, or `rules` for burrow's firewall.
    id: String,
    /// `on` or `off`.
    #[arg(long, value_parser = ["on", "off"])]
    internet: Option<String>,
    /// Replaces the allow list (repeatable).
    #[arg(long = "allow-out")]
    allow_out: Vec<String>,
    /// Replaces the deny list (repeatable).
    #[arg(long = "deny-out")]
    deny_out: Vec<String>,
    /// Empties the allow list.
    #[arg(long, conflicts_with = "allow_out")]
    clear_allow: bool,
    /// Empties the deny list.
    #[arg(long, conflicts_with = "deny_out")]
    clear_deny: bool,
}

pub async fn run_net(cmd: NetCmd, json: bool) -> Result<i32> {
    let client = config::client()?;
    if cmd.id == "rules" {
        let v = client.firewall().await?;
        if json {
            crate::print_json(&v)?;
        } else {
            print!("{}", v["rules"].as_str().unwrap_or_default());
            let sync = v["in_sync"].as_bool().unwrap_or(false);
            eprintln!(
                "# the kernel's table {} what burrow installed",
                if sync { "matches" } else { "DIFFERS FROM" }
            );
            return Ok(i32::from(!sync));
        }
        return Ok(0);
    }
    let list = |v: &Vec<String>, clear: bool| (clear || !v.is_empty()).then(|| v.clone());
    let patch = NetworkPatch {
        internet: cmd.internet.as_deref().map(|v| v == "on"),
        allow_out: list(&cmd.allow_out, cmd.clear_allow),
        deny_out: list(&cmd.deny_out, cmd.clear_deny),
    };
    let changes = patch.internet.is_some() || patch.allow_out.is_some() || patch.deny_out.is_some();
    let sb = if changes {
        client.patch_network(&cmd.id, &patch).await?
    } else {
        client.get(&cmd.id).await?
    };
    let Some(net) = sb.network else {
        bail!("sandbox {} has no network", sb.id);
    };
    if json {
        crate::print_json(&net)?;
    } else {
        println!("address    {}", net.address);
        println!(
            "internet   {}",
            if net.policy.internet { "on" } else { "off" }
        );
        println!("allow_out  {}", net.policy.allow_out.join(" "));
        println!("deny_out   {}", net.policy.deny_out.join(" "));
        let ports: Vec<String> = net.public_ports.iter().map(|p| p.to_string()).collect();
        println!("public     {}", ports.join(" "));
    }
    Ok(0)
}

#[derive(Args)]
pub struct PortCmd {
    id: String,
    port: u16,
    /// Reachable without a token from now on.
    #[arg(long, conflicts_with = "private")]
    public: bool,
    /// Needs a token again.
    #[arg(long)]
    private: bool,
    /// Print a signed URL valid this many seconds.
    #[arg(long)]
    signed: Option<u64>,
}

pub async fn run_port(cmd: PortCmd, json: bool) -> Result<i32> {
    let client = config::client()?;
    if cmd.public || cmd.private {
        client
            .set_port_public(&cmd.id, cmd.port, cmd.public)
            .await?;
    }
    let info = client.port(&cmd.id, cmd.port, cmd.signed).await?;
    if json {
        crate::print_json(&info)?;
    } else if let Some(signed) = &info.signed_url {
        println!("{signed}");
    } else {
        println!("{}", info.url.as_ref().unwrap_or(&info.path_url));
    }
    Ok(0)
}
