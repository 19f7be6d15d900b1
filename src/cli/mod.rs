//! `essctl`, the command-line client of the management API: argument
//! parsing, one function per command, output as tables or raw JSON, and the
//! exit codes.
//!
//! * [`client`] — the blocking HTTP/1.1 client (Unix socket or TCP).
//! * [`output`] — tables and `key: value` rendering.
//! * [`flashcopy`] — the FlashCopy and event-log commands.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the server answered with an error (unknown volume, user exists, ...) or an unusable answer |
//! | 2 | usage error: bad arguments, bad `--server`, no way to read a password |
//! | 3 | cannot connect: the server is unreachable, or it closed the connection without answering |
//! | 4 | authentication failed or not permitted (HTTP 401 or 403) |
//! | 5 | timed out: `flashcopy wait --timeout` or `pprc wait --timeout` expired first, or the server did not answer a request within 30 s (it may still carry it out) |

pub mod client;
pub mod flashcopy;
pub mod output;
pub mod pprc;
mod wait;

use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;

use crate::config::DEFAULT_API_SOCKET;
use crate::control::api::{
    HealthView, LssList, NewUser, ServerView, UserList, UserView, VolumeList, VolumeView,
    ROLE_NONE, ROLE_SOURCE, ROLE_TARGET,
};
use crate::units::human_bytes;
use client::{Client, ClientError, Credentials, Endpoint, Response};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The server answered with an error.
pub const EXIT_SERVER_ERROR: u8 = 1;
/// Usage error (also clap's code for bad arguments).
pub const EXIT_USAGE: u8 = 2;
/// The server could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Authentication failed or the operation is not permitted.
pub const EXIT_AUTH: u8 = 4;
/// A wait timed out, or a request was not answered in time.
pub const EXIT_TIMEOUT: u8 = 5;

/// Command-line client for the essd management API.
#[derive(Parser, Debug)]
#[command(
    name = "essctl",
    version,
    propagate_version = true,
    after_help = "Exit codes: 0 ok, 1 the server answered with an error, 2 usage error, \
                  3 server unreachable or connection closed without an answer, \
                  4 authentication failed or not permitted, 5 timed out (flashcopy wait / \
                  pprc wait --timeout, or no answer within 30 s: the request may still be \
                  carried out)."
)]
pub struct Cli {
    /// Connection and output options.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options accepted before or after any subcommand.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Management API: a Unix socket path or http://HOST:PORT.
    #[arg(
        long,
        short = 's',
        env = "ESSCTL_SERVER",
        default_value = DEFAULT_API_SOCKET,
        value_name = "SOCKET|URL",
        global = true
    )]
    pub server: String,
    /// User name for HTTP Basic authentication (TCP only).
    #[arg(long, short = 'u', env = "ESSCTL_USER", global = true)]
    pub user: Option<String>,
    /// Password of --user for HTTP Basic authentication (TCP only; not a new user's password).
    #[arg(
        long,
        short = 'p',
        env = "ESSCTL_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Top-level commands.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Show the server's identity, listeners and counts.
    Server,
    /// Check that the server is up.
    Health,
    /// Connect (and authenticate) and report the server's serial and version.
    TestConnection,
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Logical subsystems.
    #[command(subcommand)]
    Lss(LssCommand),
    /// Management API users (Unix socket only).
    #[command(subcommand)]
    User(UserCommand),
    /// FlashCopy: point-in-time copies of a volume onto another volume.
    #[command(subcommand)]
    Flashcopy(flashcopy::FlashCopyCommand),
    /// PPRC: paths, pairs and the consistency group.
    #[command(subcommand)]
    Pprc(pprc::PprcCommand),
    /// Show the latest events of the server's event log.
    Log {
        /// How many of the latest events to show (1-10000; default 100).
        #[arg(long, short = 'n', value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: Option<u32>,
    },
}

/// `essctl volume ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum VolumeCommand {
    /// List every volume (a FLASHCOPY column appears while any volume is
    /// in a relationship or an incomplete FlashCopy target).
    #[command(visible_alias = "ls")]
    List,
    /// Show one volume with its I/O counters.
    Show {
        /// Volume ID (e.g. 000FCA31) or alias.
        id: String,
    },
}

/// `essctl lss ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum LssCommand {
    /// List every logical subsystem and its volumes.
    #[command(visible_alias = "ls")]
    List,
}

/// `essctl user ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum UserCommand {
    /// Add a user; the password is prompted for twice, or read from stdin.
    Add {
        /// User name: 1-32 characters from a-z, 0-9, '_' and '-', not starting
        /// with a digit or '-'.
        name: String,
        /// Read the new password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List user names.
    #[command(visible_alias = "ls")]
    List,
    /// Remove a user.
    #[command(visible_alias = "rm")]
    Remove {
        /// User name.
        name: String,
    },
}

/// A failed command, mapped to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or input.
    #[error("{0}")]
    Usage(String),
    /// No usable connection to the server.
    #[error("{0}")]
    Unreachable(String),
    /// The server refused the credentials or the operation (401/403).
    #[error("{0}")]
    Auth(String),
    /// The server answered with an error, or with something unusable.
    #[error("{0}")]
    Server(String),
    /// A wait ended before what it waited for happened.
    #[error("{0}")]
    Timeout(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Unreachable(_) => EXIT_UNREACHABLE,
            CliError::Auth(_) => EXIT_AUTH,
            CliError::Timeout(_) => EXIT_TIMEOUT,
            CliError::Server(_) | CliError::Output(_) => EXIT_SERVER_ERROR,
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::BadEndpoint(_) => CliError::Usage(e.to_string()),
            // Sent, and no answer in time: the server may be carrying the
            // request out (a pair operation waiting for its peer).
            ClientError::Io {
                ref server,
                ref source,
            } if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
            {
                CliError::Timeout(format!(
                    "{server} did not answer in time; it may still carry the request out \
                     (look at the result with essctl's list or show commands)"
                ))
            }
            ClientError::Connect { .. } | ClientError::Io { .. } => {
                CliError::Unreachable(format!("{e} (is essd running?)"))
            }
            ClientError::Protocol { .. } => CliError::Server(e.to_string()),
        }
    }
}

/// Parses the command line, runs the command and returns the exit code;
/// errors go to stderr as `essctl: message`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(&cli, &mut out).and_then(|()| out.flush().map_err(CliError::from)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("essctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one parsed command, writing its output to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let session = Session::new(&cli.global)?;
    match &cli.command {
        Command::Server => session.server(out),
        Command::Health => session.health(out),
        Command::TestConnection => session.test_connection(out),
        Command::Volume(VolumeCommand::List) => session.volume_list(out),
        Command::Volume(VolumeCommand::Show { id }) => session.volume_show(out, id),
        Command::Lss(LssCommand::List) => session.lss_list(out),
        Command::User(UserCommand::Add {
            name,
            password_stdin,
        }) => {
            let password = read_new_password(name, *password_stdin)?;
            session.user_add(out, name, &password)
        }
        Command::User(UserCommand::List) => session.user_list(out),
        Command::User(UserCommand::Remove { name }) => session.user_remove(out, name),
        Command::Flashcopy(command) => session.flashcopy(out, command),
        Command::Pprc(command) => session.pprc(out, command),
        Command::Log { limit } => session.log(out, *limit),
    }
}

/// Whether hosts get a read-only export: `yes` for a volume configured
/// read-only, `yes (PPRC secondary)` while it is a PPRC secondary.
fn host_read_only(v: &VolumeView) -> String {
    match (v.read_only, v.pprc_secondary) {
        (false, true) => "yes (PPRC secondary)".to_string(),
        (read_only, _) => output::yes_no(read_only),
    }
}

/// The FLASHCOPY cell of `volume list`: `source → PEER`, `target ← PEER`
/// or `-`, plus `incomplete` for an incomplete FlashCopy target.
fn flashcopy_summary(v: &VolumeView) -> String {
    let peer = v.flashcopy_peer.as_deref().unwrap_or("?");
    let role = match v.flashcopy_role.as_str() {
        ROLE_NONE => None,
        ROLE_SOURCE => Some(format!("source → {peer}")),
        ROLE_TARGET => Some(format!("target ← {peer}")),
        other => Some(other.to_string()),
    };
    match (role, v.incomplete) {
        (Some(role), true) => format!("{role}, incomplete"),
        (Some(role), false) => role,
        (None, true) => "incomplete".to_string(),
        (None, false) => "-".to_string(),
    }
}

/// Reads the new user's password from stdin or a terminal prompt.
fn read_new_password(name: &str, from_stdin: bool) -> Result<String, CliError> {
    if from_stdin {
        let mut line = String::new();
        io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::Usage(format!("cannot read the password from stdin: {e}")))?;
        let password = line.strip_suffix('\n').unwrap_or(&line);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(CliError::Usage("no password on stdin".into()));
        }
        return Ok(password.to_string());
    }
    if !io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "stdin is not a terminal: give --password-stdin to read the password from stdin".into(),
        ));
    }
    let prompt_err = |e: io::Error| CliError::Usage(format!("cannot read the password: {e}"));
    let first = rpassword::prompt_password(format!("Password for {name}: ")).map_err(prompt_err)?;
    let second = rpassword::prompt_password("Repeat the password: ").map_err(prompt_err)?;
    if first != second {
        return Err(CliError::Usage("the passwords do not match".into()));
    }
    Ok(first)
}

/// A client plus output preferences for one command.
struct Session {
    client: Client,
    json: bool,
}

impl Session {
    fn new(args: &GlobalArgs) -> Result<Session, CliError> {
        let endpoint = Endpoint::parse(&args.server)?;
        let credentials = match (&args.user, &args.password) {
            (Some(user), Some(password)) => Some(Credentials {
                user: user.clone(),
                password: password.clone(),
            }),
            (Some(_), None) => {
                return Err(CliError::Usage(
                    "--user needs --password (or ESSCTL_PASSWORD)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(CliError::Usage(
                    "--password needs --user (or ESSCTL_USER)".into(),
                ))
            }
            (None, None) => None,
        };
        Ok(Session {
            client: Client::new(endpoint, credentials),
            json: args.json,
        })
    }

    /// Turns a non-2xx answer into the matching error.
    fn check(&self, response: Response) -> Result<Response, CliError> {
        if response.is_success() {
            return Ok(response);
        }
        let message = response.error_message();
        match response.status {
            401 => {
                let hint = if self.client.has_credentials() {
                    ""
                } else {
                    " (give --user and --password, or set ESSCTL_USER and ESSCTL_PASSWORD)"
                };
                Err(CliError::Auth(format!(
                    "authentication failed: {message}{hint}"
                )))
            }
            403 => Err(CliError::Auth(format!("not permitted: {message}"))),
            _ => Err(CliError::Server(message)),
        }
    }

    fn decode<T: DeserializeOwned>(&self, response: &Response) -> Result<T, CliError> {
        serde_json::from_slice(&response.body).map_err(|e| {
            CliError::Server(format!(
                "invalid answer from {}: {e}",
                self.client.endpoint()
            ))
        })
    }

    /// Prints the raw JSON (pretty) when `--json` is set; returns whether it did.
    fn print_json(&self, out: &mut dyn Write, response: &Response) -> Result<bool, CliError> {
        if !self.json {
            return Ok(false);
        }
        let value: serde_json::Value = self.decode(response)?;
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| CliError::Server(format!("cannot format the answer: {e}")))?;
        writeln!(out, "{text}")?;
        Ok(true)
    }

    /// With `--json`, prints the answer and returns `None`; otherwise
    /// decodes it for a table.
    fn table_data<T: DeserializeOwned>(
        &self,
        out: &mut dyn Write,
        response: &Response,
    ) -> Result<Option<T>, CliError> {
        if self.print_json(out, response)? {
            return Ok(None);
        }
        self.decode(response).map(Some)
    }

    fn get(&self, path: &str) -> Result<Response, CliError> {
        let response = self.client.get(path)?;
        self.check(response)
    }

    fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<Response, CliError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| CliError::Usage(format!("cannot encode the request: {e}")))?;
        self.check(self.client.post_json(path, &body)?)
    }

    fn delete(&self, path: &str) -> Result<Response, CliError> {
        let response = self.client.delete(path)?;
        self.check(response)
    }

    fn server(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/server")?;
        let Some(s) = self.table_data::<ServerView>(out, &response)? else {
            return Ok(());
        };
        let l = &s.listeners;
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        let rows = [
            ("Serial", s.serial.clone()),
            ("Name", output::or_dash(s.name.as_deref())),
            ("Device type", s.device_type.clone()),
            ("Version", s.version.clone()),
            ("I/O engine", s.io_engine.clone()),
            ("Workers", s.workers.to_string()),
            (
                "Scheduling",
                output::or_dash(Some(s.scheduling.as_str()).filter(|p| !p.is_empty())),
            ),
            (
                "Track size",
                format!("{} ({} bytes)", human_bytes(s.track_size), s.track_size),
            ),
            ("State dir", s.state_dir.clone()),
            ("Config file", s.config_file.clone()),
            ("Started", s.started.clone()),
            ("Uptime", output::duration(s.uptime_seconds)),
            ("NBD TCP", list(&l.nbd_tcp)),
            ("NBD Unix", output::or_dash(l.nbd_unix.as_deref())),
            ("API TCP", output::or_dash(l.api_tcp.as_deref())),
            ("Replication", output::or_dash(l.replication.as_deref())),
            ("LSSs", s.counts.lss.to_string()),
            ("Volumes", s.counts.volumes.to_string()),
            ("Clients", s.counts.clients.to_string()),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in rows {
            writeln!(out, "{key:<width$}  {value}")?;
        }
        Ok(())
    }

    fn health(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/health")?;
        let h: HealthView = self.decode(&response)?;
        if !self.print_json(out, &response)? {
            writeln!(
                out,
                "{} (serial {}, version {}, up {})",
                h.status,
                h.serial,
                h.version,
                output::duration(h.uptime_seconds)
            )?;
        }
        if h.status == "ok" {
            Ok(())
        } else {
            Err(CliError::Server(format!("server status is {}", h.status)))
        }
    }

    fn test_connection(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/server")?;
        let Some(s) = self.table_data::<ServerView>(out, &response)? else {
            return Ok(());
        };
        writeln!(
            out,
            "connection to {} ok (serial {}, version {})",
            self.client.endpoint(),
            s.serial,
            s.version
        )?;
        Ok(())
    }

    fn volume_list(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/volumes")?;
        let Some(list) = self.table_data::<VolumeList>(out, &response)? else {
            return Ok(());
        };
        // The FLASHCOPY column only while it has something to say.
        let flashcopy = list
            .volumes
            .iter()
            .any(|v| v.flashcopy_role != ROLE_NONE || v.incomplete);
        let rows: Vec<Vec<String>> = list
            .volumes
            .iter()
            .map(|v| {
                let mut row = vec![
                    v.id.clone(),
                    output::or_dash(v.alias.as_deref()),
                    v.lss.clone(),
                    human_bytes(v.size),
                    host_read_only(v),
                    v.clients.to_string(),
                ];
                if flashcopy {
                    row.push(flashcopy_summary(v));
                }
                row.push(v.backing_path.clone());
                row
            })
            .collect();
        let mut headers = vec!["ID", "ALIAS", "LSS", "SIZE", "RO", "CLIENTS"];
        if flashcopy {
            headers.push("FLASHCOPY");
        }
        headers.push("BACKING");
        out.write_all(output::table(&headers, &rows).as_bytes())?;
        Ok(())
    }

    fn volume_show(&self, out: &mut dyn Write, id: &str) -> Result<(), CliError> {
        let response = self.get(&format!("/v1/volumes/{}", client::encode_segment(id)))?;
        let Some(v) = self.table_data::<VolumeView>(out, &response)? else {
            return Ok(());
        };
        let s = &v.stats;
        let pairs = [
            ("id", v.id.clone()),
            ("alias", output::or_dash(v.alias.as_deref())),
            ("lss", v.lss.clone()),
            ("number", v.number.to_string()),
            (
                "size",
                format!("{} ({} bytes)", human_bytes(v.size), v.size),
            ),
            ("backing", v.backing_path.clone()),
            ("backing kind", v.backing_kind.clone()),
            ("read-only", host_read_only(&v)),
            ("alignment", v.alignment.to_string()),
            ("description", output::or_dash(v.description.as_deref())),
            ("clients", v.clients.to_string()),
            ("flashcopy role", v.flashcopy_role.clone()),
            (
                "flashcopy peer",
                output::or_dash(v.flashcopy_peer.as_deref()),
            ),
            ("incomplete", output::yes_no(v.incomplete)),
            ("reads", s.reads.to_string()),
            ("writes", s.writes.to_string()),
            ("bytes read", s.bytes_read.to_string()),
            ("bytes written", s.bytes_written.to_string()),
            ("flushes", s.flushes.to_string()),
            ("trims", s.trims.to_string()),
            ("write-zeroes", s.write_zeroes.to_string()),
            ("errors", s.errors.to_string()),
        ];
        out.write_all(output::key_values(&pairs).as_bytes())?;
        Ok(())
    }

    fn lss_list(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/lss")?;
        let Some(list) = self.table_data::<LssList>(out, &response)? else {
            return Ok(());
        };
        let rows: Vec<Vec<String>> = list
            .lss
            .iter()
            .map(|l| {
                vec![
                    l.id.clone(),
                    l.volumes.len().to_string(),
                    if l.volumes.is_empty() {
                        "-".into()
                    } else {
                        l.volumes.join(" ")
                    },
                ]
            })
            .collect();
        out.write_all(output::table(&["LSS", "VOLUMES", "IDS"], &rows).as_bytes())?;
        Ok(())
    }

    fn user_add(&self, out: &mut dyn Write, name: &str, password: &str) -> Result<(), CliError> {
        let body = serde_json::to_vec(&NewUser {
            name: name.to_string(),
            password: password.to_string(),
        })
        .map_err(|e| CliError::Usage(format!("cannot encode the request: {e}")))?;
        let response = self.check(self.client.post_json("/v1/users", &body)?)?;
        let Some(user) = self.table_data::<UserView>(out, &response)? else {
            return Ok(());
        };
        writeln!(out, "user {} added", user.name)?;
        Ok(())
    }

    fn user_list(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let response = self.get("/v1/users")?;
        let Some(list) = self.table_data::<UserList>(out, &response)? else {
            return Ok(());
        };
        for name in list.users {
            writeln!(out, "{name}")?;
        }
        Ok(())
    }

    fn user_remove(&self, out: &mut dyn Write, name: &str) -> Result<(), CliError> {
        let path = format!("/v1/users/{}", client::encode_segment(name));
        let response = self.check(self.client.delete(&path)?)?;
        let Some(user) = self.table_data::<UserView>(out, &response)? else {
            return Ok(());
        };
        writeln!(out, "user {} removed", user.name)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = Cli::try_parse_from([
            "essctl",
            "volume",
            "show",
            "demo0",
            "--json",
            "--server",
            "http://h:1",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.server, "http://h:1");
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCommand::Show { ref id }) if id == "demo0"
        ));
    }

    #[test]
    fn maps_errors_to_exit_codes() {
        let unreachable: CliError = ClientError::Connect {
            server: "x".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        }
        .into();
        assert_eq!(unreachable.exit_code(), EXIT_UNREACHABLE);
        // A request sent and not answered within the client's timeout
        // timed out; a connection that broke is unreachable.
        let io = |kind| -> CliError {
            ClientError::Io {
                server: "x".into(),
                source: io::Error::from(kind),
            }
            .into()
        };
        assert_eq!(io(io::ErrorKind::WouldBlock).exit_code(), EXIT_TIMEOUT);
        assert_eq!(io(io::ErrorKind::TimedOut).exit_code(), EXIT_TIMEOUT);
        assert_eq!(
            io(io::ErrorKind::ConnectionReset).exit_code(),
            EXIT_UNREACHABLE
        );
        let bad: CliError = Endpoint::parse("ftp://x").unwrap_err().into();
        assert_eq!(bad.exit_code(), EXIT_USAGE);
        let session = Session {
            client: Client::new(Endpoint::Unix("/x".into()), None),
            json: false,
        };
        let answer = |status, body: &str| Response {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        };
        let e = session
            .check(answer(404, r#"{"error":"volume X not found"}"#))
            .unwrap_err();
        assert_eq!(
            (e.exit_code(), e.to_string().as_str()),
            (1, "volume X not found")
        );
        for status in [401, 403] {
            let e = session
                .check(answer(status, r#"{"error":"no"}"#))
                .unwrap_err();
            assert_eq!(e.exit_code(), EXIT_AUTH);
        }
        assert!(session.check(answer(201, "{}")).is_ok());
        assert_eq!(CliError::Timeout("x".into()).exit_code(), EXIT_TIMEOUT);
    }
}
