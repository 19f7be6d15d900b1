//! The fault-injecting test proxy (`tests/common/proxy.rs`) in front of a
//! loopback echo server: forwarding, byte counters, stall/heal, drop, reset
//! and delay.

#[path = "common/proxy.rs"]
mod proxy;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use proxy::FaultProxy;

/// A loopback echo server that stops (and stops accepting) when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Polls `cond` for up to five seconds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forwards_both_ways_and_counts_exact_bytes() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut client = client.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || client.write_all(&data).unwrap())
    };
    let mut back = vec![0u8; data.len()];
    client.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "echoed bytes differ");

    let n = data.len() as u64;
    eventually("backward counter", || proxy.bytes_backward() == n);
    assert_eq!(proxy.bytes_forward(), n);
    assert_eq!(proxy.connections(), 1);

    proxy.reset_counters();
    assert_eq!((proxy.bytes_forward(), proxy.bytes_backward()), (0, 0));
    round_trip(&mut client, b"ping");
    eventually("counters after reset", || {
        (proxy.bytes_forward(), proxy.bytes_backward()) == (4, 4)
    });

    drop(client);
    eventually("connection to close", || proxy.connections() == 0);
}

#[test]
fn stall_holds_bytes_until_heal() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    round_trip(&mut client, b"before");
    eventually("counters", || proxy.bytes_backward() == 6);

    proxy.stall();
    client.write_all(b"held").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = client
        .read(&mut buf)
        .expect_err("stalled proxy delivered data");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(proxy.bytes_forward(), 6, "bytes crossed a stalled proxy");
    assert_eq!(
        proxy.connections(),
        1,
        "stall must keep the connection open"
    );

    // More data queues up behind it (in socket buffers) rather than crossing.
    let bulk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
    let writer = {
        let mut client = client.try_clone().unwrap();
        let bulk = bulk.clone();
        thread::spawn(move || client.write_all(&bulk).unwrap())
    };
    thread::sleep(Duration::from_millis(100));
    assert_eq!(proxy.bytes_forward(), 6, "bytes crossed a stalled proxy");

    proxy.heal();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"held");
    let mut bulk_back = vec![0u8; bulk.len()];
    client.read_exact(&mut bulk_back).unwrap();
    writer.join().unwrap();
    assert!(bulk_back == bulk, "held bytes came back altered");
    round_trip(&mut client, b"after");
}

#[test]
fn drop_all_closes_connections_and_refuses_new_ones() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    round_trip(&mut client, b"hello");
    eventually("connection to register", || proxy.connections() == 1);

    proxy.drop_all();
    assert_eq!(proxy.connections(), 0);
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if closed_error(&e) => {}
        Err(e) => panic!("the connection was not closed: {e}"),
        Ok(n) => panic!("read {n} bytes from a dropped connection"),
    }

    // A new connection is closed at once (or refused) while dropping.
    if let Ok(mut late) = TcpStream::connect(proxy.addr()) {
        late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = late.write_all(b"anyone?");
        match late.read(&mut buf) {
            Ok(0) => {}
            Err(e) if closed_error(&e) => {}
            Err(e) => panic!("the connection was not closed: {e}"),
            Ok(n) => panic!("read {n} bytes through a dropping proxy"),
        }
    }
    assert_eq!(proxy.connections(), 0);

    proxy.heal();
    let mut again = connect(&proxy);
    round_trip(&mut again, b"healed");
}

#[test]
fn reset_sends_rst_and_accepts_new_connections() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    round_trip(&mut client, b"hello");
    eventually("connection to register", || proxy.connections() == 1);

    proxy.reset();
    assert_eq!(proxy.connections(), 0);
    let mut buf = [0u8; 16];
    let err = client
        .read(&mut buf)
        .expect_err("read after reset succeeded");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");

    let mut again = connect(&proxy);
    round_trip(&mut again, b"still open");
}

#[test]
fn delay_adds_latency_each_way() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    round_trip(&mut client, b"warm");

    let d = Duration::from_millis(150);
    proxy.delay(d);
    let start = Instant::now();
    round_trip(&mut client, b"slow");
    let elapsed = start.elapsed();
    assert!(elapsed >= 2 * d, "round trip took {elapsed:?}, delay {d:?}");

    proxy.heal();
    round_trip(&mut client, b"fast");
}

#[test]
fn dropping_the_proxy_closes_everything() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.addr);
    let addr = proxy.addr();
    let mut client = connect(&proxy);
    round_trip(&mut client, b"hello");

    drop(proxy);
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if closed_error(&e) => {}
        Err(e) => panic!("the connection was not closed: {e}"),
        Ok(n) => panic!("read {n} bytes after the proxy was dropped"),
    }
    assert!(
        TcpStream::connect(addr).is_err(),
        "dropped proxy still accepts"
    );
}

/// A read error that means the other end closed (not a timeout).
fn closed_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}
