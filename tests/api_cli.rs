//! The management API and `essctl` against a real `essd` process: output of
//! every read-only command, `--json` fields, exit codes, users over the
//! Unix socket, and HTTP Basic authentication on the TCP listener.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use essd::cli::client::{Client, Credentials, Endpoint};
use serde_json::Value;

mod common;
use common::Run;

const ESSD: &str = env!("CARGO_BIN_EXE_essd");
const ESSCTL: &str = env!("CARGO_BIN_EXE_essctl");
const SERIAL: &str = "APIT1";
const MIB: u64 = 1 << 20;

/// Writes the test configuration: LSS 0x10 with a 16 MiB volume (alias
/// `boot`) and an 8 MiB volume, LSS 0x11 with a 4 MiB read-only volume.
fn write_config(dir: &Path, api_listen: Option<&str>) -> PathBuf {
    let d = dir.display();
    let listen = api_listen
        .map(|a| format!("listen = \"{a}\"\n"))
        .unwrap_or_default();
    let text = format!(
        r#"[server]
serial = "{SERIAL}"
name = "api-test"
state_dir = "{d}/state"
track_size = "64KiB"
io_engine = "threads"
workers = 3
scheduling = "batch"

[nbd]
listen = []
unix = "{d}/nbd.sock"

[api]
unix = "{d}/api.sock"
{listen}
[[lss]]
id = 0x10

[[lss]]
id = 0x11

[[volume]]
lss = 0x10
number = 0
path = "{d}/vol-000.img"
size = "16MiB"
alias = "boot"
description = "boot disk"

[[volume]]
lss = 0x10
number = 1
path = "{d}/vol-001.img"
size = "8MiB"

[[volume]]
lss = 0x11
number = 0
path = "{d}/vol-100.img"
size = "4MiB"
read_only = true
"#
    );
    // A read-only volume needs an existing backing file.
    let ro = dir.join("vol-100.img");
    if !ro.exists() {
        std::fs::File::create(&ro)
            .and_then(|f| f.set_len(4 * MIB))
            .expect("create read-only backing");
    }
    let path = dir.join("essd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A running `essd`; stopped (SIGTERM, then SIGKILL) on drop.
struct Essd {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl Essd {
    /// Starts `essd` on `dir` and waits until the API socket answers.
    fn start(dir: &Path, api_listen: Option<&str>) -> Essd {
        Essd::start_limited(dir, api_listen, None)
    }

    /// [`Essd::start`] with at most `nofile` open file descriptors.
    fn start_limited(dir: &Path, api_listen: Option<&str>, nofile: Option<u64>) -> Essd {
        use std::os::unix::process::CommandExt;
        let config = write_config(dir, api_listen);
        let log = dir.join("essd.log");
        let stderr = std::fs::File::create(&log).expect("create log");
        let mut command = Command::new(ESSD);
        if let Some(limit) = nofile {
            // SAFETY: setrlimit is async-signal-safe and only touches the
            // child's own limits.
            unsafe {
                command.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn essd");
        let mut essd = Essd {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
        };
        essd.wait_ready();
        essd
    }

    fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn unix_client(&self) -> Client {
        Client::new(Endpoint::Unix(self.api_socket()), None).with_timeout(Duration::from_secs(5))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = self.unix_client().get("/v1/health") {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "essd exited with {status} before answering:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "essd did not answer on {} in time:\n{}",
                self.api_socket().display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` over the Unix socket, as JSON.
    fn get_json(&self, path: &str) -> Value {
        let r = self.unix_client().get(path).expect("API request");
        assert_eq!(r.status, 200, "GET {path}: {}", r.error_message());
        serde_json::from_slice(&r.body).expect("JSON body")
    }

    /// Stops the server gracefully and checks it exits 0.
    fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let status = terminate(&mut child);
        assert!(
            status.success(),
            "essd exited with {status}:\n{}",
            self.log_text()
        );
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait for essd");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Essd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }
}

/// Runs `essctl` with a clean environment plus `env`, feeding `stdin`.
fn essctl_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(ESSCTL);
    cmd.args(args)
        .env_remove("ESSCTL_SERVER")
        .env_remove("ESSCTL_USER")
        .env_remove("ESSCTL_PASSWORD")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("spawn essctl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("essctl output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `essctl --server SOCKET args...`.
fn essctl(server: &Path, args: &[&str]) -> Run {
    let server = server.to_str().expect("UTF-8 path");
    let mut all = vec!["--server", server];
    all.extend_from_slice(args);
    essctl_with(&all, &[], None)
}

/// The `key: value` lines of `volume show`, or the two-column `server` table.
fn fields(text: &str, sep: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(sep))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `SCHED_BATCH` in `/proc/PID/task/TID/stat`.
const SCHED_BATCH: u32 = 3;

/// The scheduling policy of every thread of process `pid` (a thread that
/// ends while they are read is left out).
fn thread_policies(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .map(|stat| {
            // Field 41 (policy), counted from the state (field 3) after the
            // parenthesised command name.
            let after_comm = stat.rsplit_once(')').unwrap().1;
            after_comm
                .split_whitespace()
                .nth(41 - 3)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn field<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key:?} in {pairs:?}"))
}

#[test]
fn server_volume_lss_and_health_commands() {
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let sock = essd.api_socket();

    // server: table and JSON.
    let text = essctl(&sock, &["server"]).ok().to_string();
    let rows: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    assert_eq!(field(&rows, "Serial"), SERIAL);
    assert_eq!(field(&rows, "Name"), "api-test");
    assert_eq!(field(&rows, "Device type"), "2105");
    assert_eq!(field(&rows, "I/O engine"), "threads");
    assert_eq!(field(&rows, "Volumes"), "3");
    assert_eq!(field(&rows, "LSSs"), "2");
    assert_eq!(field(&rows, "Workers"), "3");
    assert_eq!(field(&rows, "Scheduling"), "batch");
    let pid = essd.child.as_ref().unwrap().id();
    let policies = thread_policies(pid);
    assert!(policies.len() >= 4, "threads of essd: {policies:?}");
    assert!(
        policies.iter().all(|&p| p == SCHED_BATCH),
        "every essd thread runs SCHED_BATCH: {policies:?}"
    );
    assert_eq!(field(&rows, "API TCP"), "-");
    let s = essctl(&sock, &["server", "--json"]).json();
    assert_eq!(s["serial"], SERIAL);
    assert_eq!(s["name"], "api-test");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["device_type"], "2105");
    assert_eq!(s["io_engine"], "threads");
    assert_eq!(s["workers"], 3);
    assert_eq!(s["scheduling"], "batch");
    assert_eq!(s["track_size"], 65536);
    assert_eq!(s["counts"]["lss"], 2);
    assert_eq!(s["counts"]["volumes"], 3);
    assert_eq!(s["counts"]["clients"], 0);
    assert_eq!(s["listeners"]["nbd_tcp"], serde_json::json!([]));
    assert_eq!(
        s["listeners"]["nbd_unix"],
        dir.path().join("nbd.sock").display().to_string()
    );
    assert_eq!(s["listeners"]["api_tcp"], Value::Null);
    assert_eq!(
        s["config_file"],
        dir.path().join("essd.toml").display().to_string()
    );
    assert_eq!(
        s["state_dir"],
        dir.path().join("state").display().to_string()
    );
    let started = s["started"].as_str().unwrap();
    assert!(
        started.len() == 20 && started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "{started}"
    );
    assert!(s["uptime_seconds"].as_u64().unwrap() < 60);

    // volume list: table rows in configuration order.
    let list = essctl(&sock, &["volume", "list"]).ok().to_string();
    let lines: Vec<Vec<&str>> = list
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["ID", "ALIAS", "LSS", "SIZE", "RO", "CLIENTS", "BACKING"]
    );
    let backing = |n: &str| {
        dir.path()
            .join(format!("vol-{n}.img"))
            .display()
            .to_string()
    };
    let b000 = backing("000");
    let b001 = backing("001");
    let b100 = backing("100");
    assert_eq!(
        lines[1],
        [
            "000APIT1",
            "boot",
            "0x10",
            "16.0",
            "MiB",
            "no",
            "0",
            b000.as_str()
        ]
    );
    assert_eq!(
        lines[2],
        [
            "001APIT1",
            "-",
            "0x10",
            "8.0",
            "MiB",
            "no",
            "0",
            b001.as_str()
        ]
    );
    assert_eq!(
        lines[3],
        [
            "100APIT1",
            "-",
            "0x11",
            "4.0",
            "MiB",
            "yes",
            "0",
            b100.as_str()
        ]
    );
    assert_eq!(lines.len(), 4);
    let v = essctl(&sock, &["volume", "list", "--json"]).json();
    let vols = v["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3);
    assert_eq!(vols[0]["size"], 16 * MIB);
    assert_eq!(vols[2]["read_only"], true);
    assert_eq!(vols[1]["alias"], Value::Null);

    // volume show by alias, in text.
    let show = essctl(&sock, &["volume", "show", "boot"]).ok().to_string();
    let f = fields(&show, ":");
    assert_eq!(field(&f, "id"), "000APIT1");
    assert_eq!(field(&f, "alias"), "boot");
    assert_eq!(field(&f, "lss"), "0x10");
    assert_eq!(field(&f, "number"), "0");
    assert_eq!(field(&f, "size"), "16.0 MiB (16777216 bytes)");
    assert_eq!(field(&f, "backing"), b000);
    assert_eq!(field(&f, "backing kind"), "file");
    assert_eq!(field(&f, "read-only"), "no");
    assert_eq!(field(&f, "alignment"), "1");
    assert_eq!(field(&f, "description"), "boot disk");
    assert_eq!(field(&f, "clients"), "0");
    for counter in [
        "reads",
        "writes",
        "bytes read",
        "bytes written",
        "flushes",
        "trims",
        "write-zeroes",
        "errors",
    ] {
        assert_eq!(field(&f, counter), "0", "{counter}");
    }

    // volume show as JSON, by ID (also in lower case).
    for id in ["100APIT1", "100apit1"] {
        let v = essctl(&sock, &["--json", "volume", "show", id]).json();
        assert_eq!(v["id"], "100APIT1");
        assert_eq!(v["lss"], "0x11");
        assert_eq!(v["number"], 0);
        assert_eq!(v["size"], 4 * MIB);
        assert_eq!(v["read_only"], true);
        assert_eq!(v["backing_kind"], "file");
        assert_eq!(v["backing_path"], b100);
        assert_eq!(v["alignment"], 1);
        assert_eq!(v["stats"]["reads"], 0);
        assert_eq!(v["stats"]["write_zeroes"], 0);
    }
    let by_alias = essctl(&sock, &["volume", "show", "boot", "--json"]).json();
    assert_eq!(by_alias["id"], "000APIT1");
    assert_eq!(by_alias["description"], "boot disk");

    // lss list.
    let lss = essctl(&sock, &["lss", "list"]).ok().to_string();
    let lines: Vec<Vec<&str>> = lss
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        vec![
            vec!["LSS", "VOLUMES", "IDS"],
            vec!["0x10", "2", "000APIT1", "001APIT1"],
            vec!["0x11", "1", "100APIT1"],
        ]
    );
    let l = essctl(&sock, &["lss", "list", "--json"]).json();
    assert_eq!(
        l,
        serde_json::json!({"lss": [
            {"id": "0x10", "volumes": ["000APIT1", "001APIT1"]},
            {"id": "0x11", "volumes": ["100APIT1"]},
        ]})
    );

    // health and test-connection.
    let health = essctl(&sock, &["health"]).ok().to_string();
    assert!(
        health.starts_with(&format!("ok (serial {SERIAL}, version ")),
        "{health}"
    );
    let h = essctl(&sock, &["health", "--json"]).json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["serial"], SERIAL);
    let conn = essctl(&sock, &["test-connection"]);
    assert_eq!(
        conn.ok().trim_end(),
        format!(
            "connection to {} ok (serial {SERIAL}, version {})",
            sock.display(),
            env!("CARGO_PKG_VERSION")
        )
    );
    // ESSCTL_SERVER is honoured.
    let sock_text = sock.display().to_string();
    let via_env = essctl_with(&["health"], &[("ESSCTL_SERVER", &sock_text)], None);
    assert_eq!(via_env.code, 0, "{via_env:?}");

    essd.stop();
}

#[test]
fn errors_map_to_exit_codes_and_json_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let sock = essd.api_socket();

    let missing = essctl(&sock, &["volume", "show", "999APIT1"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(
        missing.stderr.trim_end(),
        "essctl: volume 999APIT1 not found"
    );
    assert!(missing.stdout.is_empty());
    let missing = essctl(&sock, &["volume", "show", "nosuch", "--json"]);
    assert_eq!(missing.code, 1, "{missing:?}");

    // Raw API: 404 and 405 carry a JSON error body.
    let client = essd.unix_client();
    let r = client.get("/v1/volumes/999APIT1").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "volume 999APIT1 not found"})
    );
    let r = client.get("/v1/nothing").unwrap();
    assert_eq!(r.status, 404);
    assert!(r.error_message().contains("/v1/nothing"));
    let r = client.delete("/v1/server").unwrap();
    assert_eq!(r.status, 405);
    let r = client.post_json("/v1/users", b"{not json").unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error_message().starts_with("invalid request body"));

    // Unreachable servers.
    let gone = dir.path().join("no-such.sock");
    let run = essctl(&gone, &["server"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("essctl: cannot connect to {}", gone.display())),
        "{}",
        run.stderr
    );
    let run = essctl_with(
        &["--server", "http://127.0.0.1:1", "test-connection"],
        &[],
        None,
    );
    assert_eq!(run.code, 3, "{run:?}");

    // Usage errors.
    let run = essctl_with(&["--server", "https://x:1", "health"], &[], None);
    assert_eq!(run.code, 2, "{run:?}");
    let run = essctl_with(&["volume", "frobnicate"], &[], None);
    assert_eq!(run.code, 2, "{run:?}");
    // No terminal and no --password-stdin: refused before connecting.
    let run = essctl(&sock, &["user", "add", "alice"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--password-stdin"), "{}", run.stderr);

    essd.stop();
}

#[test]
fn users_and_tcp_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let sock = essd.api_socket();
    let sock_text = sock.display().to_string();

    let add = |name: &str, password: &str| {
        essctl_with(
            &[
                "--server",
                &sock_text,
                "user",
                "add",
                name,
                "--password-stdin",
            ],
            &[],
            Some(&format!("{password}\n")),
        )
    };
    let run = add("alice", "s3cret-pass");
    assert_eq!(run.ok().trim_end(), "user alice added");
    let run = add("alice", "other-pass");
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr.trim_end(), "essctl: user alice already exists");
    let run = add("bob", "short");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("password must be 8 to"), "{run:?}");
    let run = add("Bad Name", "long-enough");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("invalid user name"), "{run:?}");
    assert_eq!(add("carol", "carols-pass").code, 0);
    assert_eq!(essctl(&sock, &["user", "list"]).ok(), "alice\ncarol\n");
    let run = essctl(&sock, &["user", "remove", "carol"]);
    assert_eq!(run.ok().trim_end(), "user carol removed");
    let run = essctl(&sock, &["user", "remove", "carol"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        essctl(&sock, &["user", "list", "--json"]).json(),
        serde_json::json!({"users": ["alice"]})
    );
    let file = dir.path().join("state/users.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    essd.stop();

    // Restart with a TCP listener on a free port.
    let essd = Essd::start(dir.path(), Some("127.0.0.1:0"));
    let server = essd.get_json("/v1/server");
    let addr = server["listeners"]["api_tcp"]
        .as_str()
        .expect("api_tcp is set")
        .to_string();
    let url = format!("http://{addr}");

    let tcp = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--server", url.as_str()];
        all.extend_from_slice(args);
        essctl_with(&all, env, None)
    };
    let run = tcp(
        &["-u", "alice", "-p", "s3cret-pass", "test-connection"],
        &[],
    );
    assert_eq!(
        run.ok().trim_end(),
        format!(
            "connection to {url} ok (serial {SERIAL}, version {})",
            env!("CARGO_PKG_VERSION")
        )
    );
    let run = tcp(
        &["volume", "show", "boot", "--json"],
        &[("ESSCTL_USER", "alice"), ("ESSCTL_PASSWORD", "s3cret-pass")],
    );
    assert_eq!(run.json()["id"], "000APIT1");

    let wrong = tcp(
        &["--user", "alice", "--password", "wrong-pass", "server"],
        &[],
    );
    assert_eq!(wrong.code, 4, "{wrong:?}");
    assert!(
        wrong.stderr.starts_with("essctl: authentication failed"),
        "{wrong:?}"
    );
    let unknown = tcp(&["-u", "mallory", "-p", "s3cret-pass", "server"], &[]);
    assert_eq!(unknown.code, 4, "{unknown:?}");
    let anonymous = tcp(&["server"], &[]);
    assert_eq!(anonymous.code, 4, "{anonymous:?}");
    assert!(anonymous.stderr.contains("--user"), "{anonymous:?}");
    // User management is refused over TCP even with valid credentials.
    let run = tcp(&["-u", "alice", "-p", "s3cret-pass", "user", "list"], &[]);
    assert_eq!(run.code, 4, "{run:?}");
    assert!(run.stderr.contains("Unix socket"), "{run:?}");

    // Raw API: the challenge header, and the Unix socket needs no credentials.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let endpoint = Endpoint::Tcp {
        host: host.to_string(),
        port: port.parse().unwrap(),
    };
    let r = Client::new(endpoint.clone(), None)
        .get("/v1/health")
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"essd\""));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(body["error"].is_string());
    // Unknown paths do not answer before authentication either.
    let r = Client::new(endpoint.clone(), None)
        .get("/v1/nothing")
        .unwrap();
    assert_eq!(r.status, 401);
    let creds = Credentials {
        user: "alice".into(),
        password: "s3cret-pass".into(),
    };
    let r = Client::new(endpoint.clone(), Some(creds.clone()))
        .get("/v1/nothing")
        .unwrap();
    assert_eq!(r.status, 404);
    // A POST such as a web page's form makes a browser send, with the
    // credentials it remembers: refused before it is carried out.
    for content_type in ["application/x-www-form-urlencoded", "text/plain", ""] {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        let token = base64::engine::general_purpose::STANDARD.encode("alice:s3cret-pass");
        let header = match content_type {
            "" => String::new(),
            t => format!("Content-Type: {t}\r\n"),
        };
        write!(
            stream,
            "POST /v1/pprc/freeze HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {token}\r\n\
             {header}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 415 "),
            "{content_type}: {answer}"
        );
        assert!(answer.contains("application/json"), "{answer}");
    }
    // The same POST sent as JSON (as essctl sends it) reaches the freeze,
    // which finds no consistency group here.
    let r = Client::new(endpoint, Some(creds))
        .post_json("/v1/pprc/freeze", b"")
        .unwrap();
    assert_eq!(
        (r.status, r.error_message()),
        (
            409,
            "no LSS of this server is in a consistency group".to_string()
        )
    );
    assert_eq!(essd.get_json("/v1/health")["status"], "ok");
    essd.stop();
}

#[test]
fn api_listen_without_users_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some("127.0.0.1:0"));
    let out = Command::new(ESSD)
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run essd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "essd started: {stderr}");
    assert!(stderr.contains("api.listen"), "{stderr}");
    assert!(stderr.contains("essctl user add"), "{stderr}");
}

#[test]
fn bad_config_names_file_field_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), None);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(SERIAL, "abc")).unwrap();
    let out = Command::new(ESSD)
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run essd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "essd accepted a bad serial: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{}: server.serial:", config.display())),
        "{stderr}"
    );
    assert!(stderr.contains("\"abc\""), "{stderr}");
    assert!(stderr.contains("5 characters"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing is created");
}

/// A server that closes the connection without answering (as one shutting
/// down does) is a broken connection, exit code 3 — not 1, which `pprc
/// wait` uses for "the pair suspended or ended".
#[test]
fn a_connection_closed_without_an_answer_exits_3() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
        }
    });
    for args in [&["health"][..], &["pprc", "wait", "000FCA31"]] {
        let out = essctl(&sock, args);
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
        assert_eq!(
            out.stderr.trim_end(),
            format!(
                "essctl: connection to {} failed: the server closed the connection without \
                 answering (is essd running?)",
                sock.display()
            ),
            "{args:?}"
        );
    }
}

/// A misspelt field of a PPRC request body is refused, as those of
/// FlashCopy requests are, not ignored: `"critcal": true` established a
/// pair that is not critical, `"link": 2` a path of one link, and the
/// answer said nothing about it.
#[test]
fn pprc_request_bodies_refuse_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let client = essd.unix_client();
    for (path, body, field) in [
        (
            "/v1/pprc/pairs",
            r#"{"volume": "000APIT1", "secondary": "000ZZZ99", "critcal": true}"#,
            "critcal",
        ),
        (
            "/v1/pprc/paths",
            r#"{"lss": 16, "peer": "ZZZ99", "peer_lss": 16, "link": 2}"#,
            "link",
        ),
    ] {
        let r = client.post_json(path, body.as_bytes()).unwrap();
        let message = r.error_message();
        assert_eq!(r.status, 400, "{path}: {message}");
        assert!(
            message.starts_with("invalid request body")
                && message.contains(&format!("unknown field `{field}`")),
            "{path}: {message}"
        );
    }
    essd.stop();
}

/// `--timeout` bounds a wait also when the server takes its time to
/// answer a poll (a pair's entries are locked while a peer is asked
/// something): the wait ends by its deadline with exit code 5, not after
/// the client's 30 s read timeout with exit code 3.
#[test]
fn a_wait_timeout_bounds_a_poll_the_server_does_not_answer() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            held.push(conn);
        }
    });
    for args in [
        &["pprc", "wait", "000FCA31", "--timeout", "1"][..],
        &["flashcopy", "wait", "000FCA31", "--timeout", "1"],
    ] {
        let started = Instant::now();
        let out = essctl(&sock, args);
        let took = started.elapsed();
        assert_eq!(out.code, 5, "{args:?}: {out:?}");
        assert!(
            out.stderr.starts_with("essctl: timed out after 1 s"),
            "{args:?}: {out:?}"
        );
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
}

/// The peer of `pprc path remove` goes into the request path encoded, as
/// every other name does: a serial with a space (or `/`, `?`) got the
/// server's answer to a broken request line or to another endpoint
/// instead of its refusal.
#[test]
fn path_remove_sends_the_peer_as_one_path_segment() {
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let sock = essd.api_socket();
    for peer in ["ZZ 99", "ZZ/99", "ZZ99?x"] {
        let run = essctl(&sock, &["pprc", "path", "remove", "0x10", peer, "0x10"]);
        assert_eq!(run.code, 1, "{peer:?}: {run:?}");
        assert_eq!(
            run.stderr.trim_end(),
            format!("essctl: no path 0x10 → {peer} 0x10"),
            "{peer:?}"
        );
    }
    essd.stop();
}

/// Connections to the TCP management port that send nothing, or a request
/// head that never ends, do not use up the server's file descriptors: the
/// API serves a limited number at once, and closes those whose request
/// head is overdue. Before, each was held open for as long as the client
/// liked, without authenticating, until the server could accept nothing
/// else: no NBD client, no `essctl` even over the Unix socket.
#[test]
fn idle_tcp_connections_to_the_api_do_not_starve_the_server() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let run = essctl_with(
        &[
            "--server",
            essd.api_socket().to_str().unwrap(),
            "user",
            "add",
            "alice",
            "--password-stdin",
        ],
        &[],
        Some("s3cret-pass\n"),
    );
    assert_eq!(run.code, 0, "{run:?}");
    essd.stop();
    let essd = Essd::start_limited(dir.path(), Some("127.0.0.1:0"), Some(128));
    let addr = essd.get_json("/v1/server")["listeners"]["api_tcp"]
        .as_str()
        .unwrap()
        .to_string();

    let mut idle = Vec::new();
    for i in 0..180 {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            conn.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        idle.push(conn);
    }
    std::thread::sleep(Duration::from_millis(500));
    // The Unix socket API and the NBD listener still accept.
    let run = essctl(&essd.api_socket(), &["health"]);
    assert_eq!(run.code, 0, "{run:?}");
    let mut nbd = UnixStream::connect(dir.path().join("nbd.sock")).unwrap();
    nbd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut magic = [0u8; 8];
    nbd.read_exact(&mut magic).expect("NBD greeting");
    assert_eq!(&magic, b"NBDMAGIC");
    drop(nbd);

    // The server closes the connections whose head is overdue (the first
    // ones it accepted: one sent nothing, one half a head); once the rest
    // are gone, a user gets in again.
    let started = Instant::now();
    let mut byte = [0u8; 1];
    for conn in &mut idle[..2] {
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let closed = match conn.read(&mut byte) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        assert!(closed, "an idle connection was not closed");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "idle connections held for {:?}",
        started.elapsed()
    );
    drop(idle);
    let run = essctl_with(
        &[
            "--server",
            &format!("http://{addr}"),
            "-u",
            "alice",
            "-p",
            "s3cret-pass",
            "health",
        ],
        &[],
        None,
    );
    assert_eq!(run.code, 0, "{run:?}");
    essd.stop();
}

/// A path parameter that is not valid (percent-encoded bytes that are not
/// UTF-8) gets a JSON error like every other failed request, as the API
/// promises; it was axum's plain text.
#[test]
fn a_malformed_path_parameter_gets_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let essd = Essd::start(dir.path(), None);
    let client = essd.unix_client();
    for (method, path) in [
        ("GET", "/v1/volumes/%FF"),
        ("GET", "/v1/flashcopy/%FF"),
        ("DELETE", "/v1/flashcopy/%FF"),
        ("GET", "/v1/pprc/pairs/%FF"),
        ("POST", "/v1/pprc/pairs/%FF/suspend"),
        ("DELETE", "/v1/pprc/paths/0x10/%FF/0x10"),
        ("DELETE", "/v1/users/%FF"),
    ] {
        let body: &[u8] = if method == "POST" { b"{}" } else { b"" };
        let r = client.request(method, path, Some(body)).unwrap();
        assert_eq!(r.status, 400, "{method} {path}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        let error: Value = serde_json::from_slice(&r.body).expect("a JSON body");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("invalid request path: ") && message.contains("UTF-8"),
            "{method} {path}: {error}"
        );
    }
    essd.stop();
}

/// `flashcopy wait --timeout` also bounds the request made when a watched
/// relationship ends (was it withdrawn or did it complete?): a server that
/// does not answer it ends the wait at the deadline with exit code 5, not
/// after the client's 30 s read timeout with exit code 3.
#[test]
fn a_wait_timeout_bounds_the_poll_made_when_a_relationship_ends() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let copying = r#"{"relationships":[{"source":"000FCA31","target":"001FCA31","state":"copying","mode":"copy","rate_mib_s":null,"t0":"2026-12-06T00:00:00Z","t0_unix":0.0,"track_size":65536,"tracks_total":16,"tracks_copied":0,"tracks_remaining":16,"percent":0.0,"bytes_copied":0}]}"#;
        let ended = r#"{"error":"no FlashCopy relationship involves 000FCA31"}"#;
        let mut polls = 0;
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut request = [0u8; 4096];
            let n = conn.read(&mut request).unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n]).to_string();
            if line.starts_with("GET /v1/flashcopy/000FCA31 ") {
                // The relationship is copying at the first poll, then gone.
                polls += 1;
                let (status, body) = if polls == 1 {
                    ("200 OK", copying)
                } else {
                    ("404 Not Found", ended)
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            } else {
                // GET /v1/flashcopy: never answered.
                held.push(conn);
            }
        }
    });
    let started = Instant::now();
    let out = essctl(
        &sock,
        &[
            "flashcopy",
            "wait",
            "000FCA31",
            "--interval",
            "0.1",
            "--timeout",
            "2",
        ],
    );
    let took = started.elapsed();
    assert_eq!(out.code, 5, "{out:?}");
    // The first poll's progress line, then the error.
    assert!(
        out.stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("essctl: timed out after 2 s")),
        "{out:?}"
    );
    assert!(took < Duration::from_secs(6), "took {took:?}");
}
