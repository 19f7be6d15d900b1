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
//!
//! Paths, pairs and the mirroring layer of the write path build on these;
//! so far the protocol, the authenticated link and the secondary's
//! change application exist.

pub mod link;
pub mod paths;
pub mod secondary;
pub mod wire;
