//! A node's isolation tiers behind one [`Backend`]: the namespace backend always, the gVisor one
//! when this host can run it. A create goes to the tier its spec asks for (`limits.isolation`);
//! every later call on a sandbox goes to the tier that built it, which its directory says (the
//! gVisor backend marks its sandboxes' directories before anything else).

use std::path::PathBuf;

use burrow_types::{Isolation, Limits};

use crate::backend::{Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};
use crate::gvisor::GvisorBackend;
use crate::namespace::NamespaceBackend;

pub struct Tiers {
    data_dir: PathBuf,
    native: NamespaceBackend,
    gvisor: Result<GvisorBackend, String>,
}

impl Tiers {
    /// `gvisor` is the gVisor backend, or why this node has none (said in a create that asks
    /// for it).
    pub fn new(
        data_dir: PathBuf,
        native: NamespaceBackend,
        gvisor: Result<GvisorBackend, String>,
    ) -> Tiers {
        Tiers {
            data_dir,
            native,
            gvisor,
        }
    }

    /// Why the node offers no gVisor tier, if it does not.
    pub fn gvisor_unavailable(&self) -> Option<&str> {
        self.gvisor.as_ref().err().map(String::as_str)
    }

    fn gvisor(&self) -> Result<&GvisorBackend, NodeError> {
        self.gvisor
            .as_ref()
            .map_err(|why| NodeError::Setup(format!("this node has no gVisor tier: {why}")))
    }

    /// The tier that built sandbox `id`. A gVisor sandbox on a node that lost its `runsc` is
    /// still stopped and destroyed through its cgroups by the namespace backend.
    fn of(&self, id: &str) -> &dyn Backend {
        match &self.gvisor {
            Ok(g) if GvisorBackend::owns(&self.data_dir, id) => g,
            _ => &self.native,
        }
    }

    fn for_spec(&self, spec: &SandboxSpec) -> Result<&dyn Backend, NodeError> {
        Ok(match spec.limits.isolation {
            Isolation::Native => &self.native,
            Isolation::Gvisor => self.gvisor()?,
        })
    }
}

impl Backend for Tiers {
    fn name(&self) -> &'static str {
        if self.gvisor.is_ok() {
            "namespace+gvisor"
        } else {
            "namespace"
        }
    }

    fn offers(&self, isolation: Isolation) -> bool {
        match isolation {
            Isolation::Native => true,
            Isolation::Gvisor => self.gvisor.is_ok(),
        }
    }

    fn platform(&self, id: &str) -> Option<String> {
        self.of(id).platform(id)
    }

    fn checkpointed(&self, id: &str) -> bool {
        self.of(id).checkpointed(id)
    }

    fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        self.for_spec(spec)?.create(spec)
    }

    fn start(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        self.for_spec(spec)?.start(spec)
    }

    fn destroy(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        self.of(id).destroy(id, info)
    }

    fn stop(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        self.of(id).stop(id, info)
    }

    fn probe(&self, id: &str, info: &RuntimeInfo) -> Liveness {
        self.of(id).probe(id, info)
    }

    fn pause(&self, id: &str) -> Result<(), NodeError> {
        self.of(id).pause(id)
    }

    fn resume(&self, id: &str) -> Result<(), NodeError> {
        self.of(id).resume(id)
    }

    fn frozen(&self, id: &str) -> Option<bool> {
        self.of(id).frozen(id)
    }

    fn active(&self, id: &str) -> bool {
        self.of(id).active(id)
    }

    /// Both tiers keep their disks the same way: one pass finds them all.
    fn disks_in_use(&self) -> Vec<String> {
        self.native.disks_in_use()
    }

    fn set_limits(&self, id: &str, limits: &Limits) -> Result<(), NodeError> {
        self.of(id).set_limits(id, limits)
    }

    fn set_hostname(&self, id: &str, info: &RuntimeInfo, hostname: &str) -> Result<(), NodeError> {
        self.of(id).set_hostname(id, info, hostname)
    }

    /// Every sandbox directory, whichever tier made it.
    fn host_sandboxes(&self) -> Result<Vec<String>, NodeError> {
        self.native.host_sandboxes()
    }

    fn memory_usage(&self, id: &str) -> Option<u64> {
        self.of(id).memory_usage(id)
    }

    fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        self.of(id).cpu_usage_ns(id)
    }
}
