//! The namespace backend.
