//! PPRC: synchronous mirroring of volumes to a peer storage server.
//!
//! * [`wire`] — the framed binary peer protocol: versioned hello with
//!   serials and authentication proofs, request IDs, pipelined writes,
//!   acknowledgements, flush barriers, bitmap exchange, state changes and
//!   heartbeats. Every frame is length-checked before it is decoded.
//! * [`link`] — opening a link: hello exchange and mutual authentication
//!   with the shared secret.
//!
//! Paths, pairs and the mirroring layer of the write path build on these;
//! so far only the protocol and the link handshake exist.

pub mod link;
pub mod wire;
