//! PPRC: synchronous mirroring of volumes to a peer storage server.
//!
//! * [`wire`] — the framed binary peer protocol: versioned hello with
//!   serials and authentication proofs, request IDs, pipelined writes,
//!   acknowledgements, flush barriers, bitmap exchange, state changes and
//!   heartbeats. Every frame is length-checked before it is decoded.
//!
//! Paths, pairs and the mirroring layer of the write path build on this
//! format; so far only the format itself exists.

pub mod wire;
