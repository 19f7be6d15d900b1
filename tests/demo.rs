//! The README's first command, `essd --demo`, and the second site of its
//! PPRC demo, `essd --demo --site b`: both start on their embedded
//! configurations (fixed loopback ports 10809/10810 for NBD, 7410/7411 for
//! replication), the essctl commands site A prints set up a pair to site
//! B, what a host then writes to A is on B, and both stop cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A demo site running in its own directory; killed if the test fails.
struct DemoSite {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl DemoSite {
    /// Starts `essd --demo --site SITE` and waits for its banner.
    fn start(site: &str) -> DemoSite {
        let dir = tempdir(&format!("demo-{site}"));
        let out = std::fs::File::create(dir.path().join("banner.txt")).unwrap();
        let err = std::fs::File::create(dir.path().join("essd.log")).unwrap();
        let child = Command::new(essd_bin())
            .args(["--demo", "--site", site, "--dir"])
            .arg(dir.path())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn essd --demo");
        let mut demo = DemoSite {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !demo.banner().contains("Stop with Ctrl-C.") {
            if let Some(status) = demo.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "essd --demo --site {site} exited ({status}) before its banner:\n{}",
                    demo.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no banner after 30 s:\n{}",
                demo.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        demo
    }

    fn banner(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("banner.txt")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("essd.log")).unwrap_or_default()
    }

    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// SIGTERM; the exit status must be 0.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on the PID of a child this test started and has
        // not reaped yet; it touches no memory.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "essd exited {status}:\n{}", self.log());
    }
}

impl Drop for DemoSite {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The banner's command lines that contain `what`, as printed.
fn printed_commands(banner: &str, what: &str) -> Vec<String> {
    banner
        .lines()
        .filter(|l| l.starts_with("  ") && l.contains(what))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The checksum of a whole volume read over NBD.
fn volume_sha(uri: &str, scratch: &Path) -> String {
    let copy = scratch.join("volume.img");
    run(Command::new("nbdcopy").arg(uri).arg(&copy));
    let sha = sha256_file(&copy);
    std::fs::remove_file(&copy).unwrap();
    sha
}

#[test]
fn both_demo_sites_mirror_with_the_printed_commands() {
    require("nbdcopy", "libnbd-bin");
    let a = DemoSite::start("a");
    let b = DemoSite::start("b");
    let banner = a.banner();
    assert!(banner.contains("serial FCA31"), "{banner}");
    assert!(b.banner().contains("serial FCB02"), "{}", b.banner());
    assert!(
        banner.contains(&format!("{} --demo --site b", essd_bin())),
        "{banner}"
    );

    // The printed path, pair and wait commands, as a user would paste them.
    let mut commands = Vec::new();
    for what in ["pprc path establish", "pprc establish", "pprc wait"] {
        let found = printed_commands(&banner, what);
        assert_eq!(found.len(), 1, "{what:?} in:\n{banner}");
        commands.extend(found);
    }
    for command in &commands {
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null()));
        assert!(out.status.success(), "{command}: {out:?}");
    }

    let scratch = tempdir("demo-data");
    let data = scratch.path().join("data.bin");
    random_file(&data, 8 << 20, 41);
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&data)
        .arg("nbd://127.0.0.1:10809/000FCA31"));
    let show = run_text(
        Command::new(env!("CARGO_BIN_EXE_essctl"))
            .arg("--server")
            .arg(a.api())
            .args(["--json", "pprc", "show", "000FCA31"]),
    );
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(
        (show["state"].as_str(), show["replication_status"].as_str()),
        (Some("duplex"), Some("current")),
        "{show}"
    );
    assert_eq!(
        volume_sha("nbd://127.0.0.1:10809/000FCA31", scratch.path()),
        volume_sha("nbd://127.0.0.1:10810/000FCB02", scratch.path()),
        "site B does not hold what was written to site A"
    );
    let on_b = scratch.path().join("b.img");
    run(Command::new("nbdcopy")
        .arg("nbd://127.0.0.1:10810/000FCB02")
        .arg(&on_b));
    let (on_b, data) = (std::fs::read(&on_b).unwrap(), std::fs::read(&data).unwrap());
    assert!(
        on_b[..data.len()] == data[..],
        "site B does not hold the 8 MiB written to site A"
    );
    a.stop();
    b.stop();
}
