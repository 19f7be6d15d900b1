//! Fuzzes negotiation: arbitrary client bytes against a real server with
//! one small file-backed volume. Must never panic or hang.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use essd::config::Config;
use essd::io::Engine;
use essd::nbd::handshake::{negotiate, NegotiationSettings};
use essd::volume::server::StorageServer;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: StorageServer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("essd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        let text = format!(
            "[server]\nserial = \"FUZZ1\"\nstate_dir = \"{d}/state\"\nio_engine = \"threads\"\n[nbd]\nlisten = []\nunix = \"{d}/nbd.sock\"\n[api]\nunix = \"{d}/api.sock\"\n[[lss]]\nid = 0x10\n[[volume]]\nlss = 0x10\nnumber = 0\npath = \"{d}/v.img\"\nsize = \"1MiB\"\nalias = \"a\"\n",
            d = dir.display()
        );
        let _ = std::fs::remove_file(dir.join("v.img"));
        let cfg = Config::parse(&text, &PathBuf::from("<fuzz>")).expect("fuzz config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime.block_on(async {
            let engine = Engine::start(cfg.raw.server.io_engine).expect("engine");
            StorageServer::open(&cfg, engine).expect("server")
        });
        Fixture { runtime, server }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let settings = NegotiationSettings {
        preferred_block: 65536,
    };
    f.runtime.block_on(async {
        let (mut client, mut server_end) = tokio::io::duplex(1 << 20);
        client.write_all(data).await.ok();
        client.shutdown().await.ok();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            negotiate(&mut server_end, &f.server, &settings),
        )
        .await;
    });
});
