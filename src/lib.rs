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
//! Beside them: [`config`] (the TOML file), [`control`] (management API,
//! users), [`cli`] (`essctl`), [`daemon`] (process life cycle) and [`units`].

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
