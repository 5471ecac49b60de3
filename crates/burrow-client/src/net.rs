//! Sandbox networking: egress policy, port URLs, and the firewall as the server sees it.

use burrow_types::{NetworkPatch, NetworkPolicy, PortInfo, Sandbox, SetPort};
use reqwest::Method;

use crate::{Client, ClientError};

impl Client {
    /// Replaces a sandbox's egress policy.
    pub async fn set_network(
        &self,
        id: &str,
        policy: &NetworkPolicy,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/sandboxes/{id}/network"))
                .json(policy),
        )
        .await
    }

    /// Changes parts of a sandbox's egress policy.
    pub async fn patch_network(
        &self,
        id: &str,
        patch: &NetworkPatch,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PATCH, &format!("/v1/sandboxes/{id}/network"))
                .json(patch),
        )
        .await
    }

    /// A port's URLs; with `signed_ttl_s`, also a signed URL valid that long.
    pub async fn port(
        &self,
        id: &str,
        port: u16,
        signed_ttl_s: Option<u64>,
    ) -> Result<PortInfo, ClientError> {
        let mut path = format!("/v1/sandboxes/{id}/ports/{port}");
        if let Some(t) = signed_ttl_s {
            path.push_str(&format!("?signed_ttl_s={t}"));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// Makes a port public (no token needed through the proxy) or private.
    pub async fn set_port_public(
        &self,
        id: &str,
        port: u16,
        public: bool,
    ) -> Result<PortInfo, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/sandboxes/{id}/ports/{port}"))
                .json(&SetPort { public }),
        )
        .await
    }

    /// burrow's firewall: the rules it installed and what the kernel holds (admins only).
    pub async fn firewall(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.request(Method::GET, "/v1/admin/network"))
            .await
    }
}
