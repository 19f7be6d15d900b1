//! A small blocking HTTP/1.1 client for the management API, over a Unix
//! socket or TCP.
//!
//! One request per connection (`Connection: close`): the client writes the
//! request, reads until the server closes, then decodes the body according
//! to `Transfer-Encoding: chunked` or `Content-Length`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;

/// Largest response accepted, in bytes.
const MAX_RESPONSE: u64 = 64 << 20;
/// Default time allowed for connecting and for each read or write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed to establish a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the management API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `http://host:port`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl Endpoint {
    /// Parses `--server`: `http://host:port`, `unix:PATH`, or a socket path.
    pub fn parse(text: &str) -> Result<Endpoint, ClientError> {
        let bad = |why: &str| ClientError::BadEndpoint(format!("{text:?}: {why}"));
        if let Some(rest) = text.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.contains('/') {
                return Err(bad("give only http://host:port, without a path"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
                let port = after
                    .strip_prefix(':')
                    .ok_or_else(|| bad("a port is required, e.g. http://[::1]:8350"))?;
                (host, port)
            } else {
                authority
                    .rsplit_once(':')
                    .ok_or_else(|| bad("a port is required, e.g. http://127.0.0.1:8350"))?
            };
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            let port: u16 = port
                .parse()
                .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
            if port == 0 {
                return Err(bad("the port must be a number from 1 to 65535"));
            }
            return Ok(Endpoint::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if text.contains("://") {
            return Err(bad(
                "only http://host:port and Unix socket paths are supported",
            ));
        }
        let path = text.strip_prefix("unix:").unwrap_or(text);
        if path.is_empty() {
            return Err(bad("the socket path is empty"));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }

    /// Whether requests go over TCP (and so carry credentials).
    pub fn is_tcp(&self) -> bool {
        matches!(self, Endpoint::Tcp { .. })
    }

    fn host_header(&self) -> String {
        match self {
            Endpoint::Unix(_) => "localhost".into(),
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp { .. } => write!(f, "http://{}", self.host_header()),
        }
    }
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The `--server` value is not usable.
    #[error("invalid server {0}")]
    BadEndpoint(String),
    /// Could not connect.
    #[error("cannot connect to {server}: {source}")]
    Connect {
        /// The endpoint.
        server: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The connection failed while sending or receiving.
    #[error("connection to {server} failed: {source}")]
    Io {
        /// The endpoint.
        server: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The answer is not valid HTTP.
    #[error("invalid answer from {server}: {message}")]
    Protocol {
        /// The endpoint.
        server: String,
        /// What is wrong.
        message: String,
    },
}

/// User name and password for HTTP Basic authentication.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A decoded HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of a JSON error body, or the body text, or the status.
    pub fn error_message(&self) -> String {
        #[derive(serde::Deserialize)]
        struct Body {
            error: String,
        }
        if let Ok(b) = serde_json::from_slice::<Body>(&self.body) {
            return b.error;
        }
        let text = String::from_utf8_lossy(&self.body).trim().to_string();
        if text.is_empty() {
            format!("the server answered HTTP {}", self.status)
        } else {
            format!("the server answered HTTP {}: {text}", self.status)
        }
    }
}

/// A management API client; each request opens a new connection.
#[derive(Clone, Debug)]
pub struct Client {
    endpoint: Endpoint,
    credentials: Option<Credentials>,
    timeout: Duration,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Client {
    /// A client for `endpoint`; `credentials` are sent only over TCP.
    pub fn new(endpoint: Endpoint, credentials: Option<Credentials>) -> Client {
        Client {
            endpoint,
            credentials,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the time allowed for each read or write.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The server this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether credentials were given.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &[u8]) -> Result<Response, ClientError> {
        self.request("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Response, ClientError> {
        self.request("DELETE", path, None)
    }

    fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let server = self.endpoint.to_string();
        let connect_err = |source| ClientError::Connect {
            server: server.clone(),
            source,
        };
        let timeouts = |r: io::Result<()>| r.map_err(connect_err);
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path).map_err(connect_err)?;
                timeouts(s.set_read_timeout(Some(self.timeout)))?;
                timeouts(s.set_write_timeout(Some(self.timeout)))?;
                Ok(Box::new(s))
            }
            Endpoint::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(connect_err)?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT.min(self.timeout)) {
                        Ok(s) => {
                            timeouts(s.set_read_timeout(Some(self.timeout)))?;
                            timeouts(s.set_write_timeout(Some(self.timeout)))?;
                            // Best effort: the request is one small write anyway.
                            let _ = s.set_nodelay(true);
                            return Ok(Box::new(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(connect_err(last))
            }
        }
    }

    /// Sends one request and reads the whole answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: essctl/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            self.endpoint.host_header(),
            env!("CARGO_PKG_VERSION"),
        );
        if let (true, Some(c)) = (self.endpoint.is_tcp(), &self.credentials) {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.user, c.password));
            head.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method == "POST" || method == "PUT" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");

        let mut stream = self.connect()?;
        let server = self.endpoint.to_string();
        let io_err = |source| ClientError::Io {
            server: server.clone(),
            source,
        };
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request).map_err(io_err)?;
        stream.flush().map_err(io_err)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(io_err)?;
        if raw.is_empty() {
            // The connection broke (a server shutting down closes it so),
            // which is not an answer.
            return Err(io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection without answering",
            )));
        }
        parse_response(&raw).map_err(|message| ClientError::Protocol { server, message })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete HTTP/1.1 response (the server has closed the
/// connection), skipping interim 1xx answers.
pub fn parse_response(mut raw: &[u8]) -> Result<Response, String> {
    loop {
        if raw.is_empty() {
            return Err("the server closed the connection without answering".into());
        }
        let end = find(raw, b"\r\n\r\n").ok_or("incomplete response head")?;
        let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not UTF-8")?;
        let rest = &raw[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(format!("not an HTTP/1.x response: {status_line:?}"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?}"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) {
            raw = rest;
            continue;
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            dechunk(rest)?
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| format!("bad Content-Length {len:?}"))?;
            rest.get(..len)
                .ok_or_else(|| format!("body ends after {} of {len} bytes", rest.len()))?
                .to_vec()
        } else {
            rest.to_vec()
        };
        return Ok(Response { body, ..response });
    }
}

/// Decodes a chunked body (trailers are ignored).
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or("incomplete chunk size line")?;
        let line = std::str::from_utf8(&data[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data.get(..size).ok_or("body ends inside a chunk")?;
        body.extend_from_slice(chunk);
        data = data
            .get(size..)
            .and_then(|d| d.strip_prefix(b"\r\n"))
            .ok_or("missing CRLF after a chunk")?;
    }
}

/// Percent-encodes one path segment (everything but `A-Za-z0-9-._~`).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("/run/essd/api.sock").unwrap(),
            Endpoint::Unix("/run/essd/api.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:api.sock").unwrap(),
            Endpoint::Unix("api.sock".into())
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8350/").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 8350
            }
        );
        let v6 = Endpoint::parse("http://[::1]:8350").unwrap();
        assert_eq!(
            v6,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 8350
            }
        );
        assert_eq!(v6.to_string(), "http://[::1]:8350");
        for bad in [
            "http://host",
            "http://host:0",
            "http://host:x",
            "http://:80",
            "https://host:1",
            "http://h:1/v1",
            "",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_content_length_and_close_delimited() {
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}",
        )
        .unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.error_message(), "x");
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap();
        assert_eq!(r.body, b"hello");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
    }

    #[test]
    fn decodes_chunked_and_skips_interim() {
        let r = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello, world");
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n").is_err()
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
                .is_err()
        );
    }

    #[test]
    fn error_message_falls_back_to_text() {
        let r = Response {
            status: 502,
            headers: vec![],
            body: b"bad gateway\n".to_vec(),
        };
        assert_eq!(
            r.error_message(),
            "the server answered HTTP 502: bad gateway"
        );
    }

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode_segment("000FCA31"), "000FCA31");
        assert_eq!(encode_segment("a b/c?d%"), "a%20b%2Fc%3Fd%25");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }
}
