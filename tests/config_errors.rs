//! Bad configuration files: essd names the file, the field and the problem,
//! exits non-zero, and touches nothing on disk.

mod common;

use std::path::Path;
use std::process::Command;

fn base(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "[server]\nserial = \"FCA31\"\nstate_dir = \"{d}/state\"\n\n[nbd]\nlisten = []\nunix = \"{d}/nbd.sock\"\n\n[api]\nunix = \"{d}/api.sock\"\n\n[[lss]]\nid = 0x10\n\n[[volume]]\nlss = 0x10\nnumber = 0\npath = \"{d}/a.img\"\nsize = \"1MiB\"\n"
    )
}

/// Runs essd on `text`; returns (exit code, last line of stderr).
fn start(dir: &Path, text: &str) -> (Option<i32>, String) {
    common::start_to_exit(&dir.join("bad.toml"), text, &[])
}

#[test]
fn each_bad_field_gets_an_exact_message_and_nothing_is_created() {
    let dir = common::tempdir("badcfg");
    let d = dir.path();
    let good = base(d);
    let file = d.join("bad.toml");
    let f = file.display();
    let cases: Vec<(String, String)> = vec![
        (good.replace("serial = \"FCA31\"", "serial = 5"),
         format!("essd: {f}: server.serial: invalid type: integer `5`, expected a string (line 2, column 10)")),
        (good.replace("serial = \"FCA31\"", "serial = \"FCA3\""),
         format!("essd: {f}: server.serial: serial \"FCA3\" must be exactly 5 characters from 0-9 and A-Z")),
        (good.replace("serial = \"FCA31\"\n", ""),
         format!("essd: {f}: server: missing field `serial` (line 1, column 1)")),
        (good.replace("id = 0x10", "id = \"sixteen\""),
         format!("essd: {f}: lss[0].id: invalid type: string \"sixteen\", expected u32 (line 13, column 6)")),
        (good.replace("id = 0x10", "id = 0x20"),
         format!("essd: {f}: lss[0].id: 0x20 is outside 0x10..0x1F")),
        (good.replace("lss = 0x10", "lss = 0x11"),
         format!("essd: {f}: volume[0].lss: LSS 0x11 is not defined in [[lss]]")),
        (good.replace("number = 0", "number = 256"),
         format!("essd: {f}: volume[0].number: 256 is outside 0..255")),
        (good.replace("number = 0", "number = -1"),
         format!("essd: {f}: volume[0].number: invalid value: integer `-1`, expected u32 (line 17, column 10)")),
        (good.replace("size = \"1MiB\"", "size = \"1 furlong\""),
         format!("essd: {f}: volume[0].size: invalid size \"1 furlong\": unknown unit (examples: \"4096\", \"64KiB\", \"1GiB\") (line 19, column 8)")),
        (good.replace("id = 0x10", "id = 0x10\nconsistency_timeout = \"soon\""),
         format!("essd: {f}: lss[0].consistency_timeout: invalid duration \"soon\": no number (examples: \"5s\", \"500ms\", \"2m\") (line 14, column 23)")),
        (good.replace("id = 0x10", "id = 0x10\ncritical_heavy = \"yes\""),
         format!("essd: {f}: lss[0].critical_heavy: invalid type: string \"yes\", expected a boolean (line 14, column 18)")),
        (good.replace("size = \"1MiB\"", "size = true"),
         format!("essd: {f}: volume[0].size: invalid type: boolean `true`, expected a size such as 4096, \"64KiB\" or \"1GiB\" (line 19, column 8)")),
        (good.replace("path = ", "pathh = "),
         format!("essd: {f}: volume[0].pathh: unknown field `pathh`, expected one of `lss`, `number`, `path`, `size`, `read_only`, `direct_io`, `description`, `alias` (line 18, column 1)")),
        (good.replace("size = \"1MiB\"", "size = \"1MiB\"\nread_only = \"yes\""),
         format!("essd: {f}: volume[0].read_only: invalid type: string \"yes\", expected a boolean (line 20, column 13)")),
        (good.replace("listen = []", "listen = [\"localhost\"]"),
         format!("essd: {f}: nbd.listen[0]: \"localhost\" is not an address:port such as \"127.0.0.1:10809\" or \"[::1]:10809\"")),
        (good.replace("listen = []", "listen = \"127.0.0.1:10809\""),
         format!("essd: {f}: nbd.listen: invalid type: string \"127.0.0.1:10809\", expected a sequence (line 6, column 10)")),
        (format!("{good}\n[[volume]]\nlss = 0x10\nnumber = 0\npath = \"{}/b.img\"\nsize = \"1MiB\"\n", d.display()),
         format!("essd: {f}: volume[1].number: duplicate volume ID 000FCA31 (also volume[0])")),
        (format!("{good}\n[[volume]]\nlss = 0x10\nnumber = 1\npath = \"{}/./a.img\"\nsize = \"1MiB\"\n", d.display()),
         format!("essd: {f}: volume[1].path: {}/./a.img is already the backing of volume[0]", d.display())),
        (good.replace("track_size", "x").replace("[nbd]", "track_size = \"48KiB\"\n[nbd]"),
         format!("essd: {f}: server.track_size: 48KiB must be a power of two between 4KiB and 1MiB")),
        (good.replace("[nbd]", "workers = 0\n[nbd]"),
         format!("essd: {f}: server.workers: 0 must be between 1 and 256")),
        (good.replace("[nbd]", "scheduling = \"fast\"\n[nbd]"),
         format!("essd: {f}: server.scheduling: unknown variant `fast`, expected `normal` or `batch` (line 5, column 14)")),
        (good.replace("size = \"1MiB\"\n", ""),
         format!("essd: {f}: volume[0] (000FCA31): {}/a.img: file does not exist and no size is configured", d.display())),
        ("this is not toml".to_string(),
         format!("essd: {f}: expected `.`, `=` (line 1, column 6)")),
    ];
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let (code, stderr) = start(d, &text);
        assert_eq!(code, Some(2), "exit code for:\n{text}\nstderr: {stderr}");
        if stderr != expected {
            wrong.push(format!("got:  {stderr}\nwant: {expected}"));
        }
        assert!(
            !d.join("state").exists(),
            "state dir created for a bad config"
        );
        assert!(
            !d.join("a.img").exists(),
            "volume file created for a bad config"
        );
    }
    assert!(wrong.is_empty(), "wrong messages:\n{}", wrong.join("\n"));
}

#[test]
fn missing_file_and_size_mismatch() {
    let dir = common::tempdir("badcfg2");
    let d = dir.path();
    let out = Command::new(common::essd_bin())
        .args(["--config", "/nonexistent/essd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end().lines().last().unwrap(),
        "essd: /nonexistent/essd.toml: cannot read config file: No such file or directory (os error 2)"
    );
    // An existing backing file of another size is refused, not resized,
    // and a second volume's missing file is not created.
    std::fs::write(d.join("a.img"), vec![7u8; 4096]).unwrap();
    let text = format!(
        "{}\n[[volume]]\nlss = 0x10\nnumber = 1\npath = \"{}/b.img\"\nsize = \"1MiB\"\n",
        base(d),
        d.display()
    );
    let (code, stderr) = start(d, &text);
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        format!(
            "essd: {}/bad.toml: volume[0] (000FCA31): {}/a.img: existing file is 4096 bytes but the configured size is 1048576; fix the size (essd never truncates or grows a backing file)",
            d.display(),
            d.display()
        )
    );
    // --check says the same.
    assert_eq!(
        common::start_to_exit(&d.join("bad.toml"), &text, &["--check"]),
        (code, stderr)
    );
    assert_eq!(std::fs::read(d.join("a.img")).unwrap(), vec![7u8; 4096]);
    assert!(!d.join("b.img").exists());
    // --check validates without starting.
    let good = d.join("good.toml");
    std::fs::write(&good, base(d).replace("a.img", "c.img")).unwrap();
    let out = Command::new(common::essd_bin())
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        format!(
            "{}: configuration is valid (1 volume; the backings and the records in {} agree with it)",
            good.display(),
            d.join("state").display()
        )
    );
    assert!(!d.join("c.img").exists());
}

/// Runs essd on each text: exit status 2, exactly the expected last line
/// on stderr, and no state directory or volume file created.
fn expect_refused(d: &Path, cases: Vec<(String, String)>) {
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let (code, stderr) = start(d, &text);
        assert_eq!(code, Some(2), "exit code for:\n{text}\nstderr: {stderr}");
        if stderr != expected {
            wrong.push(format!("got:  {stderr}\nwant: {expected}"));
        }
        assert!(
            !d.join("state").exists() && !d.join("a.img").exists(),
            "state dir or volume created for:\n{text}\nstderr: {stderr}"
        );
    }
    assert!(wrong.is_empty(), "wrong messages:\n{}", wrong.join("\n"));
}

/// `[replication]` and `[[peer]]` problems, each named by its key; nothing
/// is created and no listener opened. A secret file must be absolute (a
/// service's working directory is `/`) and hold a secret long enough, and
/// is named when it does not.
#[test]
fn replication_settings_are_checked_before_anything_is_created() {
    let dir = common::tempdir("badcfg-pprc");
    let d = dir.path();
    let port = common::free_port();
    let good = base(d).replace("listen = []", &format!("listen = [\"127.0.0.1:{port}\"]"));
    let secret = "secret = \"0123456789abcdef\"";
    let rep = |body: &str| format!("{good}\n[replication]\n{body}\n");
    let peer = |serial: &str, address: &str| {
        format!("\n[[peer]]\nserial = \"{serial}\"\naddress = \"{address}\"\n")
    };
    std::fs::write(d.join("short.secret"), "too short\n").unwrap();
    let file = d.join("bad.toml");
    let f = file.display();
    let cases: Vec<(String, String)> = vec![
        (rep("secret_file = \"pprc.secret\""),
         format!("essd: {f}: replication.secret_file: pprc.secret must be an absolute path")),
        (rep(&format!("secret_file = \"{}/short.secret\"", d.display())),
         format!("essd: {f}: replication.secret_file: the shared secret in {}/short.secret must be at least 16 bytes, not 9", d.display())),
        (rep(&format!("secret_file = \"{}/none.secret\"", d.display())),
         format!("essd: {f}: replication.secret_file: cannot read {}/none.secret: No such file or directory (os error 2)", d.display())),
        (rep("secret = \"\""),
         format!("essd: {f}: replication.secret: the shared secret must be at least 16 bytes")),
        (rep("listen = \"127.0.0.1:7410\""),
         format!("essd: {f}: replication.secret: a shared secret is required")),
        (rep(&format!("{secret}\nlisten = \"peer-a:7410\"")),
         format!("essd: {f}: replication.listen: \"peer-a:7410\" is not an address:port such as \"0.0.0.0:7410\"")),
        (rep(&format!("{secret}\ntimeout = \"5 secs\"")),
         format!("essd: {f}: replication.timeout: invalid duration \"5 secs\": unknown unit (examples: \"5s\", \"500ms\", \"2m\") (line 23, column 11)")),
        (format!("{}{}", rep(secret), peer("FCA31", "127.0.0.1:7411")),
         format!("essd: {f}: peer[0].serial: FCA31 is this server's own serial")),
        (format!("{}{}{}", rep(secret), peer("FCB02", "127.0.0.1:7411"), peer("FCB02", "127.0.0.1:7412")),
         format!("essd: {f}: peer[1].serial: duplicate peer FCB02")),
        (format!("{}{}", rep(secret), peer("FCB02", "192.0.2.7")),
         format!("essd: {f}: peer[0].address: \"192.0.2.7\" is not an address:port such as \"192.0.2.7:7410\"")),
        (format!("{good}{}", peer("FCB02", "127.0.0.1:7411")),
         format!("essd: {f}: replication: peers are configured but [replication] (with the shared secret) is missing")),
    ];
    expect_refused(d, cases);
}

/// Two listeners on one port (the replication listener on the NBD port,
/// say) are refused by name before anything is created: essd used to fail
/// at the second bind, after creating its state directory and volumes.
#[test]
fn listeners_sharing_a_port_are_refused_before_anything_is_created() {
    let dir = common::tempdir("badcfg-listen");
    let d = dir.path();
    let port = common::free_port();
    let good = base(d).replace("listen = []", &format!("listen = [\"127.0.0.1:{port}\"]"));
    let rep = |listen: &str| {
        format!("{good}\n[replication]\nsecret = \"0123456789abcdef\"\nlisten = \"{listen}\"\n")
    };
    let f = d.join("bad.toml");
    let f = f.display();
    let taken = |key: &str, addr: &str| {
        format!(
            "essd: {f}: {key}: {addr} takes the port of nbd.listen[0] (127.0.0.1:{port}); each listener needs its own"
        )
    };
    let cases: Vec<(String, String)> = vec![
        (
            rep(&format!("127.0.0.1:{port}")),
            taken("replication.listen", &format!("127.0.0.1:{port}")),
        ),
        (
            rep(&format!("0.0.0.0:{port}")),
            taken("replication.listen", &format!("0.0.0.0:{port}")),
        ),
        (
            good.replace(
                "[api]\n",
                &format!("[api]\nlisten = \"127.0.0.1:{port}\"\n"),
            ),
            taken("api.listen", &format!("127.0.0.1:{port}")),
        ),
    ];
    expect_refused(d, cases);
    // Other addresses on the same port, and port 0 twice, are fine.
    let ok =
        rep(&format!("127.0.0.2:{port}")).replace("[api]\n", "[api]\nlisten = \"127.0.0.1:0\"\n");
    let ok = ok.replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!("listen = [\"127.0.0.1:0\", \"127.0.0.1:{port}\"]"),
    );
    let path = d.join("ok.toml");
    std::fs::write(&path, ok).unwrap();
    let out = Command::new(common::essd_bin())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
