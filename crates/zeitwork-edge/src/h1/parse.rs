//! Reading heads: the client's request head (taken by this path or handed
//! to the general one) and the instance's response head, each rewritten as
//! it is read into the head the other side gets.

use std::io::Write as _;

use super::framing::Framing;
use crate::proxy::{self, ConnInfo};

pub(super) const MAX_HEADERS: usize = 128;
/// Largest response head accepted from an instance.
pub(super) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Request headers the edge sets itself, besides the hop-by-hop ones.
pub(super) const SET_BY_THE_EDGE: [&str; 6] =
    ["host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "content-length"];

/// Response headers the edge decides itself (framing, request id), besides the hop-by-hop ones.
pub(super) const DECIDED_BY_THE_EDGE: [&str; 2] = ["x-request-id", "content-length"];

/// Hop-by-hop (the same list as the general path's), one of `extra`, or
/// listed in the message's `Connection` header.
pub(super) fn dropped(name: &str, extra: &[&str], listed: &[&str]) -> bool {
    proxy::HOP_BY_HOP.iter().chain(extra).chain(listed).any(|d| lower_eq(name, d))
}

/// A request this path serves, read from the head.
pub(super) struct Plan {
    pub(super) head_len: usize,
    pub(super) body_len: usize,
    pub(super) method: String,
    pub(super) target: String,
    pub(super) host: String,
    pub(super) request_id: String,
    /// The client asked to close after this response.
    pub(super) close: bool,
    /// The skew protection cookie the client sent.
    pub(super) skew_cookie: Option<String>,
    /// Header lines the edge adds to the instance's response.
    pub(super) stamp: Vec<u8>,
}

pub(super) enum Parse {
    Partial,
    /// Not for this path; the general path answers it.
    General,
    Ready(Plan),
}

pub(super) fn lower_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Parses the head in `buf` and, when this path takes it, writes the head
/// for the instance (without the per-instance lines and the final CRLF)
/// into `out`.
pub(super) fn parse_request(buf: &[u8], conn: &ConnInfo, out: &mut Vec<u8>) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::General,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else { return Parse::General };
    if method == "CONNECT" || !target.starts_with('/') || target.starts_with("/.well-known/acme-challenge/") {
        return Parse::General;
    }
    // A target hyper would refuse (characters httparse lets through) or
    // shorten (a fragment) is answered by the general path, as on TLS.
    let same_for_hyper =
        hyper::Uri::try_from(target).is_ok_and(|u| u.path_and_query().map(|p| p.as_str()) == Some(target));
    if !same_for_hyper {
        return Parse::General;
    }
    let mut host = None;
    let mut content_length = None;
    let mut close = false;
    let mut request_id = None;
    let mut skew_cookie = None;
    let mut listed: Vec<&str> = Vec::new();
    for h in req.headers.iter() {
        let name = h.name;
        if lower_eq(name, "host") {
            if host.is_some() {
                return Parse::General;
            }
            host = Some(h.value);
        } else if lower_eq(name, "content-length") {
            let digits = std::str::from_utf8(h.value).ok().filter(|v| !v.is_empty() && v.len() <= 19);
            let Some(n) = digits.filter(|v| v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse::<u64>().ok())
            else {
                return Parse::General;
            };
            if content_length.is_some() || n > proxy::RETRY_BUFFER {
                return Parse::General;
            }
            content_length = Some(n);
        } else if lower_eq(name, "transfer-encoding") || lower_eq(name, "upgrade") || lower_eq(name, "expect") {
            return Parse::General;
        } else if lower_eq(name, "connection") {
            let Ok(v) = std::str::from_utf8(h.value) else { return Parse::General };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                close |= lower_eq(token, "close");
                listed.push(token);
            }
        } else if lower_eq(name, "x-request-id") {
            request_id = Some(h.value);
        } else if lower_eq(name, "cookie") && skew_cookie.is_none() {
            skew_cookie = crate::skew::cookie_value(h.value).map(str::to_owned);
        }
    }
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()).and_then(proxy::normalize_host) else {
        return Parse::General;
    };
    let request_id = proxy::request_id(request_id);

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        let internal = name.as_bytes().get(..11).is_some_and(|p| p.eq_ignore_ascii_case(b"x-zeitwork-"));
        if !internal && !dropped(name, &SET_BY_THE_EDGE, &listed) {
            header_line(out, name.as_bytes(), h.value);
        }
    }
    if let Some(n) = content_length {
        header_line(out, b"content-length", n.to_string().as_bytes());
    }
    header_line(out, b"host", host.as_bytes());
    out.extend_from_slice(b"x-forwarded-for: ");
    let _ = write!(out, "{}", conn.client.ip());
    out.extend_from_slice(b"\r\n");
    header_line(out, b"x-forwarded-proto", if conn.tls { b"https" } else { b"http" });
    header_line(out, b"x-forwarded-host", host.as_bytes());
    header_line(out, b"x-request-id", request_id.as_bytes());
    Parse::Ready(Plan {
        head_len,
        body_len: content_length.unwrap_or(0) as usize,
        method: method.to_owned(),
        target: target.to_owned(),
        host,
        request_id,
        close,
        skew_cookie,
        stamp: Vec::new(),
    })
}

pub(super) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The instance's response head, rewritten for the client.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub(super) status: u16,
    pub(super) head_len: usize,
    pub(super) framing: Framing,
    /// The instance's connection may serve another request afterwards.
    pub(super) reusable: bool,
}

/// Parses a response head in `buf`; writes the client's head into `out`.
pub(super) fn parse_response(
    buf: &[u8],
    head_request: bool,
    request_id: &str,
    close: bool,
    stamp: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err("response head too large"),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response head"),
    };
    let (Some(status), Some(version)) = (res.code, res.version) else { return Err("malformed response head") };
    if status == 101 {
        return Err("switching protocols without an upgrade request");
    }
    // Framing is read as the general path's hyper reads it, so the two
    // paths accept and refuse the same responses: a list of equal decimal
    // lengths, the last transfer-encoding line deciding chunked, header
    // values that are not visible ASCII ignored.
    let mut length: Option<u64> = None;
    let mut length_header = false;
    let mut length_ok = true;
    let mut last_coding: Option<&[u8]> = None;
    let mut upstream_close = version == 0;
    let mut listed: Vec<&str> = Vec::new();
    for h in res.headers.iter() {
        if lower_eq(h.name, "content-length") {
            length_header = true;
            let Some(v) = header_text(h.value) else {
                length_ok = false;
                continue;
            };
            for item in v.split(',') {
                match decimal(item.trim()) {
                    Some(n) if length.is_none_or(|m| m == n) => length = Some(n),
                    _ => length_ok = false,
                }
            }
        } else if lower_eq(h.name, "transfer-encoding") {
            last_coding = Some(h.value);
        } else if lower_eq(h.name, "connection") {
            let Some(v) = header_text(h.value) else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if version == 0 && lower_eq(token, "keep-alive") {
                    upstream_close = false;
                }
                upstream_close |= lower_eq(token, "close");
                listed.push(token);
            }
        }
    }
    let chunked = last_coding.map(|v| {
        header_text(v).and_then(|v| v.rsplit(',').next()).is_some_and(|last| lower_eq(last.trim(), "chunked"))
    });
    let informational = (100..200).contains(&status);
    let framing = if informational || head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(_), _) if version == 0 => return Err("transfer-encoding in an HTTP/1.0 response"),
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, _) if !length_ok => return Err("invalid or conflicting content-length"),
            (None, Some(n)) if n > u64::MAX - 2 => return Err("content-length too large"),
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    // Both framings at once, or a transfer coding we cannot follow: the
    // connection is not trusted for another request.
    let reusable = !upstream_close && framing != Framing::Close && !(chunked.is_some() && length_header);
    let close_client = close || framing == Framing::Close;

    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        if !dropped(h.name, &DECIDED_BY_THE_EDGE, &listed) {
            header_line(out, h.name.as_bytes(), h.value);
        }
    }
    if !informational {
        match framing {
            Framing::Chunked => header_line(out, b"transfer-encoding", b"chunked"),
            Framing::Length(n) => header_line(out, b"content-length", n.to_string().as_bytes()),
            // A HEAD or 304 answer keeps the length it announces.
            Framing::Empty => {
                if let Some(n) = length.filter(|_| chunked.is_none() && length_ok) {
                    header_line(out, b"content-length", n.to_string().as_bytes());
                }
            }
            Framing::Close => {}
        }
        header_line(out, b"x-request-id", request_id.as_bytes());
        out.extend_from_slice(stamp);
        if close_client {
            header_line(out, b"connection", b"close");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead { status, head_len, framing, reusable }))
}

/// A header value as text, when it is visible ASCII (what hyper's
/// `HeaderValue::to_str` accepts).
pub(super) fn header_text(v: &[u8]) -> Option<&str> {
    v.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)).then(|| std::str::from_utf8(v).ok()).flatten()
}

/// Decimal digits only (no sign, no blanks), as a length.
pub(super) fn decimal(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnInfo {
        ConnInfo { client: "127.0.0.9:5000".parse().unwrap(), tls: false, sni: None }
    }

    fn plan(req: &str) -> (Option<Plan>, String) {
        let mut out = Vec::new();
        match parse_request(req.as_bytes(), &conn(), &mut out) {
            Parse::Ready(p) => (Some(p), String::from_utf8(out).unwrap()),
            Parse::Partial => panic!("partial: {req:?}"),
            Parse::General => (None, String::new()),
        }
    }

    #[test]
    fn ordinary_requests_are_rewritten_for_the_instance() {
        let (p, head) = plan(
            "POST /a?b=1 HTTP/1.1\r\nHost: Web.Apps.Test:80\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\n\
             X-Forwarded-For: 6.6.6.6\r\nX-Zeitwork-Instance: forged\r\nContent-Length: 3\r\nAccept: */*\r\n\r\nabc",
        );
        let p = p.unwrap();
        assert_eq!((p.host.as_str(), p.body_len, p.target.as_str(), p.close), ("web.apps.test", 3, "/a?b=1", false));
        assert!(head.starts_with("POST /a?b=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Accept: */*\r\n") && head.contains("content-length: 3\r\n"), "{head}");
        assert!(head.contains("x-forwarded-for: 127.0.0.9\r\n") && head.contains("host: web.apps.test\r\n"), "{head}");
        for gone in ["6.6.6.6", "forged", "x-secret", "keep-alive", "Connection"] {
            assert!(!head.contains(gone), "{gone} must not reach the instance: {head}");
        }
    }

    #[test]
    fn anything_unusual_goes_the_general_way() {
        for req in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        ] {
            assert!(plan(req).0.is_none(), "{req:?} must take the general path");
        }
    }

    fn response(raw: &str, head_request: bool) -> Result<Option<(ResponseHead, String)>, &'static str> {
        let mut out = Vec::new();
        let r = parse_response(raw.as_bytes(), head_request, "rid", false, b"", &mut out)?;
        Ok(r.map(|h| (h, String::from_utf8(out).unwrap())))
    }

    #[test]
    fn response_framing() {
        let (h, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Length(5), true));
        assert_eq!(out, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-request-id: rid\r\n\r\n");
        let (h, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(out.contains("transfer-encoding: chunked"));
        let (h, out) = response("HTTP/1.0 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
        assert!(out.contains("connection: close"), "{out}");
        let (h, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let (h, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false), "both framings: chunked wins, no reuse");
        assert!(response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", false).is_err());
        assert!(response("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).is_err());
        assert!(response("HTTP/1.1 101 Switching\r\n\r\n", false).is_err());
        assert!(response("HTTP/1.1 200 OK\r\nContent-Le", false).unwrap().is_none());
    }
}
