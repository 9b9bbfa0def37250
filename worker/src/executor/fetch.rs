//! `ADD <url>`: a minimal HTTP/1.0 GET over a plain TCP stream (http:// only), enough for
//! ADD without pulling an HTTP client stack into the worker.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The file name BuildKit gives a downloaded URL: the last path segment.
pub fn url_file_name(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    let after_scheme = no_query
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(no_query);
    let path = after_scheme.split_once('/').map(|(_, p)| p).unwrap_or("");
    match path.rsplit('/').next() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

/// Why `ADD <url>` got no file; `url` is the one asked for last (after redirects).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "ADD {url}: only http:// URLs are supported by this executor (https needs a TLS client)"
    )]
    NotHttp { url: String },
    #[error("ADD {url}: connect {addr}: {source}")]
    Connect {
        url: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("ADD {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("ADD {url}: malformed HTTP response")]
    Malformed { url: String },
    #[error("ADD {url}: malformed HTTP status line")]
    StatusLine { url: String },
    #[error("ADD {url}: redirect without Location")]
    NoLocation { url: String },
    #[error("ADD {url}: invalid response status {status}")]
    Status { url: String, status: u16 },
    #[error("ADD {url}: too many redirects")]
    TooManyRedirects { url: String },
}

impl From<FetchError> for model::task::StageError {
    fn from(e: FetchError) -> Self {
        model::task::StageError::new(e.to_string())
    }
}

/// Fetches an http:// URL (following up to 5 redirects). https:// is refused.
pub fn http_get(url: &str) -> Result<Vec<u8>, FetchError> {
    let mut url = url.to_string();
    for _ in 0..6 {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| FetchError::NotHttp { url: url.clone() })?;
        let (hostport, path) = match rest.split_once('/') {
            Some((h, p)) => (h.to_string(), format!("/{p}")),
            None => (rest.to_string(), "/".to_string()),
        };
        let addr = if hostport.contains(':') {
            hostport.clone()
        } else {
            format!("{hostport}:80")
        };
        let mut s = TcpStream::connect(&addr).map_err(|source| FetchError::Connect {
            url: url.clone(),
            addr: addr.clone(),
            source,
        })?;
        s.set_read_timeout(Some(Duration::from_secs(300))).ok();
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: dbuild-worker\r\nAccept: */*\r\n\r\n"
        )
        .map_err(|source| FetchError::Io {
            url: url.clone(),
            source,
        })?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|source| FetchError::Io {
            url: url.clone(),
            source,
        })?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| FetchError::Malformed { url: url.clone() })?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let body = raw[split + 4..].to_vec();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| FetchError::StatusLine { url: url.clone() })?;
        match status {
            200..=299 => return Ok(body),
            301 | 302 | 303 | 307 | 308 => {
                let loc = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("location")
                            .then(|| v.trim().to_string())
                    })
                    .ok_or_else(|| FetchError::NoLocation { url: url.clone() })?;
                url = if loc.starts_with('/') {
                    format!("http://{hostport}{loc}")
                } else {
                    loc
                };
            }
            _ => return Err(FetchError::Status { url, status }),
        }
    }
    Err(FetchError::TooManyRedirects { url })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(url_file_name("http://h/a/b.tar.gz?x=1"), "b.tar.gz");
        assert_eq!(url_file_name("http://h/"), "__unnamed__");
        assert_eq!(url_file_name("http://h"), "__unnamed__");
    }

    #[test]
    fn serves_from_a_local_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // Read the whole request: closing with unread bytes would reset the
            // connection before the client reads the answer.
            let (mut req, mut buf) = (Vec::new(), [0u8; 1024]);
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf).unwrap() {
                    0 => break,
                    n => req.extend_from_slice(&buf[..n]),
                }
            }
            c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .unwrap();
        });
        assert_eq!(
            http_get(&format!("http://127.0.0.1:{port}/f.txt")).unwrap(),
            b"hello"
        );
        t.join().unwrap();
        assert!(http_get("https://example.invalid/").is_err());
    }
}
