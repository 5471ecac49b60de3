//! burrow's control layer: what a request may do and in what order. Transports (the REST API, the
//! E2B facade) turn requests into calls on [`control::Control`]; it checks them against plans and
//! quotas, writes the store before touching a host, and drives the node's backend.
//!
//! It owns no HTTP server types and makes no syscalls of its own beyond reading host numbers
//! (free space, pid limits): sandboxes are built and run by `burrow-node`. Its store is the
//! `burrow_store::Store` trait, reached through `AsyncStore` (docs/adr/0055).

pub mod auth;
pub mod callback;
pub mod control;
pub mod pool;

pub use control::{Control, ControlError};
