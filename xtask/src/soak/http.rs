//! One loopback HTTP GET, timed from connect to the last byte, with a hard deadline: a stuck
//! agent is recorded as a timeout instead of stalling the soak.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// How a GET ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `200 OK` with the whole body.
    Ok(String),
    /// No complete answer within the deadline.
    TimedOut,
    /// Refused, reset, another status, a truncated or malformed response: one line.
    Failed(String),
}

/// A GET's outcome and how long it took (connect to last byte, or until it was given up).
#[derive(Debug, Clone)]
pub struct Timed {
    pub latency: Duration,
    pub outcome: Outcome,
}

/// `GET path` on 127.0.0.1:`port` as HTTP/1.0 (the server closes the connection after the
/// response, so the last byte is the end of the stream), given up after `limit`.
pub fn get(port: u16, path: &str, limit: Duration) -> Timed {
    let start = Instant::now();
    let deadline = start + limit;
    let outcome = match fetch(port, path, deadline) {
        Ok(raw) => match parse_response(&raw) {
            Ok(body) => Outcome::Ok(body),
            Err(e) => Outcome::Failed(e),
        },
        Err(e) => e,
    };
    Timed {
        latency: start.elapsed(),
        outcome,
    }
}

fn fetch(port: u16, path: &str, deadline: Instant) -> Result<Vec<u8>, Outcome> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(io_outcome)?;
    s.set_write_timeout(Some(remaining(deadline)?))
        .map_err(io_outcome)?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(io_outcome)?;
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        s.set_read_timeout(Some(remaining(deadline)?))
            .map_err(io_outcome)?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_outcome(e)),
        }
    }
}

/// Time left before `deadline` (never zero: a zero socket timeout means "block forever").
fn remaining(deadline: Instant) -> Result<Duration, Outcome> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(Outcome::TimedOut)
}

fn io_outcome(e: std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Outcome::TimedOut,
        _ => Outcome::Failed(e.to_string()),
    }
}

/// The body of a complete `200` response; otherwise one line saying what was wrong.
fn parse_response(raw: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response header ({} bytes)", raw.len()))?;
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1);
    if !status.starts_with("HTTP/1.") || code != Some("200") {
        return Err(format!("status line {status:?}"));
    }
    let length = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    if let Some(want) = length
        && want != body.len()
    {
        return Err(format!(
            "truncated body: {} of {want} bytes (Content-Length)",
            body.len()
        ));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead as _, net::TcpListener, thread};

    use super::*;

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
        assert_eq!(parse_response(ok), Ok("ok\n".to_owned()));
        let no_length = b"HTTP/1.0 200 OK\r\n\r\na 1\n";
        assert_eq!(parse_response(no_length), Ok("a 1\n".to_owned()));
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok\n";
        assert!(parse_response(short).unwrap_err().contains("truncated"));
        let status = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert!(parse_response(status).unwrap_err().contains("503"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    /// A server that accepts and reads the request but never answers (until the client has
    /// given up): the GET ends at its deadline, and says so.
    #[test]
    fn a_silent_server_times_out_at_the_deadline() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut r = std::io::BufReader::new(s);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = wait.recv();
        });
        let t = get(port, "/healthz", Duration::from_millis(300));
        done.send(()).expect("server waits");
        server.join().expect("server");
        assert_eq!(t.outcome, Outcome::TimedOut);
        assert!(t.latency >= Duration::from_millis(300), "{:?}", t.latency);
        // Generous: only "it did not wait for the server" is asserted.
        assert!(t.latency < Duration::from_secs(10), "{:?}", t.latency);
    }

    #[test]
    fn a_closed_port_fails_at_once() {
        let port = crate::procs::free_port().expect("port");
        let t = get(port, "/healthz", Duration::from_secs(5));
        assert!(matches!(t.outcome, Outcome::Failed(_)), "{:?}", t.outcome);
        assert!(t.latency < Duration::from_secs(1));
    }
}
