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
    start_config(dir, TestConfig::new("uring"))
}

/// Starts `cfg` with a replication listener and the peers FCA31 and FCC03.
fn start_config(dir: &std::path::Path, mut cfg: TestConfig) -> (Essd, SocketAddr) {
    cfg.extra = format!(
        "\n[replication]\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\n\n[[peer]]\nserial = \"FCA31\"\naddress = \"127.0.0.1:9\"\n\n[[peer]]\nserial = \"FCC03\"\naddress = \"127.0.0.1:9\"\n"
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
        copy: false,
        data: Bytes::from_static(b"not a secondary"),
    };
    assert_eq!(
        link.request(write).await.unwrap(),
        essd::nbd::proto::errno::EPERM
    );
    link.close().await.unwrap();

    let wrong = PeerLink::connect(addr, &me, &them, b"a wrong secret, long enough", limit).await;
    assert!(
        matches!(wrong, Err(LinkError::ProofRefused(ref s)) if s == "TST01"),
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

/// Polls `essctl --json pprc path list` until `pred` holds for the first path.
fn wait_for_path(
    essd: &Essd,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = essctl(essd, &["--json", "pprc", "path", "list"]).json();
        if pred(&list["paths"][0]) {
            return list["paths"][0].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "path never became {what}: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn paths_open_monitor_and_reopen_their_links() {
    let port = free_port();
    let dir_b = tempdir("pprc-b");
    let mut cfg_b = TestConfig::new("uring");
    cfg_b.serial = "TSTB2";
    cfg_b.extra =
        format!("\n[replication]\nlisten = \"127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\n");
    let b = Essd::start_in(dir_b.path(), &cfg_b);

    let dir_a = tempdir("pprc-a");
    let mut cfg_a = TestConfig::new("uring");
    cfg_a.extra = format!(
        "\n[replication]\nsecret = \"{SECRET}\"\n\n[[peer]]\nserial = \"TSTB2\"\naddress = \"127.0.0.1:{port}\"\n"
    );
    let a = Essd::start_in(dir_a.path(), &cfg_a);

    let out = essctl(
        &a,
        &[
            "pprc",
            "path",
            "establish",
            "0x10",
            "TSTB2",
            "0x10",
            "--links",
            "3",
        ],
    );
    assert_eq!(out.ok().lines().count(), 4, "{out:?}");
    let path = wait_for_path(&a, "up", |p| p["state"] == "up");
    assert_eq!(path["links"].as_array().unwrap().len(), 3);
    assert_eq!(path["peer_address"], format!("127.0.0.1:{port}"));

    // Establish options and refusals.
    essctl(&a, &["pprc", "path", "establish", "0x10", "TSTB2", "0x10"]).refused(
        "path 0x10 → TSTB2 0x10 already exists; establish with --if-not-exists to keep it or \
             --force to replace it (API: \"if_not_exists\" or \"force\": true)",
    );
    essctl(
        &a,
        &[
            "pprc",
            "path",
            "establish",
            "0x10",
            "TSTB2",
            "0x10",
            "--if-not-exists",
        ],
    )
    .ok();
    essctl(&a, &["pprc", "path", "establish", "0x10", "ZZZ99", "0x10"])
        .refused("peer ZZZ99 is not configured ([[peer]] in the configuration)");
    essctl(&a, &["pprc", "path", "establish", "0x12", "TSTB2", "0x10"])
        .refused("LSS 0x12 is not defined on this server");
    essctl(&a, &["pprc", "path", "establish", "0x10", "TSTB2", "0x11"])
        .refused("TSTB2 refused the path: no LSS 0x11 is configured");
    let paths = essctl(&a, &["--json", "pprc", "path", "list"]).json();
    assert_eq!(paths["paths"].as_array().map(Vec::len), Some(1), "{paths}");

    // The peer dies: every link goes down, with a reason.
    b.kill();
    let down = wait_for_path(&a, "down", |p| p["state"] == "down");
    for link in down["links"].as_array().unwrap() {
        assert_eq!(link["state"], "down");
        assert!(!link["reason"].as_str().unwrap().is_empty(), "{link}");
    }
    // It comes back on the same address: the links reopen by themselves.
    let b = Essd::start_config(dir_b.path(), &dir_b.path().join("essd.toml"), "TSTB2");
    wait_for_path(&a, "up again", |p| p["state"] == "up");

    // Paths are recorded: after a restart the server reopens them.
    assert_eq!(a.stop().code(), Some(0));
    let a = Essd::start_config(dir_a.path(), &dir_a.path().join("essd.toml"), "TST01");
    let again = wait_for_path(&a, "reopened after a restart", |p| p["state"] == "up");
    assert_eq!(again["links"].as_array().unwrap().len(), 3);

    let out = essctl(&a, &["pprc", "path", "remove", "0x10", "TSTB2", "0x10"]);
    assert_eq!(out.ok(), "removed path 0x10 → TSTB2 0x10\n");
    assert_eq!(
        essctl(&a, &["pprc", "path", "list"]).ok(),
        "no PPRC paths\n"
    );
    essctl(&a, &["pprc", "path", "remove", "0x10", "TSTB2", "0x10"])
        .refused("no path 0x10 → TSTB2 0x10");
    let log = essctl(&a, &["--json", "log"]).json();
    let events: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.contains(&"pprc.path.establish") && events.contains(&"pprc.path.remove"),
        "{events:?}"
    );
    assert_eq!(a.stop().code(), Some(0));
    assert_eq!(b.stop().code(), Some(0));
}

/// A client without the secret claims the listener's own serial and
/// nonce and sends back the proof the listener sent it; then it makes a
/// volume "its" secondary and writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflected_proof_does_not_reach_a_volume() {
    use bytes::BytesMut;
    use essd::copy::pprc::link::{read_frame, write_frame};
    use essd::copy::pprc::wire::{Frame, VERSION};
    let dir = tempdir("pprc-reflect");
    let (essd, addr) = start(dir.path());
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    let Message::Hello { serial, nonce, .. } =
        read_frame(&mut stream, &mut buf).await.unwrap().message
    else {
        panic!("no hello")
    };
    let hello = Message::Hello {
        version: VERSION,
        serial,
        peer: serial,
        nonce,
    };
    write_frame(
        &mut stream,
        &Frame {
            id: 0,
            message: hello,
        },
    )
    .await
    .unwrap();
    let mut owned = false;
    if let Ok(Frame {
        message: Message::Auth { proof },
        ..
    }) = read_frame(&mut stream, &mut buf).await
    {
        let _ = write_frame(
            &mut stream,
            &Frame {
                id: 0,
                message: Message::Auth { proof },
            },
        )
        .await;
        let request = serde_json::json!({"op": "become-secondary", "volume": "000TST01",
            "primary": "000TST01", "size": 0, "permit_online": true});
        let control = Message::Control {
            body: Bytes::from(request.to_string()),
        };
        let _ = write_frame(
            &mut stream,
            &Frame {
                id: 1,
                message: control,
            },
        )
        .await;
        let write = Message::Write {
            volume: *b"000TST01",
            offset: 0,
            fua: true,
            copy: false,
            data: Bytes::from(vec![0xAB; 4096]),
        };
        let _ = write_frame(
            &mut stream,
            &Frame {
                id: 2,
                message: write,
            },
        )
        .await;
        let mut answers = Vec::new();
        while let Ok(Ok(frame)) =
            tokio::time::timeout(Duration::from_secs(3), read_frame(&mut stream, &mut buf)).await
        {
            answers.push(frame);
            if answers.len() == 2 {
                break;
            }
        }
        owned = answers
            .iter()
            .any(|f| f.id == 2 && f.message == Message::Ack { error: 0 });
        eprintln!("answers: {answers:?}");
    }
    drop(stream);
    let image = std::fs::read(dir.path().join("vol-10-0.img")).unwrap();
    let written = image.iter().take(4096).all(|&b| b == 0xAB);
    assert_eq!(essd.stop().code(), Some(0));
    assert!(
        !owned && !written,
        "a client without the secret wrote 000TST01 (acknowledged: {owned}, on disk: {written})"
    );
}

/// Opens a link to the listener at `addr` as peer `serial`.
async fn link_as(addr: SocketAddr, serial: &str) -> PeerLink {
    let me = Serial::new(serial).unwrap();
    let them = Serial::new("TST01").unwrap();
    PeerLink::connect(addr, &me, &them, SECRET.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap()
}

/// Asks the listener to make `volume` the secondary of `primary`.
async fn become_secondary(link: &PeerLink, volume: &str, primary: &str) -> Result<Bytes, String> {
    let request = serde_json::json!({"op": "become-secondary", "volume": volume,
        "primary": primary, "size": 1 << 20, "permit_online": true});
    link.control(&request, Duration::from_secs(5))
        .await
        .unwrap()
}

/// A 4 KiB mirrored write of `byte` at offset 0 of 000TST01.
fn write_of(byte: u8) -> Message {
    Message::Write {
        volume: *b"000TST01",
        offset: 0,
        fua: true,
        copy: false,
        data: Bytes::from(vec![byte; 4096]),
    }
}

/// The secondary of one peer, named by its alias, is not another peer's to
/// take: neither a second pair nor a terminate reaches it that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_peer_cannot_take_a_secondary_by_its_alias() {
    let dir = tempdir("pprc-alias");
    let mut cfg = TestConfig::new("uring");
    cfg.volumes[0].alias = Some("db");
    let (essd, addr) = start_config(dir.path(), cfg);
    let owner = link_as(addr, "FCA31").await;
    become_secondary(&owner, "000TST01", "000FCA31")
        .await
        .unwrap();

    let intruder = link_as(addr, "FCC03").await;
    let taken = become_secondary(&intruder, "db", "000FCC03").await;
    assert!(
        taken.is_err(),
        "FCC03 made 000TST01 its secondary too: {taken:?}"
    );
    let request = serde_json::json!({"op": "terminate", "volume": "db", "primary": "000FCC03"});
    let _ = intruder
        .control(&request, Duration::from_secs(5))
        .await
        .unwrap();

    // Still the secondary of FCA31 alone: read-only to hosts, FCA31's
    // changes land.
    let show = essctl(&essd, &["--json", "volume", "show", "000TST01"]).json();
    assert_eq!(show["pprc_secondary"], true, "{show}");
    let pairs = essctl(&essd, &["--json", "pprc", "list"]).json();
    assert_eq!(pairs["pairs"].as_array().unwrap().len(), 1, "{pairs}");
    assert_eq!(owner.request(write_of(0xAB)).await.unwrap(), 0);
    owner.close().await.unwrap();
    intruder.close().await.unwrap();
    assert_eq!(essd.stop().code(), Some(0));
}

/// A change from a peer whose secondary the volume is not answers EPERM,
/// also when the volume is the suspended secondary of another peer (whose
/// own changes answer ESHUTDOWN, "suspended at the secondary").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_peers_secondary_refuses_changes_with_eperm() {
    use essd::nbd::proto::errno;
    let dir = tempdir("pprc-other-peer");
    let (essd, addr) = start(dir.path());
    let owner = link_as(addr, "FCA31").await;
    become_secondary(&owner, "000TST01", "000FCA31")
        .await
        .unwrap();
    let other = link_as(addr, "FCC03").await;
    assert_eq!(other.request(write_of(0xCD)).await.unwrap(), errno::EPERM);
    essctl(&essd, &["pprc", "suspend", "000TST01"]).ok();
    assert_eq!(
        owner.request(write_of(0xAB)).await.unwrap(),
        errno::ESHUTDOWN
    );
    assert_eq!(other.request(write_of(0xCD)).await.unwrap(), errno::EPERM);
    let image = std::fs::read(dir.path().join("vol-10-0.img")).unwrap();
    assert!(image.iter().take(4096).all(|&b| b == 0));
    owner.close().await.unwrap();
    other.close().await.unwrap();
    assert_eq!(essd.stop().code(), Some(0));
}
