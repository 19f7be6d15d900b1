//! Fuzzes the PPRC link handshake: arbitrary bytes from an unauthenticated
//! peer, both as the accepting side (any peer) and as the connecting side
//! (one expected peer). Must end with an error, never panic or hang.
#![no_main]

use std::time::Duration;

use bytes::BytesMut;
use essd::copy::pprc::link::handshake;
use essd::volume::id::Serial;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let local = Serial::new("FCA31").expect("serial");
    let expected = Serial::new("FCB02").expect("serial");
    let secret = [7u8; 32];
    runtime.block_on(async {
        for expect in [None, Some(&expected)] {
            let (mut peer, mut ours) = tokio::io::duplex(1 << 16);
            peer.write_all(data).await.ok();
            peer.shutdown().await.ok();
            let mut buf = BytesMut::new();
            let _ = handshake(
                &mut ours,
                &mut buf,
                &local,
                expect,
                &secret,
                Duration::from_secs(1),
            )
            .await;
        }
    });
});
