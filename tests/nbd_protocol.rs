//! NBD protocol edge cases, driven through libnbd (Debian's python3-libnbd)
//! and through raw sockets for malformed traffic.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use essd::nbd::proto;

fn server(engine: &'static str, dir: &std::path::Path) -> Essd {
    let mut cfg = TestConfig::new(engine);
    cfg.tcp = true;
    cfg.volumes = vec![
        Vol::new(0x10, 0, "64MiB"),
        Vol {
            read_only: true,
            ..Vol::new(0x10, 1, "1MiB")
        },
    ];
    std::fs::write(dir.join("vol-10-1.img"), vec![0x5au8; 1 << 20]).unwrap();
    Essd::start_in(dir, &cfg)
}

const EDGES: &str = r#"
import errno, sys, nbd

uri, ro_uri = sys.argv[1], sys.argv[2]
SIZE = 64 << 20

def connect(u, strict=True, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(u)
    return h

def expect_errno(code, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), e.errno)
        assert got == code, f"{fn.__name__}: errno {e.errno} ({e.string}), wanted {errno.errorcode[code]}"
        return
    raise AssertionError(f"{fn.__name__}{args[1:]} succeeded, wanted errno {code}")

h = connect(uri, strict=False)
# Out of range: reads EINVAL, writes ENOSPC; the connection stays usable.
expect_errno(errno.EINVAL, h.pread, 4096, SIZE - 100)
expect_errno(errno.EINVAL, h.pread, 1, SIZE)
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 4096, SIZE - 100)
expect_errno(errno.ENOSPC, h.zero, 8192, SIZE - 4096)
expect_errno(errno.EINVAL, h.trim, 8192, SIZE - 4096)
expect_errno(errno.EINVAL, h.cache, 8192, SIZE)
h.pwrite(b"still alive", 0)
assert h.pread(11, 0) == b"still alive"
print("out-of-range ok")

# Oversized requests: the maximum works, one byte more is refused, and the
# connection survives (the write payload is skipped).
big = bytes(range(256)) * (128 << 10)          # 32 MiB
h.pwrite(big, 1 << 20)
assert h.pread(32 << 20, 1 << 20) == big
expect_errno(errno.EINVAL, h.pread, (32 << 20) + 1, 0)
expect_errno(errno.EINVAL, h.pwrite, b"\1" * ((32 << 20) + 1), 0)
assert h.pread(11, 0) == b"still alive"
print("max-size ok")

# write_zeroes reads back as zeroes, with and without NO_HOLE / FAST_ZERO.
h.pwrite(b"\xff" * (1 << 20), 8 << 20)
h.zero(300000, (8 << 20) + 1000)
h.zero(4096, (8 << 20) + 400000, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, (8 << 20) + 524288, nbd.CMD_FLAG_FAST_ZERO)
data = h.pread(1 << 20, 8 << 20)
assert data[:1000] == b"\xff" * 1000
assert data[1000:301000] == bytes(300000)
assert data[301000:400000] == b"\xff" * 99000
assert data[400000:404096] == bytes(4096)
assert data[524288:589824] == bytes(65536)
assert data[589824:] == b"\xff" * (len(data) - 589824)
print("write-zeroes ok")

# trim + block status: a trimmed aligned range reports hole|zero.
def extents(h, count, offset):
    out = []
    def cb(ctx, off, entries, err):
        assert ctx == "base:allocation"
        out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, offset, cb)
    return out

h.pwrite(b"\xaa" * (4 << 20), 16 << 20)
h.flush()
ex = extents(h, 4 << 20, 16 << 20)
assert ex[0][1] == 0, ex           # data
h.trim(2 << 20, 17 << 20)
h.flush()
ex = extents(h, 4 << 20, 16 << 20)
assert ex[0] == (1 << 20, 0), ex
assert ex[1] == (2 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO), ex
assert h.pread(2 << 20, 17 << 20) == bytes(2 << 20)
# A never-written region is a hole; REQ_ONE returns one extent.
ex = extents(h, 1 << 20, 40 << 20)
assert ex == [(1 << 20, 3)], ex
print("trim/block-status ok")

# 64 pipelined commands in flight at once, completing in any order.
bufs, cookies = [], []
for i in range(64):
    payload = bytes([i]) * 65536
    cookies.append(h.aio_pwrite(payload, (24 << 20) + i * 65536))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
reads = []
for i in range(64):
    buf = nbd.Buffer(65536)
    reads.append((i, buf, h.aio_pread(buf, (24 << 20) + i * 65536)))
assert h.aio_in_flight() > 1
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, buf, c in reads:
    assert h.aio_command_completed(c)
    assert buf.to_bytearray() == bytes([i]) * 65536, i
print("pipelining ok")

# Multi-conn: a write completed on one connection is visible on another,
# and a FLUSH on the second covers it.
assert h.can_multi_conn()
h2 = connect(uri)
h.pwrite(b"multi-conn!", 30 << 20)
h2.flush()
assert h2.pread(11, 30 << 20) == b"multi-conn!"
h2.shutdown()
print("multi-conn ok")

# FUA writes and flushes succeed.
h.pwrite(b"fua", 0, nbd.CMD_FLAG_FUA)
h.flush()
# FUA is valid on every command once SEND_FUA is negotiated (the server
# MUST accept it, if only by ignoring it; some clients set it on FLUSH).
h.flush(nbd.CMD_FLAG_FUA)
h.cache(4096, 0, nbd.CMD_FLAG_FUA)
assert extents(h, 4096, 0)[0][1] == 0
h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_FUA)
assert h.pread(3, 0) == b"fua"
print("fua-everywhere ok")
h.shutdown()

# Read-only export: writes, trims and zeroes get EPERM, reads work.
r = connect(ro_uri, strict=False)
assert r.is_read_only()
expect_errno(errno.EPERM, r.pwrite, b"no", 0)
expect_errno(errno.EPERM, r.trim, 4096, 0)
expect_errno(errno.EPERM, r.zero, 4096, 0)
assert r.pread(4, 0) == b"\x5a" * 4
r.shutdown()
print("read-only ok")

# Simple (non-structured) replies work too.
s = nbd.NBD()
s.set_request_structured_replies(False)
s.set_strict_mode(0)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
assert s.pread(11, 0)[:3] == b"fua"
expect_errno(errno.EINVAL, s.pread, 4096, SIZE)
expect_errno(errno.EINVAL, s.pread, (32 << 20) + 1, 0)
s.shutdown()
print("simple-replies ok")
"#;

#[test]
fn libnbd_edge_cases_on_both_engines() {
    for engine in ENGINES {
        let dir = tempdir("edges");
        let essd = server(engine, dir.path());
        let out = python(EDGES, &[&essd.uri("000TST01"), &essd.uri("001TST01")]);
        for step in [
            "out-of-range ok",
            "max-size ok",
            "write-zeroes ok",
            "trim/block-status ok",
            "pipelining ok",
            "multi-conn ok",
            "fua-everywhere ok",
            "read-only ok",
            "simple-replies ok",
        ] {
            assert!(out.contains(step), "{engine}: missing {step}:\n{out}");
        }
        assert_eq!(essd.stop().code(), Some(0));
    }
}

fn raw_connect(essd: &Essd) -> UnixStream {
    let s = UnixStream::connect(&essd.nbd_sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A raw connection in transmission on export `000TST01` (`NBD_OPT_EXPORT_NAME`,
/// `NO_ZEROES`), reads timing out after `timeout`; with the export's size
/// and flags as the server sent them.
fn export_name_session(essd: &Essd, timeout: Duration) -> (UnixStream, [u8; 10]) {
    let mut s = raw_connect(essd);
    s.set_read_timeout(Some(timeout)).unwrap();
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // NO_ZEROES
    send_option(&mut s, proto::opt::EXPORT_NAME, b"000TST01");
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    (s, export)
}

fn read_greeting(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        3,
        "FIXED_NEWSTYLE | NO_ZEROES"
    );
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Reads one option reply: (option, reply type, data).
fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).unwrap();
    (opt, kind, data)
}

/// Whether the server closed the connection: end of file, or a reset (a
/// close with unread data). A read that times out (5 s) is no close.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => closed_by_the_server(&e),
    }
}

fn closed_by_the_server(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

#[test]
fn malformed_traffic_closes_only_that_connection() {
    require("nbdinfo", "libnbd-bin");
    let dir = tempdir("raw");
    let essd = server("uring", dir.path());

    // Unknown client flags → closed.
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s));

    // Bad option magic → closed.
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&[0xde; 16]).unwrap();
    assert!(closed(&mut s));

    // Unknown option and STARTTLS → ERR_UNSUP, negotiation continues;
    // truncated INFO → ERR_INVALID; unknown export via INFO → ERR_UNKNOWN.
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut s, 4242, b"junk");
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ERR_UNSUP);
    send_option(&mut s, proto::opt::STARTTLS, &[]);
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ERR_UNSUP);
    send_option(&mut s, proto::opt::INFO, &[0, 0, 0, 9, b'x']);
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ERR_INVALID);
    let mut info = 8u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"777TST01");
    info.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, proto::opt::GO, &info);
    let (opt, kind, msg) = read_option_reply(&mut s);
    assert_eq!((opt, kind), (proto::opt::GO, proto::rep::ERR_UNKNOWN));
    assert!(String::from_utf8_lossy(&msg).contains("777TST01"));
    // Old-style EXPORT_NAME for an unknown export: no error reply exists,
    // so the server closes.
    send_option(&mut s, proto::opt::EXPORT_NAME, b"nope");
    assert!(closed(&mut s));

    // EXPORT_NAME for a real export, then a request with a bad magic →
    // closed; the server keeps serving others.
    let (mut s, export) = export_name_session(&essd, Duration::from_secs(5));
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        64 << 20
    );
    // A valid read first, over simple replies.
    let req = proto::Request {
        flags: 0,
        command: proto::cmd::READ,
        cookie: 99,
        offset: 0,
        length: 512,
    };
    s.write_all(&req.encode()).unwrap();
    let mut reply = [0u8; 16 + 512];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&reply[4..8], &[0, 0, 0, 0]);
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 99);
    // Unknown command → EINVAL reply, connection stays.
    let req = proto::Request { command: 77, ..req };
    s.write_all(&req.encode()).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        proto::errno::EINVAL
    );
    s.write_all(&[0x11; 28]).unwrap();
    assert!(closed(&mut s));

    // Garbage and half a handshake from another client do not disturb a
    // correct one.
    let mut hang = raw_connect(&essd);
    read_greeting(&mut hang);
    run(std::process::Command::new("nbdinfo").arg(essd.uri("000TST01")));
    drop(hang);
    run(std::process::Command::new("nbdinfo").arg(essd.tcp_uri("000TST01")));
}

#[test]
fn oversized_write_after_a_large_write_is_skipped_in_large_reads() {
    // The payload of a refused oversized write is read and thrown away;
    // after a large write (whose end the reads stop at) it must still be
    // read in large pieces, not one request header's worth at a time.
    let dir = tempdir("skip");
    let essd = server("uring", dir.path());
    let (mut s, _) = export_name_session(&essd, Duration::from_secs(60));
    let write = |s: &mut UnixStream, cookie: u64, len: u32| {
        let req = proto::Request {
            flags: 0,
            command: proto::cmd::WRITE,
            cookie,
            offset: 0,
            length: len,
        };
        s.write_all(&req.encode()).unwrap();
        let chunk = vec![0x33u8; 1 << 20];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    };
    let error = |s: &mut UnixStream, cookie: u64| {
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), cookie);
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    };
    write(&mut s, 1, 1 << 20);
    assert_eq!(error(&mut s, 1), 0);
    let before = cpu_seconds(essd.pid());
    write(&mut s, 2, 256 << 20);
    assert_eq!(error(&mut s, 2), proto::errno::EINVAL);
    // Read in buffers of 256 KiB, 256 MiB cost the server well under a
    // tenth of a second of CPU; one header's worth (28 bytes) at a time,
    // nearly ten million reads, seconds.
    let spent = cpu_seconds(essd.pid()) - before;
    assert!(spent < 1.0, "skipping 256 MiB took {spent:.2} s of CPU");
    write(&mut s, 3, 4096);
    assert_eq!(error(&mut s, 3), 0);
    assert_eq!(essd.stop().code(), Some(0));
}

/// The CPU time process `pid` has used (user and system, all threads).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime, fields 14 and 15 of the line, in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// A client that sends 64 reads of 32 MiB at once and reads no reply for
/// a while: the server holds a bounded amount for it meanwhile, and
/// answers every read, whole, once the client reads (the requests left in
/// its buffer when the replies not yet written reached the connection's
/// 64 MiB start once those are written; the writes of
/// `links::large_writes_pipelined_to_a_stalled_pair_hold_bounded_memory`
/// are the case where the budget decides).
#[test]
fn large_reads_pipelined_by_a_client_that_does_not_read_hold_bounded_memory() {
    const READS: u64 = 64;
    const LEN: u32 = 32 << 20;
    let dir = tempdir("read-budget");
    let essd = server("uring", dir.path());
    let before = peak_memory(essd.pid());
    let (mut s, _) = export_name_session(&essd, Duration::from_secs(30));
    let mut requests = Vec::new();
    for cookie in 0..READS {
        let req = proto::Request {
            flags: 0,
            command: proto::cmd::READ,
            cookie,
            offset: (cookie % 2) * u64::from(LEN),
            length: LEN,
        };
        requests.extend_from_slice(&req.encode());
    }
    s.write_all(&requests).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut answered = std::collections::BTreeSet::new();
    let mut data = vec![0u8; LEN as usize];
    for _ in 0..READS {
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes()[..]);
        assert_eq!(&reply[4..8], &[0; 4], "error");
        s.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == 0));
        answered.insert(u64::from_be_bytes(reply[8..].try_into().unwrap()));
    }
    assert_eq!(answered, (0..READS).collect());
    // The high-water mark of the whole exchange.
    let grown = peak_memory(essd.pid()) - before;
    assert!(grown < 256 << 20, "the server grew by {} MiB", grown >> 20);
    assert_eq!(essd.stop().code(), Some(0));
}

/// Sends NBD_OPT_SET_META_CONTEXT for `export` with `queries`; returns the
/// reply types, the final one last.
fn set_meta_context(s: &mut UnixStream, export: &str, queries: &[&str]) -> Vec<u32> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    send_option(s, proto::opt::SET_META_CONTEXT, &d);
    let mut kinds = Vec::new();
    loop {
        let (opt, kind, _) = read_option_reply(s);
        assert_eq!(opt, proto::opt::SET_META_CONTEXT);
        kinds.push(kind);
        if kind != proto::rep::META_CONTEXT {
            return kinds;
        }
    }
}

/// Sends NBD_OPT_GO for `export` and reads its replies up to the ACK.
fn go(s: &mut UnixStream, export: &str) {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, proto::opt::GO, &d);
    loop {
        let (opt, kind, _) = read_option_reply(s);
        assert_eq!(opt, proto::opt::GO);
        match kind {
            proto::rep::INFO => {}
            proto::rep::ACK => return,
            other => panic!("GO {export}: reply 0x{other:x}"),
        }
    }
}

/// Reads one structured reply chunk: (flags, type, cookie, payload).
fn read_chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (flags, kind, cookie, payload)
}

#[test]
fn a_failed_set_meta_context_leaves_no_context_selected() {
    // NBD_OPT_SET_META_CONTEXT "replaces all previously-set metadata
    // contexts (including when this command fails)": after a failed one,
    // BLOCK_STATUS has no context to report on and is refused (EINVAL),
    // not answered from the context an earlier, successful one selected.
    let dir = tempdir("meta");
    let essd = server("uring", dir.path());
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, proto::opt::STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ACK);
    assert_eq!(
        set_meta_context(&mut s, "000TST01", &[proto::BASE_ALLOCATION]),
        [proto::rep::META_CONTEXT, proto::rep::ACK]
    );
    assert_eq!(
        set_meta_context(&mut s, "777TST01", &[proto::BASE_ALLOCATION]),
        [proto::rep::ERR_UNKNOWN]
    );
    go(&mut s, "000TST01");
    let req = proto::Request {
        flags: 0,
        command: proto::cmd::BLOCK_STATUS,
        cookie: 7,
        offset: 0,
        length: 4096,
    };
    s.write_all(&req.encode()).unwrap();
    let (flags, kind, cookie, payload) = read_chunk(&mut s);
    assert_eq!(cookie, 7);
    assert_eq!(flags, proto::chunk::FLAG_DONE);
    assert_eq!(
        kind,
        proto::chunk::ERROR,
        "block status answered with no context selected"
    );
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        proto::errno::EINVAL
    );
    // The same session still works.
    let req = proto::Request {
        command: proto::cmd::READ,
        cookie: 8,
        length: 512,
        ..req
    };
    s.write_all(&req.encode()).unwrap();
    let (_, kind, cookie, payload) = read_chunk(&mut s);
    assert_eq!((kind, cookie), (proto::chunk::OFFSET_DATA, 8));
    assert_eq!(payload.len(), 8 + 512);
    assert_eq!(essd.stop().code(), Some(0));
}

const OVERSIZED: &str = r#"
import errno, sys, nbd

def errno_of(fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), e.errno)
    raise AssertionError(f"{fn.__name__} succeeded")

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
too_big = (32 << 20) + 1
got = {
    "read": errno_of(h.pread, too_big, 0),
    "write": errno_of(h.pwrite, b"\1" * too_big, 0),
    "read-df": errno_of(h.pread, too_big, 0, nbd.CMD_FLAG_DF),
}
assert h.pread(4, 0) == bytes(4)
print(" ".join(f"{k}={errno.errorcode[v]}" for k, v in got.items()))
"#;

#[test]
fn requests_over_the_maximum_block_size_get_einval() {
    // proto.md, "Block size constraints": "The server SHOULD report an
    // NBD_EINVAL error if the client's request ... is larger than the
    // advertised maximum block size", and "Error values": "The server
    // SHOULD NOT return NBD_EOVERFLOW except as documented in response to
    // NBD_CMD_READ when NBD_CMD_FLAG_DF is supported". So an oversized
    // READ or WRITE gets EINVAL with structured replies too; only a READ
    // with DF may get EOVERFLOW.
    let dir = tempdir("oversized");
    let essd = server("uring", dir.path());
    let out = python(OVERSIZED, &[&essd.uri("000TST01")]);
    assert!(
        out.contains("read=EINVAL write=EINVAL read-df=EOVERFLOW"),
        "{out}"
    );
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn an_export_name_too_long_to_buffer_closes_the_connection() {
    // NBD_OPT_EXPORT_NAME has no option reply: the client reads the export
    // size and flags next, and "if the server is unwilling to allow the
    // export, it MUST terminate the session". An option reply (the
    // ERR_TOO_BIG other options get for data too large to buffer) would be
    // read as an export of 0x0003e889045565a9 bytes.
    let dir = tempdir("longname");
    let essd = server("uring", dir.path());
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // NO_ZEROES
    let name = vec![b'a'; proto::MAX_OPTION_LEN as usize + 1];
    send_option(&mut s, proto::opt::EXPORT_NAME, &name);
    let mut got = Vec::new();
    if let Err(e) = s.read_to_end(&mut got) {
        assert!(closed_by_the_server(&e), "the connection stayed open: {e}");
    }
    assert!(
        got.is_empty(),
        "the server answered an EXPORT_NAME it refused with {} bytes: {:02x?}",
        got.len(),
        &got[..got.len().min(20)]
    );
    // Other clients are still served.
    let (_, export) = export_name_session(&essd, Duration::from_secs(5));
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        64 << 20
    );
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn an_error_reply_quoting_a_long_export_name_stays_within_4096_bytes() {
    // proto.md, "Conventions": a string (export names and error messages
    // alike) "MUST be no longer than 4096 bytes". The ERR_UNKNOWN message
    // quoted the client's export name whole: with a 4096-byte name it was
    // longer, and libnbd refused it ("option error string too long")
    // instead of reporting the unknown export.
    let dir = tempdir("longmsg");
    let essd = server("uring", dir.path());
    let out = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_export_name("a" * 4096)
try:
    h.connect_unix(sys.argv[1])
    print("connected?")
except nbd.Error as e:
    print(e.string[:80])
"#,
        &[&essd.nbd_sock.display().to_string()],
    );
    assert!(out.contains("no export named"), "{out}");
    // The raw reply: ERR_UNKNOWN with a message of at most 4096 bytes.
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let name = "é".repeat(2048);
    let mut info = (name.len() as u32).to_be_bytes().to_vec();
    info.extend_from_slice(name.as_bytes());
    info.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, proto::opt::INFO, &info);
    let (_, kind, msg) = read_option_reply(&mut s);
    assert_eq!(kind, proto::rep::ERR_UNKNOWN);
    assert!(msg.len() <= 4096, "{} bytes", msg.len());
    assert!(std::str::from_utf8(&msg).is_ok());
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn an_abort_with_data_too_large_to_buffer_is_acknowledged() {
    // proto.md, NBD_OPT_ABORT: "the server SHOULD ignore any data sent by
    // the client with this option" and reply NBD_REP_ACK, then close. Data
    // too large to buffer is skipped like any other option's, but an ABORT
    // is still an ABORT: no ERR_TOO_BIG, and no further option is read.
    let dir = tempdir("abort-big");
    let essd = server("uring", dir.path());
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // NO_ZEROES
    let data = vec![0u8; proto::MAX_OPTION_LEN as usize + 1];
    send_option(&mut s, proto::opt::ABORT, &data);
    let (opt, kind, msg) = read_option_reply(&mut s);
    assert_eq!(
        (opt, kind),
        (proto::opt::ABORT, proto::rep::ACK),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    assert!(msg.is_empty(), "{msg:?}");
    assert!(closed(&mut s), "the connection stayed open after the ACK");
    assert_eq!(essd.stop().code(), Some(0));
}

/// Sends NBD_OPT_LIST_META_CONTEXT for `export` with `queries`; returns
/// every reply (type, data), the final one last.
fn list_meta_context(s: &mut UnixStream, export: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    send_option(s, proto::opt::LIST_META_CONTEXT, &d);
    let mut replies = Vec::new();
    loop {
        let (opt, kind, data) = read_option_reply(s);
        assert_eq!(opt, proto::opt::LIST_META_CONTEXT);
        replies.push((kind, data));
        if kind != proto::rep::META_CONTEXT {
            return replies;
        }
    }
}

#[test]
fn list_meta_context_replies_carry_context_id_zero() {
    // proto.md, NBD_OPT_LIST_META_CONTEXT: "The metadata context ID in
    // these replies is reserved and SHOULD be set to zero". Only
    // NBD_OPT_SET_META_CONTEXT assigns IDs, and BLOCK_STATUS uses the one
    // it assigned.
    let dir = tempdir("list-meta");
    let essd = server("uring", dir.path());
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, proto::opt::STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ACK);
    let mut listed = 0u32.to_be_bytes().to_vec();
    listed.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
    for queries in [&[][..], &["base:"][..], &[proto::BASE_ALLOCATION][..]] {
        assert_eq!(
            list_meta_context(&mut s, "000TST01", queries),
            [
                (proto::rep::META_CONTEXT, listed.clone()),
                (proto::rep::ACK, Vec::new())
            ],
            "LIST_META_CONTEXT {queries:?}"
        );
    }
    // SET assigns a nonzero ID; BLOCK_STATUS reports under it.
    let mut d = 8u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"000TST01");
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(proto::BASE_ALLOCATION.len() as u32).to_be_bytes());
    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
    send_option(&mut s, proto::opt::SET_META_CONTEXT, &d);
    let (_, kind, data) = read_option_reply(&mut s);
    assert_eq!(kind, proto::rep::META_CONTEXT);
    assert_eq!(&data[4..], proto::BASE_ALLOCATION.as_bytes());
    let id = u32::from_be_bytes(data[..4].try_into().unwrap());
    assert_ne!(id, 0);
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ACK);
    go(&mut s, "000TST01");
    let req = proto::Request {
        flags: 0,
        command: proto::cmd::BLOCK_STATUS,
        cookie: 5,
        offset: 0,
        length: 4096,
    };
    s.write_all(&req.encode()).unwrap();
    let (flags, kind, cookie, payload) = read_chunk(&mut s);
    assert_eq!(
        (flags, kind, cookie),
        (proto::chunk::FLAG_DONE, proto::chunk::BLOCK_STATUS, 5)
    );
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), id);
    assert_eq!(essd.stop().code(), Some(0));
}

/// Block `i` (64 KiB) of the shutdown test's volume holds byte `i + 1`.
const BLOCK: usize = 64 << 10;

#[test]
fn requests_pipelined_before_sigterm_are_all_answered() {
    // proto.md, "Terminating the transmission phase": "On a server
    // shutdown, the server SHOULD wait for inflight requests to be
    // serviced prior to initiating a hard disconnect. A server MAY speed
    // this process up by issuing error replies. The error value issued in
    // respect of these requests and any subsequently received requests
    // SHOULD be NBD_ESHUTDOWN." A client pipelines 300 reads and 100
    // writes and reads no reply until the server got SIGTERM: the server
    // blocks writing replies with requests in its receive buffer and more
    // in the socket. Every request gets exactly one reply: those essd had
    // received when the shutdown began are served, in order, every later
    // one gets ESHUTDOWN; acknowledged writes are on disk.
    const READS: u64 = 300;
    const WRITES: u64 = 100;
    let dir = tempdir("shutdown-pipeline");
    let mut cfg = TestConfig::new("uring");
    cfg.volumes = vec![Vol::new(0x10, 0, "16MiB")];
    let image: Vec<u8> = (0..16 << 20).map(|i| (i / BLOCK + 1) as u8).collect();
    std::fs::write(dir.path().join("vol-10-0.img"), &image).unwrap();
    let essd = Essd::start_in(dir.path(), &cfg);
    let (mut s, _) = export_name_session(&essd, Duration::from_secs(30));

    // Cookies 0..READS are reads of blocks 0..128 (round robin), then
    // writes of blocks 128..228, then DISC; sent in order by one thread.
    let mut sender = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut reads = Vec::new();
        for i in 0..READS {
            let req = proto::Request {
                flags: 0,
                command: proto::cmd::READ,
                cookie: i,
                offset: (i % 128) * BLOCK as u64,
                length: BLOCK as u32,
            };
            reads.extend_from_slice(&req.encode());
        }
        sender.write_all(&reads)?;
        for j in 0..WRITES {
            let req = proto::Request {
                flags: 0,
                command: proto::cmd::WRITE,
                cookie: READS + j,
                offset: (128 + j) * BLOCK as u64,
                length: BLOCK as u32,
            };
            sender.write_all(&req.encode())?;
            sender.write_all(&[0xC0 ^ j as u8; BLOCK])?;
        }
        let disc = proto::Request {
            flags: 0,
            command: proto::cmd::DISC,
            cookie: u64::MAX,
            offset: 0,
            length: 0,
        };
        sender.write_all(&disc.encode())
    });
    // Both directions fill up: the server stops reading while its replies
    // wait, and the client's writes stop (a margin for a slow machine: the
    // reads are a few KiB, read at once).
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(essd.pid(), libc::SIGTERM) };
    essd.wait_log("shutting down:", Duration::from_secs(5));

    let mut errors: Vec<Option<u32>> = vec![None; (READS + WRITES) as usize];
    let mut data = vec![0u8; BLOCK];
    for answered in 0.. {
        // A pause while the server waits to send its last read replies,
        // with the writes still in the socket: it goes on afterwards.
        if answered == READS - 20 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let mut reply = [0u8; 16];
        match s.read_exact(&mut reply) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading replies: {e}"),
        }
        assert_eq!(&reply[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        assert!(cookie < READS + WRITES, "reply to unknown cookie {cookie}");
        assert_eq!(errors[cookie as usize], None, "second reply to {cookie}");
        errors[cookie as usize] = Some(error);
        if cookie < READS && error == 0 {
            s.read_exact(&mut data).unwrap();
            let byte = (cookie % 128 + 1) as u8;
            assert!(data.iter().all(|&b| b == byte), "read {cookie}: wrong data");
        }
    }
    let _ = writer.join().unwrap();
    let unanswered: Vec<usize> = (0..errors.len()).filter(|&i| errors[i].is_none()).collect();
    assert!(
        unanswered.is_empty(),
        "{} of {} requests never answered (first {:?})",
        unanswered.len(),
        errors.len(),
        unanswered.first()
    );
    let errors: Vec<u32> = errors.into_iter().map(Option::unwrap).collect();
    assert!(
        errors
            .iter()
            .all(|&e| e == 0 || e == proto::errno::ESHUTDOWN),
        "{errors:?}"
    );
    // Served: a prefix of the requests, ESHUTDOWN: all the rest.
    let served = errors.iter().take_while(|&&e| e == 0).count();
    eprintln!(
        "{served} of {} requests served, the rest ESHUTDOWN",
        errors.len()
    );
    // Every read was in essd's receive buffer (128 of them in flight)
    // before the signal: all are served.
    assert!(served >= READS as usize, "only {served} served");
    assert!(served < errors.len(), "no request got ESHUTDOWN");
    assert!(
        errors[served..]
            .iter()
            .all(|&e| e == proto::errno::ESHUTDOWN),
        "{errors:?}"
    );
    assert_eq!(essd.stop().code(), Some(0));
    let after = std::fs::read(dir.path().join("vol-10-0.img")).unwrap();
    for j in 0..WRITES as usize {
        let block = &after[(128 + j) * BLOCK..(129 + j) * BLOCK];
        let want = if READS as usize + j < served {
            0xC0 ^ j as u8
        } else {
            (129 + j) as u8
        };
        assert!(block.iter().all(|&b| b == want), "write {j}");
    }
}

#[test]
fn options_after_sigterm_get_err_shutdown_and_abort_is_acknowledged() {
    // proto.md, option haggling: "If the server is in the process of being
    // shut down it MAY error any inflight option and SHOULD error further
    // options received (other than an NBD_OPT_ABORT) with
    // NBD_REP_ERR_SHUTDOWN", after which the client "MUST initiate a soft
    // disconnect"; and "A party MUST NOT initiate a hard disconnect save
    // where set out in this section". A client haggling when the server
    // gets SIGTERM has its next options refused with ERR_SHUTDOWN and its
    // ABORT acknowledged; then the server closes and exits 0.
    let dir = tempdir("shutdown-haggle");
    let essd = server("uring", dir.path());
    let mut s = raw_connect(&essd);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, proto::opt::STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&mut s).1, proto::rep::ACK);
    // Another client that never answers the greeting does not hold the
    // shutdown up: it is closed once it has been silent for a while.
    let mut idle = raw_connect(&essd);
    read_greeting(&mut idle);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(essd.pid(), libc::SIGTERM) };
    let signalled = std::time::Instant::now();
    essd.wait_log("shutting down:", Duration::from_secs(5));
    let mut d = 8u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"000TST01");
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, proto::opt::GO, &d);
    let (opt, kind, _) = read_option_reply(&mut s);
    assert_eq!((opt, kind), (proto::opt::GO, proto::rep::ERR_SHUTDOWN));
    send_option(&mut s, proto::opt::LIST, &[]);
    let (opt, kind, _) = read_option_reply(&mut s);
    assert_eq!((opt, kind), (proto::opt::LIST, proto::rep::ERR_SHUTDOWN));
    send_option(&mut s, proto::opt::ABORT, &[]);
    let (opt, kind, _) = read_option_reply(&mut s);
    assert_eq!((opt, kind), (proto::opt::ABORT, proto::rep::ACK));
    assert!(closed(&mut s));
    assert_eq!(
        idle.read(&mut [0u8; 1]).unwrap(),
        0,
        "idle client not closed"
    );
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn a_client_that_keeps_sending_after_eshutdown_is_cut_off_after_a_grace_period() {
    // A client MUST soft-disconnect on ESHUTDOWN; one that goes on sending
    // requests (each answered ESHUTDOWN) does not keep the server from
    // exiting: its connection closes 5 s after the shutdown began.
    let dir = tempdir("shutdown-grace");
    let essd = server("uring", dir.path());
    let (mut s, _) = export_name_session(&essd, Duration::from_secs(5));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(essd.pid(), libc::SIGTERM) };
    let signalled = std::time::Instant::now();
    essd.wait_log("shutting down:", Duration::from_secs(5));
    let mut answered = 0;
    for cookie in 0.. {
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "still served"
        );
        let req = proto::Request {
            flags: 0,
            command: proto::cmd::FLUSH,
            cookie,
            offset: 0,
            length: 0,
        };
        let mut reply = [0u8; 16];
        if s.write_all(&req.encode()).is_err() || s.read_exact(&mut reply).is_err() {
            break;
        }
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), cookie);
        assert_eq!(
            u32::from_be_bytes(reply[4..8].try_into().unwrap()),
            proto::errno::ESHUTDOWN
        );
        answered += 1;
        // Well within the half second of silence after which a client
        // with nothing in flight is let go during a shutdown.
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = signalled.elapsed();
    assert!(answered >= 10, "{answered} requests answered ESHUTDOWN");
    assert!(
        elapsed > Duration::from_secs(4) && elapsed < Duration::from_secs(15),
        "closed after {elapsed:?}"
    );
    assert_eq!(essd.stop().code(), Some(0));
}
