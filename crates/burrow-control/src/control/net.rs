//! The control layer's half of sandbox networking: egress policies (checked, stored, pushed to the
//! firewall), exposed ports, and the per-sandbox tokens that open them. The host half (veth, nft)
//! is `burrow_node::network`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use burrow_node::network::{NetError, Network, RulesSummary};
use burrow_node::SandboxSpec;
use burrow_store::{SandboxRecord, StoreError, User};
use burrow_types::net::CompiledPolicy;
use burrow_types::{NetworkPolicy, PortInfo, Sandbox, SandboxNetwork, SandboxState};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{to_api, Control, ControlError};

/// Longest life of a signed port URL.
pub const MAX_SIGNED_TTL_S: u64 = 7 * 24 * 3600;

/// What the store keeps in a sandbox's `network` column.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredNet {
    pub policy: NetworkPolicy,
    #[serde(default)]
    pub public_ports: Vec<u16>,
}

/// A sandbox's port as the proxy sees it before deciding access: its owner and whether the
/// port is public. Nothing about it is acted on until the caller is authorised.
#[derive(Debug, Clone)]
pub struct PortTarget {
    pub sandbox_id: String,
    pub owner_id: String,
    pub port: u16,
    pub public: bool,
    state: SandboxState,
    uid_slot: u32,
    networked: bool,
}

fn stored(rec: &SandboxRecord) -> Option<StoredNet> {
    rec.network
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

pub fn compile(p: &NetworkPolicy) -> Result<CompiledPolicy, ControlError> {
    CompiledPolicy::compile(p).map_err(ControlError::BadRequest)
}

fn valid_port(port: u32) -> Result<u16, ControlError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ControlError::BadRequest(format!("port {port} is out of range (1-65535)")))
}

impl Control {
    pub fn with_network(mut self, network: Arc<Network>) -> Control {
        self.network = Some(network);
        self
    }

    /// Key of the HMACs behind sandbox access tokens and signed port URLs.
    pub fn with_secret(mut self, secret: Vec<u8>) -> Control {
        self.secret = secret;
        self
    }

    /// Ports are reachable at `<port>-<id>.<domain>`.
    pub fn with_domain(mut self, domain: Option<String>) -> Control {
        self.domain = domain;
        self
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    pub fn network(&self) -> Option<&Arc<Network>> {
        self.network.as_ref()
    }

    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    fn mac(&self, what: &str) -> String {
        hmac_hex(&self.secret, what)
    }

    /// The sandbox's access token: an HMAC of its id, so it is never stored and works for that
    /// sandbox alone (docs/adr/0012).
    pub fn access_token(&self, id: &str) -> String {
        access_token_with(&self.secret, id)
    }

    pub fn port_signature(&self, id: &str, port: u16, expires: u64) -> String {
        self.mac(&format!("port:{id}:{port}:{expires}"))
    }

    /// Constant-time comparison of a presented token with the expected one.
    pub fn token_matches(expected: &str, presented: &str) -> bool {
        let (a, b) = (expected.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The API view of a record, with its address, policy and (for its owner) access token.
    pub fn api(&self, rec: &SandboxRecord) -> Sandbox {
        let mut s = to_api(rec);
        if let (Some(net), Some(n)) = (stored(rec), self.network.as_ref()) {
            s.network = Some(SandboxNetwork {
                address: n
                    .address_of(rec.uid_slot)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                policy: net.policy,
                public_ports: net.public_ports,
            });
        }
        s.access_token = Some(self.access_token(&rec.id));
        s.platform = self.backend.platform(&rec.id);
        if rec.state == SandboxState::Hibernated {
            let hot = self.backend.checkpointed(&rec.id);
            s.resume_from = Some(if hot { "checkpoint" } else { "cold" }.into());
        }
        s
    }

    /// The `network` column of a new sandbox: its checked policy, when the server has networking.
    pub(super) fn network_for_create(
        &self,
        policy: Option<NetworkPolicy>,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        if self.network.is_none() {
            return match policy {
                Some(_) => Err(ControlError::NoNetwork),
                None => Ok(None),
            };
        }
        let policy = policy.unwrap_or_default();
        compile(&policy)?;
        let net = StoredNet {
            policy,
            public_ports: Vec::new(),
        };
        Ok(Some(serde_json::to_value(net).map_err(StoreError::from)?))
    }

    /// A warm sandbox's network until it is claimed: wired, but no egress at all.
    pub(crate) fn warm_network(&self) -> Option<serde_json::Value> {
        self.network.as_ref()?;
        let net = StoredNet {
            policy: NetworkPolicy {
                internet: false,
                ..Default::default()
            },
            public_ports: Vec::new(),
        };
        serde_json::to_value(net).ok()
    }

    /// A claimed warm sandbox gets the creator's policy (checked by `network_for_create`).
    pub(super) async fn claim_network(
        &self,
        rec: &mut SandboxRecord,
        network: Option<serde_json::Value>,
    ) -> Result<(), ControlError> {
        let Some(value) = network else {
            return Ok(());
        };
        self.store.set_network(&rec.id, &value).await?;
        rec.network = Some(value);
        if let Err(e) = self.attach_net(rec) {
            self.fail_after_build(rec, &e).await;
            return Err(e);
        }
        Ok(())
    }

    /// The spec with the network `__init` must wire.
    pub(super) fn with_net(
        &self,
        mut spec: SandboxSpec,
        rec: &SandboxRecord,
    ) -> Result<SandboxSpec, ControlError> {
        if let (Some(n), Some(_)) = (&self.network, &rec.network) {
            spec.net = Some(
                n.spec(&rec.id, rec.uid_slot)
                    .map_err(ControlError::Network)?,
            );
        }
        Ok(spec)
    }

    /// Installs the firewall rules of a sandbox whose computer now runs.
    pub(super) fn attach_net(&self, rec: &SandboxRecord) -> Result<(), ControlError> {
        let (Some(n), Some(net)) = (&self.network, stored(rec)) else {
            return Ok(());
        };
        let addr = n.address_of(rec.uid_slot)?;
        n.attach(&rec.id, addr, compile(&net.policy)?)?;
        Ok(())
    }

    /// Removes a sandbox's firewall rules (its veth, address and route went with its namespace).
    pub(super) fn detach_net(&self, id: &str) -> Result<(), ControlError> {
        if let Some(n) = &self.network {
            n.detach(id)?;
        }
        Ok(())
    }

    /// Start-up: the table is rebuilt with the rules of the sandboxes that still run, which
    /// removes whatever a crashed server left; then it is read back and compared.
    pub(super) async fn install_firewall(&self) -> Result<(), ControlError> {
        let Some(n) = &self.network else {
            return Ok(());
        };
        let mut kept = Vec::new();
        for rec in self.store.live_sandboxes().await? {
            if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
                continue;
            }
            if let Some(net) = stored(&rec) {
                kept.push((
                    rec.id.clone(),
                    n.address_of(rec.uid_slot)?,
                    compile(&net.policy)?,
                ));
            }
        }
        n.install(kept)?;
        Ok(())
    }

    /// Replaces a sandbox's egress policy; a running or paused sandbox gets it at once (new
    /// connections follow it; open ones are kept).
    pub async fn set_network(
        &self,
        user: &User,
        id: &str,
        policy: NetworkPolicy,
    ) -> Result<Sandbox, ControlError> {
        let compiled = compile(&policy)?;
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id).await?;
        let Some(mut net) = stored(&rec) else {
            return Err(ControlError::NoNetwork);
        };
        net.policy = policy;
        let value = serde_json::to_value(&net).map_err(StoreError::from)?;
        self.store.set_network(id, &value).await?;
        rec.network = Some(value);
        if matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            if let Some(n) = &self.network {
                n.attach(id, n.address_of(rec.uid_slot)?, compiled)?;
            }
        }
        Ok(self.api(&rec))
    }

    /// Makes a port public (reachable through the proxy without a token) or private again.
    pub async fn set_port_public(
        &self,
        user: &User,
        id: &str,
        port: u32,
        public: bool,
    ) -> Result<(SandboxRecord, u16), ControlError> {
        let port = valid_port(port)?;
        let lock = self.locks.get(id);
        let _guard = lock.lock().await;
        let mut rec = self.record(user, id).await?;
        let Some(mut net) = stored(&rec) else {
            return Err(ControlError::NoNetwork);
        };
        net.public_ports.retain(|p| *p != port);
        if public {
            net.public_ports.push(port);
            net.public_ports.sort_unstable();
        }
        let value = serde_json::to_value(&net).map_err(StoreError::from)?;
        self.store.set_network(id, &value).await?;
        rec.network = Some(value);
        Ok((rec, port))
    }

    /// A port's URLs. `base` is the server's own URL as the client reached it.
    pub fn port_info(
        &self,
        rec: &SandboxRecord,
        port: u16,
        base: &str,
        signed_ttl_s: Option<u64>,
    ) -> Result<PortInfo, ControlError> {
        let net = stored(rec).ok_or(ControlError::NoNetwork)?;
        let path_url = format!("{base}/v1/sandboxes/{}/ports/{port}/", rec.id);
        let (signed_url, expires_at) = match signed_ttl_s {
            Some(ttl) if ttl == 0 || ttl > MAX_SIGNED_TTL_S => {
                return Err(ControlError::BadRequest(format!(
                    "signed_ttl_s must be 1-{MAX_SIGNED_TTL_S}"
                )))
            }
            Some(ttl) => {
                let exp = burrow_store::now_unix().max(0) as u64 + ttl;
                let sig = self.port_signature(&rec.id, port, exp);
                (
                    Some(format!("{path_url}?burrow_exp={exp}&burrow_sig={sig}")),
                    Some(exp),
                )
            }
            None => (None, None),
        };
        Ok(PortInfo {
            port,
            url: self
                .domain
                .as_ref()
                .map(|d| format!("http://{port}-{}.{d}/", rec.id)),
            path_url,
            public: net.public_ports.contains(&port),
            signed_url,
            expires_at,
        })
    }

    pub async fn port_info_for(
        &self,
        user: &User,
        id: &str,
        port: u32,
        base: &str,
        signed_ttl_s: Option<u64>,
    ) -> Result<PortInfo, ControlError> {
        let port = valid_port(port)?;
        let rec = self.record(user, id).await?;
        self.port_info(&rec, port, base, signed_ttl_s)
    }

    /// The live sandbox behind `id:port`, for the proxy to authorise against. Touches nothing
    /// (not the idle clock) and answers the same `None` for a missing and a destroyed id.
    pub async fn port_lookup(
        &self,
        id: &str,
        port: u16,
    ) -> Result<Option<PortTarget>, ControlError> {
        let rec = match self.store.sandbox(id).await? {
            Some(r) if r.state != SandboxState::Destroyed => r,
            _ => return Ok(None),
        };
        let net = stored(&rec);
        Ok(Some(PortTarget {
            sandbox_id: rec.id.clone(),
            owner_id: rec.owner_id.clone(),
            port,
            public: net.as_ref().is_some_and(|n| n.public_ports.contains(&port)),
            state: rec.state,
            uid_slot: rec.uid_slot,
            networked: net.is_some(),
        }))
    }

    /// Where an authorised proxy request goes: the sandbox must run and have a network. Counts
    /// as activity for its idle timeout. Call only after the caller was authorised.
    pub fn port_target(&self, found: Option<PortTarget>) -> Result<SocketAddrV4, ControlError> {
        let t = found.ok_or(ControlError::NotFound)?;
        let n = self.network.as_ref().ok_or(ControlError::NoNetwork)?;
        if !t.networked {
            return Err(ControlError::NoNetwork);
        }
        if t.state != SandboxState::Running {
            return Err(ControlError::NotRunning(t.state.as_str()));
        }
        self.touch(&t.sandbox_id);
        Ok(SocketAddrV4::new(n.address_of(t.uid_slot)?, t.port))
    }

    /// The firewall as burrow installed it and as the kernel holds it.
    pub fn firewall_rules(&self) -> Result<(String, RulesSummary, RulesSummary), ControlError> {
        let n = self.network.as_ref().ok_or(ControlError::NoNetwork)?;
        Ok(n.snapshot()?)
    }

    /// The sandbox (and its policy) behind a source address, for the egress proxy.
    pub fn sandbox_at(&self, addr: Ipv4Addr) -> Option<(String, CompiledPolicy)> {
        self.network.as_ref()?.sandbox_at(addr)
    }
}

impl From<NetError> for ControlError {
    fn from(e: NetError) -> Self {
        ControlError::Network(e)
    }
}

/// Hex HMAC-SHA256 of `what` under `secret`.
pub fn hmac_hex(secret: &[u8], what: &str) -> String {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(what.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// A sandbox's access token under the server's secret (also the E2B facade's envd token).
pub fn access_token_with(secret: &[u8], id: &str) -> String {
    format!("bst_{}", hmac_hex(secret, &format!("sandbox-access:{id}")))
}
