//! `essctl`: command-line client of the essd management API. The commands,
//! output and exit codes live in [`essd::cli`].

fn main() -> std::process::ExitCode {
    essd::cli::main()
}
