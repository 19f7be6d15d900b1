//! Process life cycle: systemd notification, SIGTERM/SIGINT finishing
//! in-flight requests, flushing and exiting 0 (also when it comes during
//! the start), SIGHUP ignored, and one server per state directory.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sd_notify_ready_and_stopping() {
    let dir = tempdir("notify");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cfg = TestConfig::new("uring");
    std::fs::write(dir.path().join("essd.toml"), cfg.render(dir.path())).unwrap();
    let essd = Essd::start_config_env(
        dir.path(),
        &dir.path().join("essd.toml"),
        "TST01",
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let status = essd.stop();
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(status.code(), Some(0));
}

/// Sends 64 writes, and once one has completed 64 more, then the
/// signal; prints the writes acknowledged, then (second line) how the
/// others failed.
const INFLIGHT: &str = r#"
import errno, nbd, os, signal, sys
uri, pid, sig = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
cookies = []
def send(blocks):
    for i in blocks:
        cookies.append((i, h.aio_pwrite(bytes([i % 255 + 1]) * 16384, i * 16384)))
send(range(64))
while h.aio_in_flight() == 64:
    h.poll(-1)
send(range(64, 128))
os.kill(pid, sig)
try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
ok, failed = [], set()
for i, c in cookies:
    try:
        if h.aio_command_completed(c):
            ok.append(i)
        else:
            failed.add("unanswered")
    except nbd.Error as e:
        failed.add(errno.errorcode.get(e.errnum, str(e.errnum)))
print(" ".join(map(str, ok)))
print(" ".join(sorted(failed)))
"#;

#[test]
fn sigterm_and_sigint_finish_in_flight_writes_and_exit_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempdir("drain");
        let essd = Essd::start_in(dir.path(), &TestConfig::new("uring"));
        let pid = essd.pid().to_string();
        let out = python(INFLIGHT, &[&essd.uri("000TST01"), &pid, &sig.to_string()]);
        let (acked, failed) = out.split_once('\n').unwrap();
        let acked: Vec<usize> = acked
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        // Received after the signal: not carried out, and told so.
        assert!(
            failed.split_whitespace().all(|e| e == "ESHUTDOWN"),
            "signal {sig}: {out}"
        );
        // Wait for the process to exit by itself (it got the signal already).
        let status = essd.stop();
        assert_eq!(status.code(), Some(0), "signal {sig}");
        let image = std::fs::read(dir.path().join("vol-10-0.img")).unwrap();
        for i in &acked {
            let block = &image[i * 16384..(i + 1) * 16384];
            assert!(
                block.iter().all(|&b| b == (*i % 255 + 1) as u8),
                "acknowledged write {i} missing"
            );
        }
        let log = std::fs::read_to_string(dir.path().join("essd.log")).unwrap();
        assert!(log.contains("volumes flushed; exiting failed=0"), "{log}");
        eprintln!(
            "signal {sig}: {} of 128 writes acknowledged before shutdown, others: {failed}",
            acked.len()
        );
    }
}

/// Two servers configured with one state directory would save their
/// records over each other's (the second's FlashCopy establish replaced
/// the first's relationships file): the second is refused at start-up
/// (exit 2), and the first keeps its records.
/// SIGHUP, whose default action would end the process without draining
/// or flushing, is logged and ignored: the server keeps serving and
/// still stops cleanly on SIGTERM.
#[test]
fn sighup_is_logged_and_ignored() {
    let dir = tempdir("hangup");
    let essd = Essd::start_in(dir.path(), &TestConfig::new("uring"));
    let uri = essd.uri("000TST01");
    python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         h.pwrite(b'h' * 4096, 0); h.flush()\n",
        &[&uri],
    );
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(essd.pid(), libc::SIGHUP) }, 0);
    essd.wait_log("SIGHUP ignored", Duration::from_secs(10));
    let read = python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         print(h.pread(4096, 0) == b'h' * 4096)\n",
        &[&uri],
    );
    assert_eq!(read.trim(), "True");
    assert_eq!(essd.stop().code(), Some(0));
}

/// Starts essd on `config` with its log (stderr) in `log`, not waiting
/// for it to be ready.
fn spawn_logging_to(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    Command::new(essd_bin())
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A SIGTERM that arrives while the server is still starting (after its
/// I/O engine is up) is kept: it starts, then stops cleanly, exit 0.
#[test]
fn a_sigterm_during_the_start_stops_the_server_once_up() {
    let dir = tempdir("early-term");
    let config = dir.path().join("essd.toml");
    let mut cfg = TestConfig::new("uring");
    cfg.volumes = (0..8).map(|n| Vol::new(0x10, n, "64MiB")).collect();
    std::fs::write(&config, cfg.render(dir.path())).unwrap();
    let log = dir.path().join("essd.log");
    let mut child = spawn_logging_to(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("I/O engine ready")
    {
        assert!(Instant::now() < deadline, "essd never started its engine");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("volumes flushed; exiting failed=0"), "{text}");
}

#[test]
fn a_second_server_on_the_same_state_directory_is_refused() {
    let (dir_a, dir_b) = (tempdir("state-owner"), tempdir("state-intruder"));
    let mut cfg_a = TestConfig::new("threads");
    cfg_a.volumes = vec![Vol::new(0x10, 0, "4MiB"), Vol::new(0x10, 1, "4MiB")];
    let mut a = Essd::start_in(dir_a.path(), &cfg_a);

    // Server B: another serial, its own volumes and sockets, A's state.
    let mut cfg_b = cfg_a.clone();
    cfg_b.serial = "TST02";
    let text = cfg_b.render(dir_b.path()).replace(
        &format!("state_dir = \"{}/state\"", dir_b.path().display()),
        &format!("state_dir = \"{}/state\"", dir_a.path().display()),
    );
    assert!(text.contains(&format!("{}/state", dir_a.path().display())));
    let config_b = dir_b.path().join("essd.toml");
    std::fs::write(&config_b, text).unwrap();
    let log_b = dir_b.path().join("essd.log");
    let mut b = spawn_logging_to(&config_b, &log_b);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        if let Some(status) = b.try_wait().unwrap() {
            break Some(status);
        }
        let log = std::fs::read_to_string(&log_b).unwrap_or_default();
        if log.contains("essd ready") || Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (source, target) = (a.vol(0x10, 0), a.vol(0x10, 1));
    essctl(
        &a,
        &[
            "flashcopy",
            "establish",
            &format!("{source}:{target}"),
            "--nocopy",
        ],
    )
    .ok();
    if exited.is_none() {
        // B runs: a relationship of its own saves its records over A's.
        let out = Command::new(env!("CARGO_BIN_EXE_essctl"))
            .arg("--server")
            .arg(dir_b.path().join("api.sock"))
            .args(["flashcopy", "establish", "000TST02:001TST02", "--nocopy"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let _ = b.kill();
        let _ = b.wait();
    }
    // A, restarted, still holds its relationship.
    a.kill_and_restart(cfg_a.serial);
    let list = essctl(&a, &["flashcopy", "list", "--json"]).json();
    assert_eq!(
        list["relationships"].as_array().map(Vec::len),
        Some(1),
        "server A lost its FlashCopy relationship: {list}"
    );
    let status = exited.expect("server B started on server A's state directory");
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "{}/state/essd.lock: cannot lock: another essd uses this state directory",
            dir_a.path().display()
        )),
        "{log}"
    );
}

/// The state directory is created private (0700); one that exists, maybe
/// shared with other programs, keeps its mode.
#[test]
fn a_state_directory_is_created_private_and_an_existing_one_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |dir: &std::path::Path| {
        std::fs::metadata(dir.join("state"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let mut cfg = TestConfig::new("threads");
    cfg.volumes = vec![Vol::new(0x10, 0, "4MiB")];
    let fresh = tempdir("state-fresh");
    let essd = Essd::start_in(fresh.path(), &cfg);
    assert_eq!(mode(fresh.path()), 0o700);
    assert!(essd.stop().success());
    let shared = tempdir("state-shared");
    std::fs::create_dir(shared.path().join("state")).unwrap();
    std::fs::set_permissions(
        shared.path().join("state"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let essd = Essd::start_in(shared.path(), &cfg);
    assert_eq!(mode(shared.path()), 0o755);
    assert!(essd.stop().success());
}
