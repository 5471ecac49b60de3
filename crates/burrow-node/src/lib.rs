//! The node: builds, finds and tears down sandboxes (through a [`backend::Backend`]) and talks to
//! their guest agents (through [`guest::GuestClient`]).

pub mod backend;
pub mod guest;
pub mod gvisor;
pub mod namespace;
pub mod network;
pub mod storage;
pub mod tiers;
pub mod timing;

pub use backend::{etc_hosts, Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec, VolumeSpace};

/// The guest agent as a static executable (no `PT_INTERP`: it needs no dynamic loader, so it runs
/// as PID 1 in any image), built by `build.rs` and carried inside this crate's users.
pub static STATIC_GUEST: &[u8] = include_bytes!(env!("BURROW_STATIC_GUEST"));
