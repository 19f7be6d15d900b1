//! Real NBD clients against essd: nbdinfo, nbdcopy, qemu-img, fio — on both
//! I/O engines, over the Unix socket and TCP.

mod common;

use std::process::Command;

use common::*;

fn demo_like(engine: &'static str) -> TestConfig {
    let mut cfg = TestConfig::new(engine);
    cfg.tcp = true;
    cfg.volumes = vec![
        Vol {
            alias: Some("payroll"),
            description: Some("payroll db"),
            ..Vol::new(0x10, 0, "96MiB")
        },
        Vol::new(0x10, 1, "16MiB"),
        Vol {
            read_only: true,
            ..Vol::new(0x11, 8, "8MiB")
        },
    ];
    cfg
}

#[test]
fn nbdinfo_reports_exports_sizes_flags_and_contexts() {
    require("nbdinfo", "libnbd-bin");
    for engine in ENGINES {
        let dir = tempdir("info");
        let cfg = demo_like(engine);
        // The read-only volume's file must exist beforehand.
        std::fs::File::create(dir.path().join("vol-11-8.img"))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let essd = Essd::start_in(dir.path(), &cfg);
        let json = run_text(
            Command::new("nbdinfo")
                .arg("--json")
                .arg(essd.uri("000TST01")),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let e = &v["exports"][0];
        assert_eq!(v["protocol"], "newstyle-fixed");
        assert_eq!(v["structured"], true);
        assert_eq!(e["export-name"], "000TST01");
        assert_eq!(e["description"], "payroll db");
        assert_eq!(e["export-size"], 96u64 << 20);
        assert_eq!(e["is_read_only"], false);
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_df",
            "can_multi_conn",
        ] {
            assert_eq!(e[flag], true, "{flag}");
        }
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 65536);
        assert_eq!(e["block_size_maximum"], 32u64 << 20);
        assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));

        // Read-only volume over TCP, by ID 108.
        let json = run_text(
            Command::new("nbdinfo")
                .arg("--json")
                .arg(essd.tcp_uri("108TST01")),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["exports"][0]["is_read_only"], true);
        assert_eq!(v["exports"][0]["export-size"], 8u64 << 20);

        // The alias reaches the same volume.
        let size = run_text(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(essd.uri("payroll")),
        );
        assert_eq!(size.trim(), (96u64 << 20).to_string());

        // --list shows every ID and alias with descriptions.
        let json = run_text(
            Command::new("nbdinfo")
                .args(["--list", "--json"])
                .arg(essd.tcp_uri("")),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let uris: Vec<&str> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["uri"].as_str().unwrap().rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            uris,
            vec!["000TST01", "payroll", "001TST01", "108TST01"],
            "{engine}"
        );
        // The alias reports the volume ID as its canonical name.
        assert_eq!(v["exports"][1]["export-name"], "000TST01");
        drop(essd);
    }
}

#[test]
fn unknown_export_is_refused_not_defaulted() {
    require("nbdinfo", "libnbd-bin");
    let dir = tempdir("unknown");
    let essd = Essd::start_in(dir.path(), &TestConfig::new("uring"));
    for name in ["", "999TST01", "nope"] {
        let out = Command::new("nbdinfo")
            .arg(essd.uri(name))
            .output()
            .unwrap();
        assert!(!out.status.success(), "export {name:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        // NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT.
        assert!(
            err.contains("server replied with error to opt_go request: No such file or directory"),
            "{err}"
        );
    }
    // Still serving the real export afterwards.
    run(Command::new("nbdinfo").arg(essd.uri("000TST01")));
}

#[test]
fn nbdcopy_round_trip_and_qemu_img_compare() {
    require("nbdcopy", "libnbd-bin");
    require("qemu-img", "qemu-utils");
    for engine in ENGINES {
        let dir = tempdir("copy");
        let mut cfg = demo_like(engine);
        cfg.volumes.truncate(1);
        let essd = Essd::start_in(dir.path(), &cfg);
        let src = dir.path().join("random.bin");
        random_file(&src, 96 << 20, 7);
        run(Command::new("nbdcopy").arg(&src).arg(essd.uri("000TST01")));
        let back = dir.path().join("back.bin");
        run(Command::new("nbdcopy")
            .arg(essd.tcp_uri("000TST01"))
            .arg(&back));
        assert_eq!(sha256_file(&src), sha256_file(&back), "{engine}");
        let out = run_text(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&src)
                .arg(essd.uri("000TST01")),
        );
        assert!(out.contains("Images are identical"), "{out}");
        // The backing file holds exactly what was written.
        assert_eq!(
            sha256_file(&dir.path().join("vol-10-0.img")),
            sha256_file(&src)
        );
        assert_eq!(essd.stop().code(), Some(0));
    }
}

#[test]
fn fio_random_writes_verify_over_four_connections() {
    require("fio", "fio");
    for engine in ENGINES {
        let dir = tempdir("fio");
        let mut cfg = TestConfig::new(engine);
        cfg.volumes = vec![Vol::new(0x10, 0, "128MiB")];
        let essd = Essd::start_in(dir.path(), &cfg);
        let out = run_text(
            Command::new("fio")
                .args([
                    "--name=verify",
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=32",
                    "--numjobs=4",
                    "--size=32M",
                    "--offset_increment=32M",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                    "--group_reporting",
                    "--output-format=json",
                ])
                .arg(format!("--uri={}", essd.uri("000TST01")))
                .current_dir(dir.path()),
        );
        let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "{engine}");
        // Every written block was read back and verified.
        assert_eq!(job["write"]["io_bytes"], 128u64 << 20, "{engine}");
        assert_eq!(job["read"]["io_bytes"], 128u64 << 20, "{engine}");
        assert_eq!(essd.stop().code(), Some(0));
    }
}

#[test]
fn direct_io_volume_serves_unaligned_requests() {
    require("nbdcopy", "libnbd-bin");
    for engine in ENGINES {
        let dir = tempdir("direct");
        let mut cfg = TestConfig::new(engine);
        cfg.volumes = vec![Vol {
            direct_io: true,
            ..Vol::new(0x10, 0, "16MiB")
        }];
        let essd = Essd::start_in(dir.path(), &cfg);
        let json = run_text(
            Command::new("nbdinfo")
                .arg("--json")
                .arg(essd.uri("000TST01")),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["exports"][0]["block_size_minimum"], 4096);
        // Unaligned writes and reads (strict mode off so libnbd sends them).
        let out = python(
            r#"
import nbd, sys, random
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
model = bytearray(1 << 20)
rng = random.Random(3)
for i in range(300):
    off = rng.randrange(0, (1 << 20) - 9000)
    n = rng.randrange(1, 9000)
    data = bytes(rng.getrandbits(8) for _ in range(n))
    h.pwrite(data, off)
    model[off:off+n] = data
h.flush()
assert h.pread(1 << 20, 0) == bytes(model)
for i in range(100):
    off = rng.randrange(0, (1 << 20) - 5000)
    n = rng.randrange(1, 5000)
    assert h.pread(n, off) == bytes(model[off:off+n])
print("ok")
"#,
            &[&essd.uri("000TST01")],
        );
        assert_eq!(out.trim(), "ok");
        assert_eq!(essd.stop().code(), Some(0));
    }
}

#[test]
fn direct_io_unaligned_write_zeroes_survive_a_concurrent_write_to_the_same_block() {
    // A WRITE_ZEROES and a WRITE to disjoint sectors of one 4 KiB block,
    // in flight together: both must be there afterwards (the write's
    // read-modify-write of the block must not put back the old bytes of
    // the zeroed range).
    for engine in ENGINES {
        let dir = tempdir("direct-zero");
        let mut cfg = TestConfig::new(engine);
        cfg.volumes = vec![Vol {
            direct_io: true,
            ..Vol::new(0x10, 0, "16MiB")
        }];
        let essd = Essd::start_in(dir.path(), &cfg);
        let out = python(
            r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
lost = 0
for i in range(500):
    base = (i % 1024) * 8192
    h.pwrite(b"\xff" * 4096, base)
    h.aio_zero(512, base)
    h.aio_pwrite(b"\x11" * 512, base + 512)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    got = h.pread(1024, base)
    assert got[512:] == b"\x11" * 512, i
    if got[:512] != bytes(512):
        lost += 1
print("zeroes lost", lost)
"#,
            &[&essd.uri("000TST01")],
        );
        assert_eq!(out.trim(), "zeroes lost 0", "{engine}");
        assert_eq!(essd.stop().code(), Some(0));
    }
}

#[test]
fn direct_io_write_to_a_partial_last_block_keeps_the_backing_file_size() {
    // A direct-I/O file volume whose size is not a multiple of the 4 KiB
    // direct-I/O block: writing its last bytes (a read-modify-write of the
    // whole last block) must not grow the file, or essd refuses the
    // volume when it next starts; one grown by a crash is cut back.
    let dir = tempdir("direct-tail");
    let mut cfg = TestConfig::new("uring");
    cfg.volumes = vec![Vol {
        direct_io: true,
        ..Vol::new(0x10, 0, "10000")
    }];
    let mut essd = Essd::start_in(dir.path(), &cfg);
    let backing = dir.path().join("vol-10-0.img");
    let out = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
h.pwrite(b"\x42" * 1808, 8192)
h.zero(100, 9900)
h.flush()
assert h.pread(1808, 8192) == b"\x42" * 1708 + bytes(100)
print("ok")
"#,
        &[&essd.uri("000TST01")],
    );
    assert_eq!(out.trim(), "ok");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 10000);
    // A crash between the block's write and the cut-back leaves the file
    // grown to the block's end: the next start cuts it back.
    essd.crash();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(12288)
        .unwrap();
    essd.kill_and_restart("TST01");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 10000);
    assert!(essd.log().contains("cut back to the volume's size"));
    let out = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.get_size() == 10000
assert h.pread(1808, 8192) == b"\x42" * 1708 + bytes(100)
print("ok")
"#,
        &[&essd.uri("000TST01")],
    );
    assert_eq!(out.trim(), "ok");
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn direct_io_volume_of_a_size_off_the_4k_block_copies_whole_with_nbdcopy() {
    // A direct-I/O volume advertised a minimum block size of 4096 whatever
    // its size; a client that honours it (nbdcopy, qemu: libnbd's strict
    // alignment) cannot reach the last bytes of a 1,000,000-byte volume
    // and fails. proto.md: "If a server advertises a minimum block size,
    // the advertised export size SHOULD be an integer multiple of that
    // block size, since otherwise, the client would be unable to access
    // the final few bytes of the export."
    require("nbdcopy", "libnbd-bin");
    const SIZE: usize = 1_000_000;
    for engine in ENGINES {
        let dir = tempdir("direct-odd");
        let mut cfg = TestConfig::new(engine);
        cfg.volumes = vec![Vol {
            direct_io: true,
            ..Vol::new(0x10, 0, "1000000")
        }];
        let essd = Essd::start_in(dir.path(), &cfg);
        let src = dir.path().join("src.bin");
        let back = dir.path().join("back.bin");
        random_file(&src, SIZE, 11);
        for (from, to) in [
            (src.display().to_string(), essd.uri("000TST01")),
            (essd.uri("000TST01"), back.display().to_string()),
        ] {
            let out = Command::new("nbdcopy")
                .arg(&from)
                .arg(&to)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{engine}: nbdcopy {from} {to}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(sha256_file(&src), sha256_file(&back), "{engine}");
        let json = run_text(
            Command::new("nbdinfo")
                .arg("--json")
                .arg(essd.uri("000TST01")),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let min = v["exports"][0]["block_size_minimum"].as_u64().unwrap();
        assert_eq!(SIZE as u64 % min, 0, "{engine}: minimum block {min}");
        assert_eq!(essd.stop().code(), Some(0));
    }
}

#[test]
fn a_refused_fast_zero_leaves_an_unaligned_direct_io_range_unchanged() {
    // NBD_CMD_FLAG_FAST_ZERO: the server "MUST fail quickly with
    // NBD_ENOTSUP unless the request can be serviced in less time than a
    // corresponding NBD_CMD_WRITE, and SHOULD NOT alter the contents of the
    // export when returning this failure". On a direct-I/O volume the
    // unaligned head of the range was zeroed (written) before the
    // file system refused to zero the aligned middle quickly (tmpfs has no
    // FALLOC_FL_ZERO_RANGE, which NO_HOLE asks for).
    for engine in ENGINES {
        let dir = tempdir("fast-zero");
        let backing = ScratchMount::mount("tmpfs", "size=8m", &dir.path().join("tmpfs"));
        let mut cfg = TestConfig::new(engine);
        cfg.volumes = vec![Vol {
            direct_io: true,
            path: Some(backing.dir.join("v.img")),
            ..Vol::new(0x10, 0, "1MiB")
        }];
        let essd = Essd::start_in(dir.path(), &cfg);
        let out = python(
            r#"
import errno, nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
h.pwrite(b"\x77" * 16384, 0)
try:
    h.zero(8192, 100, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    print("zeroed" if h.pread(8192, 100) == bytes(8192) else "not zeroed")
except nbd.Error as e:
    assert e.errno in (errno.ENOTSUP, "ENOTSUP"), e
    got = h.pread(16384, 0)
    print("refused,", "unchanged" if got == b"\x77" * 16384 else
          f"changed at {[i for i in range(16384) if got[i] != 0x77][:1]}")
"#,
            &[&essd.uri("000TST01")],
        );
        assert_eq!(out.trim(), "refused, unchanged", "{engine}");
        assert_eq!(essd.stop().code(), Some(0));
    }
}
