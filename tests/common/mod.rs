//! Test harness: starts real `essd` processes on temporary configs and runs
//! the NBD clients nobody here wrote (libnbd tools, qemu, fio, e2fsprogs).
//!
//! A missing tool is a failure, never a skip: `scripts/test` installs them.

#![allow(dead_code)]

pub mod proxy;

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Both I/O engines; engine-sensitive tests run against each.
pub const ENGINES: [&str; 2] = ["uring", "threads"];

/// Fails the test unless `tool` is on PATH, naming the Debian package.
pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required for this test: install the Debian package {package} (scripts/test does)"
    );
}

/// Fails the test unless running as root (needed for mount, losetup, FUSE).
pub fn require_root(what: &str) {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(uid, 0, "{what} needs root: run the suite as root (CI does)");
}

/// A volume entry for [`TestConfig`].
#[derive(Clone, Debug)]
pub struct Vol {
    pub lss: u8,
    pub number: u8,
    pub size: Option<&'static str>,
    pub path: Option<PathBuf>,
    pub read_only: bool,
    pub direct_io: bool,
    pub alias: Option<&'static str>,
    pub description: Option<&'static str>,
}

impl Vol {
    pub fn new(lss: u8, number: u8, size: &'static str) -> Self {
        Vol {
            lss,
            number,
            size: Some(size),
            path: None,
            read_only: false,
            direct_io: false,
            alias: None,
            description: None,
        }
    }
}

/// A generated configuration.
#[derive(Clone, Debug)]
pub struct TestConfig {
    pub serial: &'static str,
    pub engine: &'static str,
    pub tcp: bool,
    /// The NBD TCP listener's address when `tcp` is set.
    pub tcp_address: &'static str,
    pub volumes: Vec<Vol>,
    /// Extra lines for the `[server]` section.
    pub server_extra: String,
    pub extra: String,
    /// Extra lines for `[[lss]]` entries, by LSS.
    pub lss_extra: Vec<(u8, String)>,
}

impl TestConfig {
    pub fn new(engine: &'static str) -> Self {
        TestConfig {
            serial: "TST01",
            engine,
            tcp: false,
            tcp_address: "127.0.0.1:0",
            volumes: vec![Vol::new(0x10, 0, "64MiB")],
            server_extra: String::new(),
            extra: String::new(),
            lss_extra: Vec::new(),
        }
    }

    pub fn render(&self, dir: &Path) -> String {
        let d = dir.display();
        let mut lss: Vec<u8> = self.volumes.iter().map(|v| v.lss).collect();
        lss.sort_unstable();
        lss.dedup();
        let listen = if self.tcp {
            format!("[\"{}\"]", self.tcp_address)
        } else {
            "[]".to_string()
        };
        let mut s = format!(
            "[server]\nserial = \"{}\"\nstate_dir = \"{d}/state\"\nio_engine = \"{}\"\n{}\n[nbd]\nlisten = {listen}\nunix = \"{d}/nbd.sock\"\n\n[api]\nunix = \"{d}/api.sock\"\n{}\n",
            self.serial, self.engine, self.server_extra, self.extra
        );
        for id in lss {
            writeln!(s, "[[lss]]\nid = 0x{id:02X}").unwrap();
            for (_, line) in self.lss_extra.iter().filter(|(l, _)| *l == id) {
                writeln!(s, "{line}").unwrap();
            }
            s.push('\n');
        }
        for v in &self.volumes {
            let path = v
                .path
                .clone()
                .unwrap_or_else(|| dir.join(format!("vol-{:02x}-{}.img", v.lss, v.number)));
            write!(
                s,
                "[[volume]]\nlss = 0x{:02X}\nnumber = {}\npath = \"{}\"\nread_only = {}\ndirect_io = {}\n",
                v.lss,
                v.number,
                path.display(),
                v.read_only,
                v.direct_io
            )
            .unwrap();
            if let Some(size) = v.size {
                writeln!(s, "size = \"{size}\"").unwrap();
            }
            if let Some(a) = v.alias {
                writeln!(s, "alias = \"{a}\"").unwrap();
            }
            if let Some(d) = v.description {
                writeln!(s, "description = \"{d}\"").unwrap();
            }
            s.push('\n');
        }
        s
    }
}

/// Writes `text` to `path` and runs essd on it with `args`, which must
/// exit; returns its exit code and the last line of its stderr (start-up
/// log lines may precede the error).
pub fn start_to_exit(path: &Path, text: &str, args: &[&str]) -> (Option<i32>, String) {
    std::fs::write(path, text).unwrap();
    let out = Command::new(essd_bin())
        .arg("--config")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr.trim_end().lines().last().unwrap_or("").to_string();
    (out.status.code(), last)
}

/// `config` (as [`TestConfig::render`] writes it) without the volume
/// backed by `backing`.
pub fn without_volume(config: &str, backing: &Path) -> String {
    let at = config
        .find(&format!("path = \"{}\"", backing.display()))
        .expect("the volume is in the config");
    let start = config[..at].rfind("[[volume]]").unwrap();
    let end = config[at..]
        .find("\n\n")
        .map_or(config.len(), |e| at + e + 2);
    format!("{}{}", &config[..start], &config[end..])
}

/// The first address of a list as the ready line prints it, after its
/// opening bracket: `127.0.0.1:10809, ...]` or `[::1]:10809, ...]`.
fn first_listed_address(list: &str) -> Option<String> {
    let mut depth = 0;
    let end = list.char_indices().find_map(|(i, c)| match c {
        '[' => {
            depth += 1;
            None
        }
        ']' if depth > 0 => {
            depth -= 1;
            None
        }
        ']' | ',' if depth == 0 => Some(i),
        _ => None,
    })?;
    let first = list[..end].trim();
    (!first.is_empty()).then(|| first.to_string())
}

/// A running essd.
pub struct Essd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub nbd_sock: PathBuf,
    pub api_sock: PathBuf,
    pub tcp: Option<String>,
    pub serial: String,
}

pub fn essd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_essd")
}

impl Essd {
    /// Writes the config into `dir` and starts essd; waits until ready.
    pub fn start_in(dir: &Path, cfg: &TestConfig) -> Essd {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("essd.toml");
        std::fs::write(&config, cfg.render(dir)).unwrap();
        Self::start_config(dir, &config, cfg.serial)
    }

    /// Starts essd on an existing config file in `dir`.
    pub fn start_config(dir: &Path, config: &Path, serial: &str) -> Essd {
        Self::start_config_env(dir, config, serial, &[])
    }

    /// Like [`Essd::start_config`], with extra environment variables.
    pub fn start_config_env(dir: &Path, config: &Path, serial: &str, env: &[(&str, &str)]) -> Essd {
        let log = dir.join("essd.log");
        let log_start = std::fs::metadata(&log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(essd_bin())
            .arg("--config")
            .arg(config)
            .arg("--log")
            .arg("info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn essd");
        let mut essd = Essd {
            child: Some(child),
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log: log.clone(),
            nbd_sock: dir.join("nbd.sock"),
            api_sock: dir.join("api.sock"),
            tcp: None,
            serial: serial.to_string(),
        };
        essd.wait_ready(log_start);
        essd
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for this run's "essd ready" line (the log may hold earlier runs).
    fn wait_ready(&mut self, log_start: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.log_text();
            let text = strip_ansi(all.get(log_start..).unwrap_or(""));
            if let Some(line) = text.lines().rev().find(|l| l.contains("essd ready")) {
                if let Some(start) = line.find("nbd_tcp=[") {
                    self.tcp = first_listed_address(&line[start + 9..]);
                }
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("essd exited during start-up ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "essd not ready after 20 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// NBD URI of an export over the Unix socket.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock.display())
    }

    /// NBD URI of an export over TCP (config must have `tcp = true`).
    pub fn tcp_uri(&self, export: &str) -> String {
        format!(
            "nbd://{}/{export}",
            self.tcp.as_ref().expect("TCP listener")
        )
    }

    /// Runs essd (this one stopped) on its config with `edit` applied,
    /// written beside it, which must exit; `essd --check` on it must say
    /// the same. See [`start_to_exit`].
    pub fn start_edited(&self, edit: impl Fn(&str) -> String) -> (Option<i32>, String) {
        assert!(self.child.is_none(), "still running");
        let text = edit(&std::fs::read_to_string(&self.config).unwrap());
        let edited = self.dir.join("edited.toml");
        let started = start_to_exit(&edited, &text, &[]);
        assert_eq!(
            start_to_exit(&edited, &text, &["--check"]),
            started,
            "essd --check passed what stops the start"
        );
        started
    }

    /// Volume ID for LSS/number on this server.
    pub fn vol(&self, lss: u8, number: u8) -> String {
        format!(
            "{:03X}{}",
            u32::from(lss - 0x10) * 0x100 + u32::from(number),
            self.serial
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(40))
    }

    /// SIGTERM (as `systemctl stop` sends) and wait; the handle can be
    /// started again with [`Essd::restart`].
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(40))
    }

    /// [`Essd::terminate`], failing unless the server exits within
    /// `limit` of the signal.
    pub fn terminate_within(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, limit)
    }

    /// Starts a stopped server again from the same directory and
    /// configuration.
    pub fn restart(&mut self, serial: &str) {
        assert!(self.child.is_none(), "still running");
        *self = Essd::start_config(&self.dir.clone(), &self.config.clone(), serial);
    }

    /// SIGKILL and wait.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the process with SIGKILL (a crash) and reaps it; the handle
    /// can be started again with `kill_and_restart`.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process with SIGKILL and starts it again from the same
    /// directory and configuration.
    pub fn kill_and_restart(&mut self, serial: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        *self = Essd::start_config(&self.dir.clone(), &self.config.clone(), serial);
    }

    /// The log so far (for assertions).
    pub fn log(&self) -> String {
        strip_ansi(&self.log_text())
    }

    /// Waits (up to `limit`) until the log holds `line`; panics with the
    /// log if it never does.
    #[allow(dead_code)]
    pub fn wait_log(&self, line: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(line) {
            assert!(Instant::now() < deadline, "no {line:?} in:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Essd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- essd log ({}) ---\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
        }
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("essd did not exit within {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its stdout as text.
pub fn run_text(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// A file of `len` pseudo-random bytes (deterministic per seed).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

/// Runs a Python script with Debian's interpreter (which has `import nbd`).
pub fn python(script: &str, args: &[&str]) -> String {
    require("/usr/bin/python3", "python3");
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "python3-libnbd is required (scripts/test installs it)");
    let file = tempfile::Builder::new()
        .prefix("essd-test-")
        .suffix(".py")
        .tempfile()
        .unwrap();
    std::fs::write(file.path(), script).unwrap();
    run_text(Command::new("/usr/bin/python3").arg(file.path()).args(args))
}

/// A loopback TCP port for a server that binds it later. A port the
/// kernel picks (port 0) may be handed to another test's outgoing
/// connection before the server binds it; these come from one counter per
/// test process, outside the kernel's ephemeral range, so no other test of
/// this process and no outgoing connection can take them meanwhile.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the ephemeral range if there is room, else above it.
    let (first, span) = if low > 12000 {
        (low - 12000, 12000)
    } else {
        (high + 1, 65535 - high)
    };
    // Test binaries running at the same time start at different places.
    let start = std::process::id() * 97 % span;
    for _ in 0..span {
        let port = first + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {first}..{}", first + span);
}

/// A fresh temporary directory (kept on failure for inspection).
pub fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("essd-{name}-"))
        .tempdir()
        .unwrap()
}

/// What one `essctl` run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "essctl failed: {self:?}");
        &self.stdout
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).expect("essctl --json prints JSON")
    }

    /// Asserts exit code 1 with exactly `essctl: {message}` on stderr.
    pub fn refused(&self, message: &str) {
        assert_eq!(self.code, 1, "{self:?}");
        assert_eq!(self.stderr.trim_end(), format!("essctl: {message}"));
        assert!(self.stdout.is_empty(), "{self:?}");
    }
}

/// `essctl --server API_SOCKET args...` with a clean environment.
pub fn essctl_command(essd: &Essd, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_essctl"));
    cmd.arg("--server")
        .arg(&essd.api_sock)
        .args(args)
        .env_remove("ESSCTL_SERVER")
        .env_remove("ESSCTL_USER")
        .env_remove("ESSCTL_PASSWORD")
        .stdin(Stdio::null());
    cmd
}

/// Runs `essctl --server API_SOCKET args...` with a clean environment.
pub fn essctl(essd: &Essd, args: &[&str]) -> Run {
    let out = essctl_command(essd, args).output().expect("run essctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Starts `essctl --server API_SOCKET args...` in the background, its
/// output discarded.
pub fn spawn_essctl(essd: &Essd, args: &[&str]) -> Child {
    essctl_command(essd, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run essctl")
}

/// Pages of `path` in the page cache.
pub fn cached_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a read-only shared mapping of an open file, never read through
    // and unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr..addr + len` is the mapping above and `resident` has one
    // byte per page of it.
    let r = unsafe { libc::mincore(addr, len, resident.as_mut_ptr()) };
    // SAFETY: unmaps the mapping made above, which nothing else uses.
    unsafe { libc::munmap(addr, len) };
    assert_eq!(r, 0, "mincore {}", path.display());
    resident.iter().filter(|&&b| b & 1 == 1).count()
}

/// Waits until no page of `path` is in the page cache.
pub fn wait_uncached(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = cached_pages(path);
    while cached_pages(path) > 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {before} pages still cached",
            cached_pages(path)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The peak resident memory of process `pid`, in bytes.
pub fn peak_memory(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// A small file system mounted for a test (`tmpfs` with a size limit, or
/// `ramfs`, which has no `fallocate`); unmounted on drop.
pub struct ScratchMount {
    pub dir: PathBuf,
}

impl ScratchMount {
    /// Mounts `fstype` with `options` on `dir` (created).
    pub fn mount(fstype: &str, options: &str, dir: &Path) -> ScratchMount {
        require_root("mounting a scratch file system");
        require("mount", "mount");
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(dir));
        ScratchMount {
            dir: dir.to_path_buf(),
        }
    }

    /// Fills the file system with `filler` until it has no space left.
    pub fn fill(&self, filler: &str) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.dir.join(filler)).unwrap();
        let block = vec![0x5Au8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
    }
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A loop device over a file; detached on drop.
pub struct LoopDevice {
    pub dev: PathBuf,
}

impl LoopDevice {
    /// Attaches a loop device to `file`.
    pub fn attach(file: &Path) -> LoopDevice {
        Self::attach_with_sectors(file, 512)
    }

    /// Attaches a loop device with logical blocks of `sector` bytes to `file`.
    pub fn attach_with_sectors(file: &Path, sector: u32) -> LoopDevice {
        require_root("losetup");
        require("losetup", "mount");
        let out = run_text(
            Command::new("losetup")
                .args(["-f", "--show", "-b", &sector.to_string()])
                .arg(file),
        );
        LoopDevice {
            dev: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
