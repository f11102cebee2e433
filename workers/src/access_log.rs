//! Access log lines in gunicorn's format language: `%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s
//! %(b)s "%(f)s" "%(a)s"` by default (gunicorn's), any of its atoms in `access_log_format`.
//!
//! Every value a client controls is escaped (backslash, double quote, control and non-ASCII
//! bytes as `\xHH`), so a user agent such as `x" 500 "6.6.6.6` stays inside its quotes and a
//! line cannot be forged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// gunicorn's default `access_log_format`.
pub const GUNICORN_FORMAT: &str = r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// What a line can show of one request.
pub struct Record<'a> {
    pub remote: &'a str,
    pub method: &'a str,
    /// The request target as sent (path and query).
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub length: Option<u64>,
    pub duration: Duration,
    pub request_headers: &'a hyper::HeaderMap,
    pub response_headers: &'a hyper::HeaderMap,
    pub time: SystemTime,
}

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    /// `%(x)s`: one of gunicorn's one-letter atoms.
    Atom(char),
    /// `%({name}i)s` / `%({name}o)s` / `%({name}e)s`: a request or response header, or an
    /// environment variable (always `-`: there is no WSGI environment).
    Header(String, char),
}

/// A parsed `access_log_format`.
#[derive(Clone, Debug, PartialEq)]
pub struct Format(Vec<Piece>);

const ATOMS: &str = "hlutrmUqHsBbfaTDMLp";

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("%(") {
            literal.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let close = after
                .find(")s")
                .ok_or_else(|| format!("unterminated atom at {:?}", &rest[at..]))?;
            let name = &after[..close];
            let piece = if let Some(inner) = name.strip_prefix('{') {
                let (header, kind) = inner
                    .rsplit_once('}')
                    .ok_or_else(|| format!("bad atom %({name})s"))?;
                match kind {
                    "i" | "o" | "e" => Piece::Header(
                        header.to_ascii_lowercase(),
                        kind.chars().next().unwrap_or('i'),
                    ),
                    _ => {
                        return Err(format!(
                            "bad atom %({name})s: expected {{name}}i, {{name}}o or {{name}}e"
                        ))
                    }
                }
            } else {
                match name.chars().collect::<Vec<_>>()[..] {
                    [c] if ATOMS.contains(c) => Piece::Atom(c),
                    _ => {
                        return Err(format!(
                            "unknown atom %({name})s; gunicorn's atoms are {}",
                            ATOMS
                                .chars()
                                .map(|c| format!("%({c})s"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        ))
                    }
                }
            };
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(piece);
            rest = &after[close + 2..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Format(pieces))
    }

    pub fn gunicorn() -> Format {
        Format::parse(GUNICORN_FORMAT).expect("gunicorn's default format parses")
    }

    /// One line, without its newline.
    pub fn line(&self, r: &Record) -> String {
        let mut out = String::with_capacity(160);
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Atom(c) => out.push_str(&atom(*c, r)),
                Piece::Header(name, 'i') => out.push_str(&header(r.request_headers, name)),
                Piece::Header(name, 'o') => out.push_str(&header(r.response_headers, name)),
                Piece::Header(..) => out.push('-'),
            }
        }
        out
    }
}

fn header(headers: &hyper::HeaderMap, name: &str) -> String {
    match headers.get(name) {
        Some(v) => escape(v.as_bytes()),
        None => "-".into(),
    }
}

fn atom(c: char, r: &Record) -> String {
    let micros = r.duration.as_micros();
    let (path, query) = r.target.split_once('?').unwrap_or((r.target, ""));
    match c {
        'h' => escape(r.remote.as_bytes()),
        'l' => "-".into(),
        // The user of HTTP basic authentication; forkserve has none.
        'u' => "-".into(),
        't' => clf_time(r.time),
        'r' => escape(format!("{} {} {}", r.method, r.target, r.version).as_bytes()),
        'm' => escape(r.method.as_bytes()),
        'U' => escape(path.as_bytes()),
        'q' => escape(query.as_bytes()),
        'H' => escape(r.version.as_bytes()),
        's' => r.status.to_string(),
        'B' => r.length.unwrap_or(0).to_string(),
        'b' => r.length.map_or("-".into(), |n| n.to_string()),
        'f' => header(r.request_headers, "referer"),
        'a' => header(r.request_headers, "user-agent"),
        'T' => r.duration.as_secs().to_string(),
        'D' => micros.to_string(),
        'M' => (micros / 1000).to_string(),
        'L' => format!("{:.6}", r.duration.as_secs_f64()),
        'p' => format!("<{}>", std::process::id()),
        _ => "-".into(),
    }
}

/// Printable ASCII as is, except `"` and `\`, which are backslash-escaped; every other byte
/// as `\xHH`. An empty value is `-`, as in gunicorn.
pub fn escape(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "-".into();
    }
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// `[30/Nov/2026:05:20:35 +0000]`, the Common Log Format's time, in UTC.
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "[{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000]",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month (1-12), day from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderValue, REFERER, USER_AGENT};

    fn record<'a>(req: &'a hyper::HeaderMap, resp: &'a hyper::HeaderMap) -> Record<'a> {
        Record {
            remote: "127.0.0.1",
            method: "POST",
            target: "/cluster?x=1",
            version: "HTTP/1.1",
            status: 200,
            length: Some(512),
            duration: Duration::from_micros(1_234_567),
            request_headers: req,
            response_headers: resp,
            time: UNIX_EPOCH + Duration::from_secs(1_796_016_035),
        }
    }

    #[test]
    fn gunicorns_default_line() {
        let mut req = hyper::HeaderMap::new();
        req.insert(USER_AGENT, HeaderValue::from_static("curl/8.0"));
        let resp = hyper::HeaderMap::new();
        assert_eq!(
            Format::gunicorn().line(&record(&req, &resp)),
            r#"127.0.0.1 - - [30/Nov/2026:05:20:35 +0000] "POST /cluster?x=1 HTTP/1.1" 200 512 "-" "curl/8.0""#
        );
    }

    #[test]
    fn every_atom() {
        let mut req = hyper::HeaderMap::new();
        req.insert(REFERER, HeaderValue::from_static("http://r/"));
        req.insert("x-id", HeaderValue::from_static("42"));
        let mut resp = hyper::HeaderMap::new();
        resp.insert("x-worker-pid", HeaderValue::from_static("7"));
        let f = Format::parse("%(m)s %(U)s %(q)s %(H)s %(s)s %(B)s %(f)s %(T)s %(D)s %(M)s %(L)s %({x-id}i)s %({X-Worker-Pid}o)s %({HOME}e)s").unwrap();
        assert_eq!(
            f.line(&record(&req, &resp)),
            "POST /cluster x=1 HTTP/1.1 200 512 http://r/ 1 1234567 1234 1.234567 42 7 -"
        );
        assert!(Format::parse("%(z)s").is_err());
        assert!(Format::parse("%(h").is_err());
    }

    #[test]
    fn client_values_cannot_forge_a_line() {
        let mut req = hyper::HeaderMap::new();
        req.insert(
            USER_AGENT,
            HeaderValue::from_bytes(b"x\" 500 \"6.6.6.6\\ \xff").unwrap(),
        );
        let resp = hyper::HeaderMap::new();
        let line = Format::gunicorn().line(&record(&req, &resp));
        assert!(line.ends_with(r#""x\" 500 \"6.6.6.6\\ \xff""#), "{line}");
        assert_eq!(escape(b"a\nb"), "a\\x0ab");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
