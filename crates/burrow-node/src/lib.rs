//! The node: builds, finds and tears down sandboxes (through a [`backend::Backend`]) and talks to
//! their guest agents (through [`guest::GuestClient`]).

pub mod backend;
pub mod guest;
pub mod gvisor;
pub mod namespace;
pub mod network;
pub mod tiers;

pub use backend::{etc_hosts, Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};
