//! essd: a Linux storage server that exports volumes over NBD and gives them
//! the Copy Services of an enterprise disk array.
//!
//! Layers, top to bottom (each ignorant of the ones above):
//!
//! ```text
//! nbd        wire format, handshake, transmission phase, listeners
//! volume     servers, LSSs, volumes and IDs, backing stores, the access gate
//! io         the I/O engine: io_uring (hot path) and a thread-pool fallback
//! ```
//!
//! [`copy`] holds the Copy Services a volume routes its I/O through when it
//! is in a FlashCopy relationship or a PPRC pair: track bitmaps and locks,
//! relationships, the peer protocol, links, paths and pairs. It works on
//! volumes and the I/O engine, records events in the event log, and answers
//! with NBD's error numbers.
//!
//! Beside them: [`config`] (the TOML file), [`control`] (management API,
//! users, event log), [`cli`] (`essctl`), [`daemon`] (process life cycle),
//! [`pipeline`] (requests in flight on one connection), [`state`] (atomic
//! metadata files), [`scheduling`] (the threads' CPU policy) and [`units`].

pub mod cli;
pub mod config;
pub mod control;
pub mod copy;
pub mod daemon;
pub mod io;
pub mod nbd;
pub mod pipeline;
pub mod scheduling;
pub mod state;
pub mod units;
pub mod volume;
