//! Volumes.
pub mod id;
