//! The PPRC peer-link listener of a real essd: peers authenticate with the
//! shared secret from the configuration, and an authenticated peer still
//! cannot write a volume that is not a PPRC secondary.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use essd::copy::pprc::link::{LinkError, PeerLink};
use essd::copy::pprc::wire::Message;
use essd::volume::id::Serial;

const SECRET: &str = "correct horse battery staple";

fn start(dir: &std::path::Path) -> (Essd, SocketAddr) {
    let mut cfg = TestConfig::new("uring");
    cfg.extra = format!(
        "\n[replication]\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\n\n[[peer]]\nserial = \"FCA31\"\naddress = \"127.0.0.1:9\"\n"
    );
    let essd = Essd::start_in(dir, &cfg);
    let server = essctl(&essd, &["--json", "server"]).json();
    let addr = server["listeners"]["replication"]
        .as_str()
        .unwrap_or_else(|| panic!("no replication listener in {server}"))
        .parse()
        .unwrap();
    let table = essctl(&essd, &["server"]);
    assert!(
        table.ok().contains(&format!("Replication  {addr}")),
        "{table:?}"
    );
    (essd, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_authenticate_and_only_secondaries_take_changes() {
    let dir = tempdir("pprc-link");
    let (essd, addr) = start(dir.path());
    let me = Serial::new("FCA31").unwrap();
    let them = Serial::new("TST01").unwrap();
    let limit = Duration::from_secs(5);

    let link = PeerLink::connect(addr, &me, &them, SECRET.as_bytes(), limit)
        .await
        .unwrap();
    assert_eq!(link.peer().serial, "TST01");
    assert_eq!(
        link.request(Message::Heartbeat { unix_ms: 1 })
            .await
            .unwrap(),
        0
    );
    let write = Message::Write {
        volume: *b"000TST01",
        offset: 0,
        fua: false,
        data: Bytes::from_static(b"not a secondary"),
    };
    assert_eq!(
        link.request(write).await.unwrap(),
        essd::nbd::proto::errno::EPERM
    );
    link.close().await.unwrap();

    let wrong = PeerLink::connect(addr, &me, &them, b"a wrong secret, long enough", limit).await;
    assert!(
        matches!(wrong, Err(LinkError::AuthFailed(ref s)) if s == "TST01"),
        "{wrong:?}"
    );
    let other = PeerLink::connect(
        addr,
        &me,
        &Serial::new("ZZZ99").unwrap(),
        SECRET.as_bytes(),
        limit,
    )
    .await;
    assert_eq!(
        other.unwrap_err().to_string(),
        "peer identifies as TST01, expected ZZZ99"
    );

    // Nothing reached the volume.
    let image = std::fs::read(dir.path().join("vol-10-0.img")).unwrap();
    assert!(image.iter().all(|&b| b == 0));
    assert_eq!(essd.stop().code(), Some(0));
    let log = std::fs::read_to_string(dir.path().join("essd.log")).unwrap();
    assert!(log.contains("peer link refused or failed"), "{log}");
}
