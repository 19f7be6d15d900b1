//! PPRC: synchronous mirroring of volumes to a peer storage server.
//!
//! * [`wire`] — the framed binary peer protocol: versioned hello with
//!   serials and authentication proofs, request IDs, pipelined writes,
//!   acknowledgements, flush barriers, bitmap exchange, state changes and
//!   heartbeats. Every frame is length-checked before it is decoded.
//! * [`link`] — opening a link: hello exchange and mutual authentication
//!   with the shared secret; the primary's pipelined request channel.
//! * [`secondary`] — the secondary's end: applies mirrored changes in order
//!   and acknowledges each.
//! * [`paths`] — paths from a local LSS to a peer's LSS over 1–8 monitored
//!   links.
//! * [`pair`] — a pair's primary end: the mirroring layer of the write
//!   path, the out-of-sync bitmap, initial copy and resync.
//! * [`group`] — the consistency group: held writes and freeze.
//! * [`manager`] — every pair of the server, both roles: establish,
//!   suspend, terminate, failover, failback, the record in the state
//!   directory, and the answers to the peers' pair requests.

pub mod group;
pub mod link;
pub mod manager;
pub mod pair;
pub mod paths;
pub mod secondary;
pub mod wire;
