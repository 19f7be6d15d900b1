//! A file system on an export: nbdfuse exposes the volume as a file,
//! `mkfs.ext4` + `mount -o loop` use it, and the contents survive a restart
//! of essd. Also raw block devices (loop devices) as volume backings.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// An nbdfuse mount of one export; unmounted on drop.
struct FuseView {
    dir: PathBuf,
    child: Child,
}

impl FuseView {
    fn mount(uri: &str, dir: &Path) -> FuseView {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let mut child = Command::new("nbdfuse")
            .arg("-v")
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nbdfuse");
        let file = dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !file.exists() {
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "nbdfuse did not expose {} ({exited:?}):\n{}",
                    file.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        FuseView {
            dir: dir.to_path_buf(),
            child,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }
}

impl Drop for FuseView {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loop mount; unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn loop_mount(image: &Path, at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(at));
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn checksums(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            out.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256_file(&p),
            ));
        }
    }
    out.sort();
    out
}

/// `e2fsck -fn` must find nothing to fix.
fn assert_fsck_clean(image: &Path, when: &str) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck {when}: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn ext4_on_nbdfuse_survives_restart_and_fsck() {
    require_root("mount -o loop and FUSE");
    require("nbdfuse", "libnbd-bin (nbdfuse) and fuse3");
    require("mkfs.ext4", "e2fsprogs");
    require("fusermount3", "fuse3");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is required");
    for engine in ENGINES {
        let dir = tempdir("fs");
        let mut cfg = TestConfig::new(engine);
        cfg.volumes = vec![Vol::new(0x10, 0, "128MiB")];
        let essd = Essd::start_in(dir.path(), &cfg);
        let fuse = FuseView::mount(&essd.uri("000TST01"), &dir.path().join("fuse"));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(fuse.file()));
        let expected = {
            let m = Mount::loop_mount(&fuse.file(), &dir.path().join("mnt"));
            random_file(&m.0.join("big.bin"), 20 << 20, 1);
            for i in 0..50 {
                std::fs::write(
                    m.0.join(format!("small-{i}.txt")),
                    format!("file {i}\n").repeat(i + 1),
                )
                .unwrap();
            }
            run(&mut Command::new("sync"));
            checksums(&m.0)
        };
        assert_eq!(expected.len(), 51);
        assert_fsck_clean(&fuse.file(), "after writing");
        drop(fuse);
        assert_eq!(essd.stop().code(), Some(0), "{engine}");

        // Restart on the same config: everything is still there.
        let essd = Essd::start_config(dir.path(), &dir.path().join("essd.toml"), "TST01");
        let fuse = FuseView::mount(&essd.uri("000TST01"), &dir.path().join("fuse"));
        assert_fsck_clean(&fuse.file(), "after restart");
        {
            let m = Mount::loop_mount(&fuse.file(), &dir.path().join("mnt"));
            assert_eq!(checksums(&m.0), expected, "{engine}");
        }
        drop(fuse);
        assert_eq!(essd.stop().code(), Some(0));
    }
}

/// A server whose one volume, `000TST01`, is the block device `dev`.
fn device_config(engine: &'static str, dev: &Path) -> TestConfig {
    let mut cfg = TestConfig::new(engine);
    cfg.volumes = vec![Vol {
        size: None,
        path: Some(dev.to_path_buf()),
        ..Vol::new(0x10, 0, "")
    }];
    cfg
}

/// Starts essd on `cfg` in `dir` (with `args`), which must exit with
/// status `code`; returns the last line of its stderr.
fn start_exits(dir: &Path, cfg: &TestConfig, args: &[&str], code: i32) -> String {
    let (status, last) = start_to_exit(&dir.join("essd.toml"), &cfg.render(dir), args);
    assert_eq!(status, Some(code), "{last}");
    last
}

/// Starts essd on `cfg` in `dir`, expecting start-up to fail with exit
/// code 2; returns the last line of its stderr.
fn start_fails(dir: &Path, cfg: &TestConfig) -> String {
    start_exits(dir, cfg, &[], 2)
}

#[test]
fn loop_device_backing_serves_and_persists_data() {
    require_root("losetup");
    require("losetup", "mount");
    require("nbdcopy", "libnbd-bin");
    for engine in ENGINES {
        let dir = tempdir("blk");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(48 << 20)
            .unwrap();
        let lo = LoopDevice::attach(&image);
        let cfg = device_config(engine, &lo.dev);
        let essd = Essd::start_in(dir.path(), &cfg);
        let size = run_text(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(essd.uri("000TST01")),
        );
        assert_eq!(
            size.trim(),
            (48u64 << 20).to_string(),
            "size comes from the device"
        );
        let src = dir.path().join("random.bin");
        random_file(&src, 48 << 20, 11);
        run(Command::new("nbdcopy").arg(&src).arg(essd.uri("000TST01")));
        let back = dir.path().join("back.bin");
        run(Command::new("nbdcopy").arg(essd.uri("000TST01")).arg(&back));
        assert_eq!(sha256_file(&back), sha256_file(&src), "{engine}");

        // A second server cannot open the device while the first holds it;
        // `essd --check` beside the first finds nothing wrong.
        let dir2 = tempdir("blk2");
        let err = start_fails(dir2.path(), &cfg);
        assert!(
            err.contains(
                "block device is in use (mounted, or opened exclusively by another program)"
            ),
            "{err}"
        );
        start_exits(dir2.path(), &cfg, &["--check"], 0);
        assert_eq!(essd.stop().code(), Some(0));
        // What the host wrote is on the device itself (flushed at shutdown).
        assert_eq!(sha256_file(&image), sha256_file(&src), "{engine}");

        // Configured larger than the device → refused.
        let mut big = cfg.clone();
        big.volumes[0].size = Some("64MiB");
        let err = start_fails(dir2.path(), &big);
        assert!(
            err.contains(
                "block device is 50331648 bytes, smaller than the configured size 67108864"
            ),
            "{err}"
        );
        assert_eq!(start_exits(dir2.path(), &big, &["--check"], 2), err);
    }
}

#[test]
fn fast_zero_with_no_hole_does_not_deprovision_a_block_device() {
    // NBD_CMD_FLAG_NO_HOLE: "the area MUST be fully provisioned". On a
    // block device a fast-only WRITE_ZEROES was done with PUNCH_HOLE (a
    // zero-out that may unmap) even with NO_HOLE: on a loop device (like a
    // thin volume) that punched a hole in the storage behind it. A fast
    // request may instead fail with ENOTSUP ("MAY depend on ... whether
    // the NBD_CMD_FLAG_NO_HOLE flag was present"), without changing the
    // export.
    require_root("losetup");
    require("losetup", "mount");
    for engine in ENGINES {
        let dir = tempdir("blk-nohole");
        let image = dir.path().join("disk.img");
        random_file(&image, 16 << 20, 5);
        let lo = LoopDevice::attach(&image);
        let cfg = device_config(engine, &lo.dev);
        let essd = Essd::start_in(dir.path(), &cfg);
        let out = python(
            r#"
import errno, nbd, os, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
before = h.pread(4 << 20, 1 << 20)
try:
    h.zero(4 << 20, 1 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    done = True
except nbd.Error as e:
    assert e.errno == errno.ENOTSUP or e.errno == "ENOTSUP", e
    done = False
h.flush()
after = h.pread(4 << 20, 1 << 20)
assert after == (bytes(4 << 20) if done else before), "contents"
fd = os.open(sys.argv[2], os.O_RDONLY)
print("first hole at", os.lseek(fd, 0, os.SEEK_HOLE))
"#,
            &[&essd.uri("000TST01"), &image.display().to_string()],
        );
        assert_eq!(
            out.trim(),
            format!("first hole at {}", 16 << 20),
            "{engine}: NO_HOLE zeroing left a hole behind the device"
        );
        assert_eq!(essd.stop().code(), Some(0));
    }
}

/// A raw disk with 4 KiB logical blocks (a loop device with `-b 4096`),
/// served with buffered I/O: a device discards and zeroes in place only
/// whole logical blocks, so a WRITE_ZEROES or TRIM of a range off the
/// 4 KiB boundaries (which clients may send: the export's minimum block
/// size is 1) must neither fail nor turn discards off for good. The zeroed
/// range reads zeroes and the bytes beside it are kept; a later aligned
/// trim still discards.
#[test]
fn a_device_with_4k_sectors_zeroes_and_trims_ranges_off_its_blocks() {
    for engine in ENGINES {
        let dir = tempdir("blk-4k");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let lo = LoopDevice::attach_with_sectors(&image, 4096);
        let cfg = device_config(engine, &lo.dev);
        let essd = Essd::start_in(dir.path(), &cfg);
        let out = python(
            r#"
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = random.Random(3).randbytes(1 << 20)
h.pwrite(data, 0)
h.zero(8192, 512)
h.trim(8192, 512 + (1 << 16))
h.flush()
back = h.pread(1 << 20, 0)
assert back[:512] == data[:512], "head of the zeroed range"
assert back[512:8704] == bytes(8192), "zeroed range"
assert back[8704:512 + (1 << 16)] == data[8704:512 + (1 << 16)], "tail of the zeroed range"
h.trim(1 << 19, 1 << 19)
h.flush()
assert h.pread(1 << 19, 1 << 19) == bytes(1 << 19), "an aligned trim discards"
print("ok")
"#,
            &[&essd.uri("000TST01")],
        );
        assert_eq!(out.trim(), "ok", "{engine}");
        assert_eq!(essd.stop().code(), Some(0));
    }
}

/// A raw disk that cannot zero in place (a loop device over a file on
/// ramfs): the kernel's zeroing of a range on such a device drops the
/// range's cached pages, written and not yet flushed ones too, before it
/// fails. So a WRITE_ZEROES with FAST_ZERO is refused (`ENOTSUP`) with the
/// range as the host last wrote it, and one without is done by writing
/// zeroes; both reach the device.
#[test]
fn a_fast_zero_refused_by_a_device_that_cannot_zero_keeps_unflushed_writes() {
    for engine in ENGINES {
        let dir = tempdir("blk-nozero");
        let fs = ScratchMount::mount("ramfs", "mode=0700", &dir.path().join("fs"));
        let image = fs.dir.join("disk.img");
        random_file(&image, 8 << 20, 9);
        let lo = LoopDevice::attach(&image);
        let cfg = device_config(engine, &lo.dev);
        let essd = Essd::start_in(dir.path(), &cfg);
        let out = python(
            r#"
import errno, nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = random.Random(4).randbytes(1 << 20)
h.pwrite(data, 1 << 20)
try:
    h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
    print("zeroed")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string))
print("kept" if h.pread(1 << 20, 1 << 20) == data else "lost")
h.zero(3 << 20, 1 << 20)
h.flush()
print("zeroes" if h.pread(1 << 20, 3 << 20) == bytes(1 << 20) else "data")
"#,
            &[&essd.uri("000TST01")],
        );
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["ENOTSUP", "kept", "zeroes"],
            "{engine}"
        );
        assert_eq!(essd.stop().code(), Some(0));
        drop(lo);
        let on_device = std::fs::read(&image).unwrap();
        assert!(
            on_device[3 << 20..4 << 20].iter().all(|&b| b == 0),
            "{engine}"
        );
        drop(fs);
    }
}
