//! Client side of the guest protocol (see burrow-proto).
