//! Criterion benchmarks of the NBD hot-path codecs: request decoding, the
//! request splitter and reply encoding.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use essd::nbd::{proto, transmission};

fn codecs(c: &mut Criterion) {
    let req = proto::Request {
        flags: proto::cflag::FUA,
        command: proto::cmd::WRITE,
        cookie: 42,
        offset: 1 << 30,
        length: 4096,
    };
    let header = req.encode();
    c.bench_function("request_decode", |b| {
        b.iter(|| proto::Request::decode(black_box(&header)))
    });
    let mut stream = Vec::new();
    for i in 0..32u64 {
        let r = proto::Request { cookie: i, ..req };
        stream.extend_from_slice(&r.encode());
        stream.extend_from_slice(&[0u8; 4096]);
    }
    c.bench_function("split_32_writes_4k", |b| {
        b.iter(|| transmission::count_complete_requests(black_box(&stream)))
    });
    c.bench_function("simple_reply_encode", |b| {
        b.iter(|| proto::simple_reply(black_box(7), 0))
    });
    c.bench_function("structured_read_header_encode", |b| {
        b.iter(|| {
            proto::chunk_header(
                proto::chunk::FLAG_DONE,
                proto::chunk::OFFSET_DATA,
                black_box(7),
                4104,
            )
        })
    });
}

criterion_group!(benches, codecs);
criterion_main!(benches);
