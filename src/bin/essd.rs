//! `essd`: the storage server daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use essd::config::{self, Config, DemoSite};

/// Buffers below this size come from the allocator's heaps, not from mappings
/// of their own (requests up to 1 MiB are the common large case).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const HEAP_ALLOCATION_LIMIT: libc::c_int = 4 << 20;

/// Free memory the allocator keeps at the top of a heap for reuse.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEPT_FREE_MEMORY: libc::c_int = 512 << 20;

/// Keeps freed request buffers for reuse instead of returning them to the
/// kernel. A mirrored write holds its buffer until the peer acknowledges it,
/// so buffers are freed in bursts; by default glibc then gave the pages back
/// (madvise) and the next requests faulted them in again: 14 page faults per
/// mirrored 1 MiB write, 0.23 per 4 KiB write. Memory stays bounded by the
/// peak of requests in flight. Both limits are set: setting the trim limit
/// alone pins glibc's mapping limit at 128 KiB, and every larger buffer then
/// got (and faulted in) a mapping of its own.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, name, value) in [
        (
            libc::M_MMAP_THRESHOLD,
            "M_MMAP_THRESHOLD",
            HEAP_ALLOCATION_LIMIT,
        ),
        (libc::M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD", KEPT_FREE_MEMORY),
    ] {
        // SAFETY: mallopt only changes allocator tuning parameters; it is
        // called before any other thread exists.
        if unsafe { libc::mallopt(option, value) } != 1 {
            eprintln!("essd: cannot set the allocator's {name} to {value}");
        }
    }
}

/// Storage server exporting volumes over NBD with FlashCopy and PPRC copy services.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "demo",
        conflicts_with = "demo"
    )]
    config: Option<PathBuf>,
    /// Validate the configuration, each volume's backing against its size
    /// and what the Copy Services records in the state directory need, and
    /// exit without starting.
    #[arg(long)]
    check: bool,
    /// Start on the embedded demo configuration (3 small sparse volumes).
    #[arg(long)]
    demo: bool,
    /// Directory for the demo's volumes and state (default: a new temporary directory).
    #[arg(long, value_name = "DIR", requires = "demo")]
    dir: Option<PathBuf>,
    /// Which demo site: `a`, or `b`, its PPRC peer on this machine.
    #[arg(long, value_enum, default_value = "a", requires = "demo")]
    site: DemoSite,
    /// Log filter, e.g. `info`, `debug`, `essd=debug` (overrides RUST_LOG).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    keep_freed_buffers();
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(3),
        Err(e) => {
            eprintln!("essd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn demo_dir(dir: Option<PathBuf>, site: DemoSite) -> anyhow::Result<PathBuf> {
    let name = match site {
        DemoSite::A => format!("essd-demo-{}", std::process::id()),
        DemoSite::B => format!("essd-demo-b-{}", std::process::id()),
    };
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(name));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

fn run(args: Args) -> anyhow::Result<usize> {
    let site = args.site;
    let (cfg, demo) = if args.demo {
        let dir = demo_dir(args.dir, site)?;
        let text = config::demo_config_text(&dir, site);
        let path = dir.join("essd.toml");
        std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        let cfg = Config::parse(&text, &path)?;
        // The demo's read-only volume needs an existing backing file.
        for spec in cfg.volumes.iter().filter(|s| s.config.read_only) {
            let file = &spec.config.path;
            if !file.exists() {
                std::fs::create_dir_all(file.parent().unwrap_or(Path::new("/")))?;
                let f = std::fs::File::create(file)
                    .with_context(|| format!("cannot create {}", file.display()))?;
                f.set_len(spec.config.size.map_or(0, |s| s.0))?;
            }
        }
        (cfg, Some(dir))
    } else {
        let path = args.config.expect("clap requires --config without --demo");
        (Config::load(&path)?, None)
    };
    if args.check {
        essd::daemon::check_before_start(&cfg)?;
        let n = cfg.volumes.len();
        println!(
            "{}: configuration is valid ({n} volume{}; the backings and the records in {} agree \
             with it)",
            cfg.source.display(),
            if n == 1 { "" } else { "s" },
            cfg.raw.server.state_dir.display()
        );
        return Ok(0);
    }
    // Before the runtime starts its threads: they inherit the policy.
    let scheduling = cfg.raw.server.scheduling;
    scheduling
        .apply_to_this_thread()
        .with_context(|| format!("cannot set scheduling policy {}", scheduling.name()))?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cfg.raw.server.workers {
        runtime.worker_threads(workers);
    }
    let runtime = runtime
        .enable_all()
        .thread_name("essd")
        .build()
        .context("cannot start the async runtime")?;
    let on_ready = demo.map(|dir| {
        Box::new(move |state: &essd::control::ApiState| print_demo_banner(&dir, state, site))
            as essd::daemon::OnReady
    });
    let failed = runtime.block_on(essd::daemon::run(cfg, CancellationToken::new(), on_ready))?;
    Ok(failed)
}

fn print_demo_banner(dir: &Path, state: &essd::control::ApiState, site: DemoSite) {
    let serial = &state.server.serial;
    let tcp = state
        .nbd_tcp
        .first()
        .map(|a| a.to_string())
        .unwrap_or_else(|| format!("127.0.0.1:{}", site.nbd_port()));
    let (host, port) = tcp.rsplit_once(':').unwrap_or(("127.0.0.1", "10809"));
    println!(
        "essd demo is running (serial {serial}), files in {}",
        dir.display()
    );
    println!();
    println!("Volumes (export names):");
    for v in state.server.volumes() {
        println!(
            "  {}  {:>9}  {}{}",
            v.name(),
            essd::units::human_bytes(v.size()),
            v.info().description.clone().unwrap_or_default(),
            if v.writable() { "" } else { " (read-only)" }
        );
    }
    println!();
    println!("Connect:");
    println!("  nbdinfo nbd://{tcp}/000{serial}");
    println!("  nbdinfo --list nbd://{tcp}");
    println!(
        "  nbd-client {host} {port} /dev/nbd0 -N 000{serial}     # Linux kernel client, as root"
    );
    let exe = std::env::current_exe().ok();
    let essctl = exe
        .as_deref()
        .map(essctl_command)
        .unwrap_or_else(|| "essctl".into());
    let essctl = format!("{essctl} --server {}", dir.join("api.sock").display());
    println!("  {essctl} volume list");
    println!();
    let (a, b) = (DemoSite::A.serial(), DemoSite::B.serial());
    match site {
        DemoSite::A => {
            println!("Point-in-time copy of volume 000 onto volume 001:");
            println!("  {essctl} flashcopy establish 000{a}:001{a} --nocopy");
            println!();
            let essd = exe.map_or("essd".into(), |e| e.display().to_string());
            println!(
                "Mirror volume 000 to a second demo site (PPRC), started in another terminal:"
            );
            println!("  {essd} --demo --site b");
            println!("  {essctl} pprc path establish 0x10 {b} 0x10");
            println!("  {essctl} pprc establish 000{a} 000{b}");
            println!("  {essctl} pprc wait 000{a}");
            println!("  {essctl} pprc show 000{a}");
        }
        DemoSite::B => {
            println!("This is the second site of the PPRC demo: site A (`essd --demo`)");
            println!("mirrors its volumes here once it has a path and pairs. From here:");
            println!("  {essctl} pprc list");
            println!("  {essctl} pprc failover 000{b}     # take over if site A is lost");
        }
    }
    println!();
    println!("Stop with Ctrl-C.");
}

/// How to run essctl beside the essd at `exe`: by the path it was built to
/// when it sits beside essd; through cargo when essd runs from a cargo build
/// that has not built essctl yet (as after the README's first command); else
/// from the PATH.
fn essctl_command(exe: &Path) -> String {
    let beside = exe.with_file_name("essctl");
    if beside.exists() {
        return beside.display().to_string();
    }
    let built_in = |profile: &str| {
        exe.parent()
            .is_some_and(|dir| dir.ends_with(Path::new("target").join(profile)))
    };
    if built_in("release") {
        "cargo run -q --release --bin essctl --".into()
    } else if built_in("debug") {
        "cargo run -q --bin essctl --".into()
    } else {
        "essctl".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_names_an_essctl_that_runs() {
        let root = tempfile::tempdir().unwrap();
        let release = root.path().join("target/release");
        std::fs::create_dir_all(&release).unwrap();
        let essd = release.join("essd");
        // A fresh clone after `cargo run --bin essd`: no essctl built yet.
        assert_eq!(
            essctl_command(&essd),
            "cargo run -q --release --bin essctl --"
        );
        assert_eq!(
            essctl_command(&root.path().join("target/debug/essd")),
            "cargo run -q --bin essctl --"
        );
        std::fs::write(release.join("essctl"), b"").unwrap();
        assert_eq!(
            essctl_command(&essd),
            release.join("essctl").display().to_string()
        );
        // Installed elsewhere without essctl beside it: from the PATH.
        assert_eq!(essctl_command(&root.path().join("bin/essd")), "essctl");
    }
}
