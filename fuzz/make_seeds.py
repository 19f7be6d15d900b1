#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/: a few well-formed NBD requests, option
haggles and PPRC frames of every kind, byte by byte from the formats in
src/nbd/proto.rs and src/copy/pprc/wire.rs.

Usage: fuzz/make_seeds.py [DIR] (default: fuzz/seeds beside this script)
"""
import struct, os, sys
root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
def w(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)
RM = 0x25609513
def req(cmd, off=0, ln=0, flags=0, cookie=1, data=b''):
    return struct.pack('>IHHQQI', RM, flags, cmd, cookie, off, ln) + data
IHAVEOPT = 0x49484156454F5054
def opt(o, data=b''):
    return struct.pack('>QII', IHAVEOPT, o, len(data)) + data
def s32(s): return struct.pack('>I', len(s)) + s
# nbd_wire
w('nbd_wire', 'read', req(0, 4096, 4096))
w('nbd_wire', 'write', req(1, 512, 512, flags=1, data=bytes(range(256))*2))
w('nbd_wire', 'pipeline', req(1, 0, 16, data=b'x'*16) + req(3) + req(4, 0, 4096) + req(6, 0, 65536, flags=2) + req(7, 0, 1 << 20) + req(5, 0, 4096) + req(2))
w('nbd_wire', 'oversized_write', req(1, 0, 64 << 20))
w('nbd_wire', 'opt_header', opt(7, s32(b'a') + struct.pack('>HH', 1, 3)))
w('nbd_wire', 'info_request', s32(b'a') + struct.pack('>HHH', 2, 0, 3))
w('nbd_wire', 'meta_request', s32(b'a') + struct.pack('>I', 2) + s32(b'base:allocation') + s32(b'qemu:dirty-bitmap:x'))
# nbd_handshake
hs = struct.pack('>I', 3)
info = s32(b'a') + struct.pack('>HH', 1, 3)
meta = s32(b'a') + struct.pack('>I', 1) + s32(b'base:allocation')
w('nbd_handshake', 'go', hs + opt(8) + opt(10, meta) + opt(7, info))
w('nbd_handshake', 'list_info_abort', hs + opt(3) + opt(6, info) + opt(9, s32(b'a') + struct.pack('>I', 0)) + opt(2))
w('nbd_handshake', 'export_name', struct.pack('>I', 1) + opt(1, b'a'))
w('nbd_handshake', 'unknown_opts', hs + opt(5) + opt(99, b'zz') + opt(7, s32(b'nope') + struct.pack('>H', 0)) + opt(2))
# pprc_wire
MAGIC = 0x45505052
def fr(kind, payload, flags=0, rid=1):
    return struct.pack('>IHHQI', MAGIC, kind, flags, rid, len(payload)) + payload
v = b'000FCA31'
frames = [
    fr(1, struct.pack('>H', 1) + b'FCA31' + b'FCB02' + bytes(32)),
    fr(2, bytes(range(32))),
    fr(3, v + struct.pack('>Q', 4096) + b'd' * 64, flags=5),
    fr(4, v + struct.pack('>QQ', 0, 65536), flags=2),
    fr(5, v + struct.pack('>QQ', 0, 4096)),
    fr(6, v), fr(7, struct.pack('>I', 0)), fr(8, v),
    fr(9, v + struct.pack('>IQ', 65536, 17) + b'\xff\x00\x01'),
    fr(10, v + bytes([3, 2])), fr(11, struct.pack('>Q', 1795000000000)), fr(12, b''),
    fr(13, b'{"op":"query"}'), fr(14, struct.pack('>I', 0) + b'{}'),
]
for i, f in enumerate(frames):
    w('pprc_wire', 'kind%02d' % (i + 1), f)
w('pprc_wire', 'stream', b''.join(frames))
# pprc_handshake: the peer's hello (as FCB02, to FCA31 or to anyone), then a proof
hello = fr(1, struct.pack('>H', 1) + b'FCB02' + b'FCA31' + bytes(range(32)), rid=0)
w('pprc_handshake', 'hello_auth', hello + fr(2, bytes(32), rid=0))
w('pprc_handshake', 'hello_any', fr(1, struct.pack('>H', 1) + b'FCB02' + b'?????' + bytes(32), rid=0))
w('pprc_handshake', 'write_first', frames[2])
