//! Fuzzes the NBD wire decoders: request headers, the transmission-phase
//! request splitter, option headers and option payloads.
#![no_main]

use essd::nbd::{proto, transmission};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::Request::decode(data);
    let _ = proto::OptionHeader::decode(data);
    let _ = proto::decode_info_request(data);
    let _ = proto::decode_meta_request(data);
    let _ = transmission::count_complete_requests(data);
    if let Ok(r) = proto::Request::decode(data) {
        assert_eq!(proto::Request::decode(&r.encode()), Ok(r));
    }
});
