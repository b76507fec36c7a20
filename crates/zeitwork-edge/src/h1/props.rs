//! Property tests of the lean HTTP/1.1 path's parsers, and a differential
//! test against hyper: the fast path may hand anything to the general path,
//! but what it takes itself hyper must take too, read the same way, and
//! forward with the same headers; a response the fast path relays hyper
//! must accept, and the other way round.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn conn() -> ConnInfo {
    ConnInfo { client: "192.0.2.7:4000".parse().unwrap(), tls: false, sni: None }
}

fn pick(items: &[&'static str]) -> impl Strategy<Value = String> + Clone {
    prop::sample::select(items.to_vec()).prop_map(str::to_owned)
}

/// A word from the list, or a few arbitrary printable characters.
fn word(items: &[&'static str]) -> impl Strategy<Value = String> + Clone {
    prop_oneof![4 => pick(items), 1 => "[ -~]{0,6}", 1 => "[\\x00-\\xff]{0,3}"]
}

/// Requests of both kinds: odd ones, and ordinary ones with an odd detail
/// now and then (most of these the fast path takes).
fn request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![odd_request(), ordinary_request()]
}

fn ordinary_request() -> impl Strategy<Value = Vec<u8>> {
    let method = pick(&["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH"]);
    let target = pick(&["/", "/a?b=1", "/%7e/x", "//x", "/a/b/", "/?", "/x?y=\"z\"&w", "/{x}"]);
    let name =
        pick(&["Accept", "X-A", "Cookie", "Connection", "X-Request-Id", "X-Zeitwork-Instance", "TE", "Keep-Alive"]);
    let value = pick(&["*/*", "1", "a=b; c=d", "keep-alive", "close", "x-a", "Close, TE", "req-1.a_b", "", "  x  "]);
    let headers = prop::collection::vec((name, value), 0..5);
    let length = prop::option::of(0usize..40);
    (method, target, headers, length, prop::option::weighted(0.2, odd_request())).prop_map(
        |(method, target, headers, length, odd)| {
            if let Some(odd) = odd {
                return odd;
            }
            let mut r = format!("{method} {target} HTTP/1.1\r\nHost: web.apps.test\r\n");
            for (name, value) in headers {
                r.push_str(&format!("{name}: {value}\r\n"));
            }
            if let Some(n) = length {
                r.push_str(&format!("Content-Length: {n}\r\n\r\n{}", "b".repeat(n)));
            } else {
                r.push_str("\r\n");
            }
            r.into_bytes()
        },
    )
}

/// Request heads close to real ones, with the spellings that matter to a
/// proxy (duplicates, odd lengths, hop-by-hop lists, folding, bare LF).
fn odd_request() -> impl Strategy<Value = Vec<u8>> {
    let method = word(&["GET", "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "CONNECT", "get", "BREW"]);
    let target = word(&[
        "/",
        "/a?b=1",
        "/%7e/x",
        "*",
        "http://a/",
        "/.well-known/acme-challenge/t",
        "//x",
        "/a\"b",
        "/{x}",
        "/a|b",
        "/a#f",
        "/a\\b",
        "/^`",
        "/\u{e9}",
    ]);
    let version = pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1"]);
    let name = word(&[
        "Host",
        "host",
        "Content-Length",
        "content-length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "Expect",
        "X-Request-Id",
        "X-Zeitwork-Instance",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "X-Forwarded-For",
        "Accept",
        "x-secret",
        "Cookie",
    ]);
    let value = word(&[
        "a",
        "web.apps.test",
        "Web.Apps.Test:80",
        "web.apps.test.",
        "[::1]:80",
        "bad host",
        "0",
        "3",
        "03",
        "+3",
        "3, 3",
        " 3 ",
        "99999999999999999999",
        "chunked",
        "gzip, chunked",
        "close",
        "keep-alive, x-secret",
        "Close, TE",
        "upgrade",
        "100-continue",
        "req-1.a_b",
        "\u{e9}",
        "",
        "tab\tin",
    ]);
    let header = (name, value, prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r\n "]));
    let headers = prop::collection::vec(header, 0..7);
    let host = prop::option::weighted(0.9, pick(&["web.apps.test", "Web.Apps.Test:8083", "a", "x.y."]));
    (method, target, version, host, headers, prop::collection::vec(any::<u8>(), 0..8)).prop_map(
        |(method, target, version, host, headers, extra)| {
            let mut head = format!("{method} {target} {version}\r\n").into_bytes();
            let mut length = None;
            if let Some(h) = host {
                head.extend_from_slice(format!("Host: {h}\r\n").as_bytes());
            }
            for (name, value, end) in headers {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok().filter(|n| *n < 64);
                }
                let mut line = name.into_bytes();
                line.extend_from_slice(b": ");
                line.extend(value.chars().map(|c| c as u32 as u8));
                line.extend_from_slice(end.as_bytes());
                head.extend(line);
            }
            head.extend_from_slice(b"\r\n");
            head.extend(std::iter::repeat_n(b'b', length.unwrap_or(0)));
            head.extend(extra);
            head
        },
    )
}

fn mutated(s: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (s, prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3)).prop_map(|(mut bytes, flips)| {
        for (at, b) in flips {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
        }
        bytes
    })
}

/// What `parse_request` decides, in a comparable form.
#[derive(Debug, PartialEq)]
enum Decision {
    Partial,
    General,
    Ready { head_len: usize, body_len: usize, method: String, target: String, host: String, close: bool, out: Vec<u8> },
}

fn decide(buf: &[u8]) -> Decision {
    let mut out = Vec::new();
    match parse_request(buf, &conn(), &mut out) {
        Parse::Partial => Decision::Partial,
        Parse::General => Decision::General,
        Parse::Ready(p) => {
            // The request id is fresh unless the client sent a sane one.
            let rid = format!("x-request-id: {}\r\n", p.request_id);
            let out = String::from_utf8_lossy(&out).replace(&rid, "").into_bytes();
            Decision::Ready {
                head_len: p.head_len,
                body_len: p.body_len,
                method: p.method,
                target: p.target,
                host: p.host,
                close: p.close,
                out,
            }
        }
    }
}

/// Response heads close to real ones.
fn response() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let version = pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0"]);
    let status = pick(&["200 OK", "204 No Content", "304 Not Modified", "404 Not Found", "500 Oops", "299 Odd", "200"]);
    let header = prop_oneof![
        (Just("Content-Length".to_owned()), word(&["0", "5", "05", "+5", "5, 5", " 5", "-1", "18446744073709551616"])),
        (Just("Transfer-Encoding".to_owned()), word(&["chunked", "gzip, chunked", "chunked, gzip", "identity"])),
        (Just("Connection".to_owned()), word(&["close", "keep-alive", "x-a"])),
        (word(&["X-A", "x-request-id", "Keep-Alive", "Set-Cookie"]), word(&["1", "a b", ""])),
    ];
    let body = prop_oneof![
        // A chunked body, well formed or not.
        (prop::collection::vec((1usize..20, pick(&["", ";x=1", " ;y"])), 0..3), pick(&["", "t: 1\r\n"])).prop_map(
            |(chunks, trailer)| {
                let mut b = String::new();
                for (n, ext) in chunks {
                    b.push_str(&format!("{n:x}{ext}\r\n{}\r\n", "c".repeat(n)));
                }
                b.push_str(&format!("0\r\n{trailer}\r\n"));
                b.into_bytes()
            }
        ),
        prop::collection::vec(any::<u8>(), 0..12),
        Just(b"hello".to_vec()),
    ];
    (version, status, prop::collection::vec(header, 0..4), mutated(body), any::<bool>()).prop_map(
        |(version, status, headers, body, head_request)| {
            let mut r = format!("{version} {status}\r\n").into_bytes();
            for (name, value) in headers {
                r.extend(format!("{name}: ").bytes());
                r.extend(value.chars().map(|c| c as u32 as u8));
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"\r\n");
            r.extend(body);
            (r, head_request)
        },
    )
}

/// What the fast path makes of a whole response followed by the end of the
/// stream: `Some(body bytes relayed)`, or `None` when it refuses it.
fn fast_response(raw: &[u8], head_request: bool) -> Option<usize> {
    let mut out = Vec::new();
    let head = parse_response(raw, head_request, "rid", false, &mut out).ok()??;
    let rest = &raw[head.head_len..];
    match head.framing {
        Framing::Empty => Some(0),
        Framing::Length(n) => (rest.len() as u64 >= n).then_some(n as usize),
        Framing::Chunked => {
            let mut chunks = Chunks::default();
            let used = chunks.feed(rest).ok()?;
            chunks.done().then_some(used)
        }
        Framing::Close => Some(rest.len()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What hyper's server hands the application for `raw`, if it accepts it.
#[derive(Debug)]
struct Seen {
    method: String,
    target: String,
    headers: HeaderMap,
    body: Result<usize, String>,
}

fn hyper_request(raw: &[u8]) -> Option<Seen> {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let record = seen.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let record = record.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes().len()).map_err(|e| e.to_string());
                let mut r = record.lock().unwrap();
                if r.is_none() {
                    *r = Some(Seen {
                        method: parts.method.to_string(),
                        target: parts.uri.to_string(),
                        headers: parts.headers,
                        body,
                    });
                }
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let server = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // The whole request is written before the client's side is shut.
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        let task = tokio::spawn(server);
        client.write_all(raw).await.unwrap();
        client.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
        let _ = task.await;
        let seen = seen.lock().unwrap().take();
        seen
    })
}

/// What hyper's client makes of `raw` as the answer to a GET (or HEAD):
/// `Some(body bytes)`, or `None` when it refuses the response.
fn hyper_response(raw: &[u8], head_request: bool) -> Option<usize> {
    runtime().block_on(async {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let raw = raw.to_vec();
        let upstream = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && server.read(&mut b).await.unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let _ = server.write_all(&raw).await;
            let _ = server.shutdown().await;
            // Keep reading so the client never sees a reset.
            let _ = server.read_to_end(&mut head).await;
        });
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client)).await.ok()?;
        let driver = tokio::spawn(conn);
        let method = if head_request { hyper::Method::HEAD } else { hyper::Method::GET };
        let req = Request::builder().method(method).uri("/").header("host", "a").body(Empty::new()).unwrap();
        let res = sender.send_request(req).await;
        let seen = match res {
            Ok(res) => res.into_body().collect().await.ok().map(|b| b.to_bytes().len()),
            Err(_) => None,
        };
        drop(sender);
        driver.abort();
        upstream.abort();
        seen
    })
}

/// The headers a request reaches the instance with, leaving out those the
/// edge sets itself, as sorted `name: value` pairs.
fn forwarded(mut h: HeaderMap) -> Vec<(String, Vec<u8>)> {
    proxy::strip_hop_by_hop(&mut h);
    let mut out: Vec<(String, Vec<u8>)> = h
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .filter(|(n, _)| !n.starts_with("x-zeitwork-") && !SET_BY_THE_EDGE.contains(&n.as_str()))
        .collect();
    out.sort();
    out
}

fn forwarded_by_the_fast_path(out: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut pairs: Vec<(String, Vec<u8>)> = out
        .split(|b| *b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r")?;
            let at = line.windows(2).position(|w| w == b": ")?;
            Some((String::from_utf8_lossy(&line[..at]).to_ascii_lowercase(), line[at + 2..].to_vec()))
        })
        .filter(|(n, _)| !SET_BY_THE_EDGE.contains(&n.as_str()))
        .collect();
    pairs.sort();
    pairs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn parsing_a_request_never_panics(bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), mutated(request())]) {
        if let Decision::Ready { head_len, body_len, .. } = decide(&bytes) {
            prop_assert!(head_len <= bytes.len());
            prop_assert!(body_len as u64 <= proxy::RETRY_BUFFER);
        }
    }

    /// The serving loop parses again as bytes arrive: every prefix is
    /// either incomplete or decided as the whole.
    #[test]
    fn a_request_fed_in_pieces_is_decided_as_the_whole(bytes in mutated(request())) {
        let whole = decide(&bytes);
        for k in 0..bytes.len() {
            let part = decide(&bytes[..k]);
            if part != Decision::Partial {
                prop_assert_eq!(&part, &whole, "prefix of {} bytes", k);
            }
        }
    }

    #[test]
    fn parsing_a_response_never_panics(bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), response().prop_map(|r| r.0)],
                                       head_request in any::<bool>(), close in any::<bool>()) {
        let mut out = Vec::new();
        if let Ok(Some(h)) = parse_response(&bytes, head_request, "rid", close, &mut out) {
            prop_assert!(h.head_len <= bytes.len());
            prop_assert!(out.ends_with(b"\r\n\r\n"));
        }
    }

    #[test]
    fn a_response_fed_in_pieces_is_read_as_the_whole((bytes, head_request) in response()) {
        let mut out = Vec::new();
        let whole = parse_response(&bytes, head_request, "rid", false, &mut out).map(|h| h.map(|h| (h.head_len, h.framing, h.reusable)));
        for k in 0..bytes.len() {
            let mut out_k = Vec::new();
            let part = parse_response(&bytes[..k], head_request, "rid", false, &mut out_k).map(|h| h.map(|h| (h.head_len, h.framing, h.reusable)));
            if part != Ok(None) {
                prop_assert_eq!(&part, &whole, "prefix of {} bytes", k);
                prop_assert_eq!(&out_k, &out);
            }
        }
    }

    #[test]
    fn the_chunk_decoder_never_panics(bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), response().prop_map(|r| r.0)]) {
        let mut c = Chunks::default();
        if let Ok(n) = c.feed(&bytes) {
            prop_assert!(n <= bytes.len());
        }
    }

    /// Encoded chunks end exactly where the encoder stopped, whatever follows.
    #[test]
    fn chunked_bodies_end_where_they_were_written(
        chunks in prop::collection::vec((prop::collection::vec(any::<u8>(), 1..40), pick(&["", ";a=b", ";q=\"x\"", " ; e"])), 0..5),
        trailers in prop::collection::vec("[a-z]{1,8}: [ -~]{0,10}", 0..3),
        upper in any::<bool>(),
        after in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut body = Vec::new();
        for (data, ext) in &chunks {
            let size = if upper { format!("{:X}", data.len()) } else { format!("{:x}", data.len()) };
            body.extend(format!("{size}{ext}\r\n").bytes());
            body.extend(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n");
        for t in &trailers {
            body.extend(format!("{t}\r\n").bytes());
        }
        body.extend_from_slice(b"\r\n");
        let len = body.len();
        body.extend(after);
        let mut c = Chunks::default();
        prop_assert_eq!(c.feed(&body), Ok(len));
        prop_assert!(c.done());
    }

    /// Fed in any pieces, the decoder stops where it stops when fed whole,
    /// and fails where it fails.
    #[test]
    fn chunks_fed_in_pieces_end_as_the_whole(
        bytes in prop_oneof![response().prop_map(|r| r.0), prop::collection::vec(any::<u8>(), 0..64)],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        // Skip to the body when the bytes are a response.
        let start = bytes.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
        let body = &bytes[start..];
        let mut whole = Chunks::default();
        let whole_result = whole.feed(body).map(|n| (n, whole.done()));
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        at.push(0);
        at.push(body.len());
        at.sort();
        let mut pieces = Chunks::default();
        let mut used = 0;
        let mut result = Ok((0, false));
        for w in at.windows(2) {
            match pieces.feed(&body[w[0]..w[1]]) {
                Ok(n) => {
                    used += n;
                    result = Ok((used, pieces.done()));
                    if pieces.done() {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        prop_assert_eq!(result, whole_result);
    }
}

proptest! {
    // Each case runs hyper in-process; fewer cases keep the suite quick.
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A request the fast path takes is one hyper takes too, read the same
    /// way and forwarded with the same headers.
    #[test]
    fn the_fast_path_takes_only_what_hyper_reads_the_same(bytes in request()) {
        let Decision::Ready { head_len, body_len, method, target, host, out, .. } = decide(&bytes) else {
            return Ok(());
        };
        let seen = hyper_request(&bytes);
        prop_assert!(seen.is_some(), "hyper refuses what the fast path takes: {:?}", String::from_utf8_lossy(&bytes));
        let seen = seen.unwrap();
        prop_assert_eq!(&seen.method, &method);
        prop_assert_eq!(&seen.target, &target);
        prop_assert_eq!(seen.body, Ok(body_len), "{:?}", String::from_utf8_lossy(&bytes));
        let general_host = seen.headers.get("host").and_then(|h| h.to_str().ok()).and_then(proxy::normalize_host);
        prop_assert_eq!(general_host.as_deref(), Some(host.as_str()));
        prop_assert_eq!(forwarded_by_the_fast_path(&out), forwarded(seen.headers), "{:?}", String::from_utf8_lossy(&bytes[..head_len]));
    }

    /// A response is relayed by the fast path exactly when hyper accepts it,
    /// with as many body bytes when its length is not chunked.
    #[test]
    fn the_fast_path_relays_the_responses_hyper_accepts((bytes, head_request) in response()) {
        let fast = fast_response(&bytes, head_request);
        let hyper = hyper_response(&bytes, head_request);
        prop_assert_eq!(fast.is_some(), hyper.is_some(), "fast {:?}, hyper {:?}: {:?}", fast, hyper, String::from_utf8_lossy(&bytes));
        let mut out = Vec::new();
        if let Ok(Some(h)) = parse_response(&bytes, head_request, "rid", false, &mut out) {
            if h.framing != Framing::Chunked {
                prop_assert_eq!(fast, hyper, "{:?}", String::from_utf8_lossy(&bytes));
            }
        }
    }
}

/// The generators reach both sides of each decision often enough for the
/// properties above to mean something.
#[test]
fn the_generators_reach_both_paths() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut fast, mut general) = (0, 0);
    for _ in 0..400 {
        match decide(&request().new_tree(&mut runner).unwrap().current()) {
            Decision::Ready { .. } => fast += 1,
            _ => general += 1,
        }
    }
    assert!(fast >= 40 && general >= 40, "fast path {fast}, general path {general}");
    let (mut relayed, mut refused) = (0, 0);
    for _ in 0..400 {
        let (bytes, head_request) = response().new_tree(&mut runner).unwrap().current();
        match fast_response(&bytes, head_request) {
            Some(_) => relayed += 1,
            None => refused += 1,
        }
    }
    assert!(relayed >= 40 && refused >= 40, "relayed {relayed}, refused {refused}");
}
