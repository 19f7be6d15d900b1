//! The NBD protocol: wire format ([`proto`]), negotiation ([`handshake`]),
//! the transmission phase ([`transmission`]) and listeners ([`listener`]).
//!
//! Internal errors become NBD error numbers in one place, [`nbd_errno`].

pub mod handshake;
pub mod listener;
pub mod proto;
pub mod transmission;

use crate::volume::VolumeError;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Socket error (including EOF in the middle of a message).
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// Malformed message.
    #[error("protocol violation: {0}")]
    Wire(#[from] proto::WireError),
    /// Negotiation failed.
    #[error("negotiation failed: {0}")]
    Handshake(String),
    /// Transmission-phase violation that cannot be answered with an error.
    #[error("protocol violation: {0}")]
    Transmission(String),
    /// Negotiation took too long.
    #[error("negotiation timed out")]
    Timeout,
}

/// Maps a volume error to the NBD error number sent to the client.
pub fn nbd_errno(e: &VolumeError) -> u32 {
    use proto::errno;
    match e {
        VolumeError::OutOfRange { op, .. } => match op {
            crate::volume::VolumeOp::Write | crate::volume::VolumeOp::WriteZeroes => errno::ENOSPC,
            _ => errno::EINVAL,
        },
        VolumeError::ReadOnly { .. }
        | VolumeError::Secondary { .. }
        | VolumeError::NotSecondary { .. } => errno::EPERM,
        // The server's own bookkeeping failed: nothing the client can
        // change (an EPERM from the file would suggest a read-only export).
        VolumeError::WriteInhibited { .. } | VolumeError::Unrecorded { .. } => errno::EIO,
        VolumeError::NotFast { .. } => errno::ENOTSUP,
        VolumeError::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => errno::ENOSPC,
            Some(libc::ENOMEM) => errno::ENOMEM,
            Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => errno::EPERM,
            _ => errno::EIO,
        },
    }
}
