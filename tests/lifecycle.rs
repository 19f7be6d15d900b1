//! Process life cycle: systemd notification, and SIGTERM/SIGINT finishing
//! in-flight requests, flushing and exiting 0.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

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

const INFLIGHT: &str = r#"
import nbd, os, signal, sys
uri, pid, sig = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
cookies = []
for i in range(64):
    cookies.append((i, h.aio_pwrite(bytes([i + 1]) * 16384, i * 16384)))
os.kill(pid, sig)
done = 0
try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
ok = []
for i, c in cookies:
    try:
        if h.aio_command_completed(c):
            ok.append(i)
    except nbd.Error:
        pass
print(" ".join(map(str, ok)))
"#;

#[test]
fn sigterm_and_sigint_finish_in_flight_writes_and_exit_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempdir("drain");
        let essd = Essd::start_in(dir.path(), &TestConfig::new("uring"));
        let pid = essd.pid().to_string();
        let out = python(INFLIGHT, &[&essd.uri("000TST01"), &pid, &sig.to_string()]);
        let acked: Vec<usize> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
        // Wait for the process to exit by itself (it got the signal already).
        let status = essd.stop();
        assert_eq!(status.code(), Some(0), "signal {sig}");
        let image = std::fs::read(dir.path().join("vol-10-0.img")).unwrap();
        for i in &acked {
            let block = &image[i * 16384..(i + 1) * 16384];
            assert!(
                block.iter().all(|&b| b == (*i + 1) as u8),
                "acknowledged write {i} missing"
            );
        }
        let log = std::fs::read_to_string(dir.path().join("essd.log")).unwrap();
        assert!(log.contains("volumes flushed; exiting failed=0"), "{log}");
        eprintln!(
            "signal {sig}: {} of 64 writes acknowledged before shutdown",
            acked.len()
        );
    }
}
