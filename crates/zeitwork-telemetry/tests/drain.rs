//! Log drains against real receivers on loopback: a TLS syslog listener
//! (rustls, a CA of its own) and HTTP receivers for each batch format.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::AsyncReadExt;
use zeitwork_telemetry::drain::{Forwarder, Options, Record, Severity, Source, Target};

fn record(n: usize, sev: Severity) -> Record {
    Record {
        at: chrono::Utc::now(),
        severity: sev,
        origin: format!("ins_{n}"),
        stream: "stdout".into(),
        source: Some(Source { org: "acme".into(), project: "web".into(), deployment: "web-abc1234-acme".into() }),
        message: format!("line {n}"),
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA (its PEM written to `dir/ca.pem`) and a server config for `localhost` signed by it.
fn tls_server(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "Zeitwork test log CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    Arc::new(config)
}

/// Reads octet-counted syslog frames (`LEN SP MSG`) from every connection into `got`.
async fn syslog_tls_receiver(config: Arc<rustls::ServerConfig>, got: Arc<Mutex<Vec<String>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, got) = (acceptor.clone(), got.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Take every whole frame off the front.
                    while let Some(sp) = buf.iter().position(|&b| b == b' ') {
                        let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().expect("an octet count");
                        if buf.len() < sp + 1 + len {
                            break;
                        }
                        let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                        got.lock().unwrap().push(msg);
                        buf.drain(..sp + 1 + len);
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn syslog_over_tls_reaches_a_receiver_whose_ca_is_given_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let port = syslog_tls_receiver(tls_server(dir.path()), got.clone()).await;
    let target = Target::parse(&format!("tls://localhost:{port}")).unwrap();
    let options = Options { ca_file: Some(dir.path().join("ca.pem")), ca_pem: None, token: None, reach: None };
    let f = Forwarder::start(target.clone(), "node-1", &options).unwrap();
    for n in 0..3 {
        f.push(record(n, if n == 1 { Severity::Error } else { Severity::Info }));
    }
    let msgs = until("three messages over TLS", || {
        let g = got.lock().unwrap();
        (g.len() >= 3).then(|| g.clone())
    })
    .await;
    assert!(msgs[0].starts_with("<14>1 ") && msgs[0].contains(" node-1 acme/web ins_0 stdout "), "{msgs:?}");
    assert!(msgs[1].starts_with("<11>1 ") && msgs[1].ends_with("line 1"), "{msgs:?}");
    assert_eq!(f.sent.load(std::sync::atomic::Ordering::Relaxed), 3);

    // Without the CA the receiver's certificate is not trusted: nothing is sent, the lines are counted as dropped.
    let untrusting = Forwarder::start(target, "node-1", &Options::default()).unwrap();
    untrusting.push(record(9, Severity::Info));
    until("the refused line counted", || {
        (untrusting.dropped.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert_eq!(got.lock().unwrap().len(), 3, "nothing reached the receiver over an untrusted connection");

    // A CA file that holds no certificate is refused at start, naming the file.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    let e = Forwarder::start(
        Target::parse("tls://localhost:1").unwrap(),
        "n",
        &Options { ca_file: Some(empty), ca_pem: None, token: None, reach: None },
    )
    .unwrap_err();
    assert!(e.contains("empty.pem"), "{e}");
}

type Received = Arc<Mutex<Vec<(String, Option<String>, Vec<u8>)>>>;

/// An HTTP receiver recording (content type, authorization, body); it answers
/// 503 to the first `fail_first` requests.
async fn http_receiver(fail_first: usize) -> (String, Received) {
    let got: Received = Arc::default();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new()
        .fallback(
            move |State((got, seen)): State<(Received, Arc<std::sync::atomic::AtomicUsize>)>,
                  headers: HeaderMap,
                  body: axum::body::Bytes| async move {
                if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
                got.lock().unwrap().push((h("content-type").unwrap_or_default(), h("authorization"), body.to_vec()));
                StatusCode::NO_CONTENT
            },
        )
        .with_state((got.clone(), seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("127.0.0.1:{}", addr.port()), got)
}

#[tokio::test]
async fn http_drains_send_batches_in_each_format_and_retry() {
    // A plain JSON array, with the bearer token; the receiver fails twice first, and the batch is retried.
    let (addr, got) = http_receiver(2).await;
    let options = Options { ca_file: None, ca_pem: None, token: Some("drain-token".into()), reach: None };
    let f = Forwarder::start(Target::parse(&format!("http://{addr}/ingest")).unwrap(), "node-1", &options).unwrap();
    for n in 0..5 {
        f.push(record(n, Severity::Info));
    }
    let (ct, auth, body) = until("a JSON batch", || got.lock().unwrap().first().cloned()).await;
    assert_eq!(ct, "application/json");
    assert_eq!(auth.as_deref(), Some("Bearer drain-token"));
    let docs: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(docs.as_array().unwrap().len(), 5, "the lines of one second go in one batch: {docs}");
    assert_eq!(docs[4]["message"], "line 4");
    assert_eq!(docs[4]["project"], "web");
    until("the sent count", || (f.sent.load(std::sync::atomic::Ordering::Relaxed) == 5).then_some(())).await;

    // Loki's push format.
    let (addr, got) = http_receiver(0).await;
    let f = Forwarder::start(
        Target::parse(&format!("loki+http://{addr}/loki/api/v1/push")).unwrap(),
        "n",
        &Options::default(),
    )
    .unwrap();
    f.push(record(1, Severity::Warning));
    let (_, auth, body) = until("a Loki push", || got.lock().unwrap().first().cloned()).await;
    assert_eq!(auth, None);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["streams"][0]["stream"]["level"], "warning", "{v}");
    assert_eq!(v["streams"][0]["values"][0][1], "origin=ins_1 line 1", "{v}");

    // Elasticsearch's bulk format.
    let (addr, got) = http_receiver(0).await;
    let f = Forwarder::start(
        Target::parse(&format!("elasticsearch+http://{addr}/logs/_bulk")).unwrap(),
        "n",
        &Options::default(),
    )
    .unwrap();
    f.push(record(2, Severity::Error));
    let (ct, _, body) = until("a bulk request", || got.lock().unwrap().first().cloned()).await;
    assert_eq!(ct, "application/x-ndjson");
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], r#"{"create":{}}"#);
    assert_eq!(serde_json::from_str::<serde_json::Value>(lines[1]).unwrap()["severity"], "err");

    // A receiver that keeps failing: the batch is given up and its lines counted as dropped, never blocking the sender.
    let (addr, got) = http_receiver(usize::MAX).await;
    let f = Forwarder::start(Target::parse(&format!("http://{addr}/")).unwrap(), "n", &Options::default()).unwrap();
    f.push(record(3, Severity::Info));
    until("the dropped count", || (f.dropped.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(())).await;
    assert!(got.lock().unwrap().is_empty());
}

/// An organisation's drain checks each address it would send to against its
/// reach when it resolves its host: a name or address that points at
/// loopback sends nothing there (the lines are dropped and counted) unless
/// loopback is allowed. Real UDP, TCP and HTTP receivers on loopback.
#[tokio::test]
async fn an_orgs_drain_sends_nothing_outside_its_reach() {
    use zeitwork_telemetry::drain::Reach;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let datagrams: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = datagrams.clone();
    tokio::spawn(async move {
        let mut buf = vec![0; 65536];
        while let Ok(n) = udp.recv(&mut buf).await {
            sink.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let frames: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = frames.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            });
        }
    });
    let (http_addr, posts) = http_receiver(0).await;
    let http_port = http_addr.rsplit_once(':').unwrap().1;

    let public_only = Options { reach: Some(Reach::default()), ..Default::default() };
    let loopback =
        Options { reach: Some(Reach::new(&["127.0.0.0/8".into(), "::1".into()]).unwrap()), ..Default::default() };
    let targets = [
        format!("udp://localhost:{udp_port}"),
        format!("udp://127.0.0.1:{udp_port}"),
        format!("tcp://localhost:{tcp_port}"),
        format!("tcp://127.0.0.1:{tcp_port}"),
        format!("http://localhost:{http_port}/refused"),
        format!("http://127.0.0.1:{http_port}/refused"),
    ];
    for t in &targets {
        let f = Forwarder::start(Target::parse(t).unwrap(), "node-1", &public_only).unwrap();
        for n in 0..3 {
            f.push(record(n, Severity::Info));
        }
        until(&format!("{t}'s lines dropped"), || {
            (f.dropped.load(std::sync::atomic::Ordering::Relaxed) == 3).then_some(())
        })
        .await;
        assert_eq!(f.sent.load(std::sync::atomic::Ordering::Relaxed), 0, "{t}");
    }
    // The receivers work: allowed drains reach them, by name and by address.
    for t in &targets {
        let f =
            Forwarder::start(Target::parse(&t.replace("refused", "allowed")).unwrap(), "node-1", &loopback).unwrap();
        f.push(record(7, Severity::Info));
        until(&format!("{t}'s line sent"), || (f.sent.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(()))
            .await;
    }
    let udp = datagrams.lock().unwrap().clone();
    assert_eq!(udp.len(), 2, "only the allowed drains' lines arrive: {udp:?}");
    assert!(udp.iter().all(|d| d.ends_with("line 7")), "{udp:?}");
    let tcp = frames.lock().unwrap().concat();
    assert_eq!(tcp.matches("line ").count(), 2, "{tcp}");
    assert!(!tcp.contains("line 0"), "{tcp}");
    let http = posts.lock().unwrap().clone();
    assert_eq!(http.len(), 2, "only the allowed drains' batches arrive");
    assert!(http.iter().all(|(_, _, body)| String::from_utf8_lossy(body).contains("line 7")));
}
