//! Pulling real images from a real registry (Debian's docker-registry).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use zeitwork_image::{ImageError, ImageStore, Limits, RegistryConfig};
use zeitwork_testkit::{layer_tar, Registry};

fn config() -> serde_json::Value {
    serde_json::json!({
        "Entrypoint": ["/bin/server"], "Cmd": ["--port", "8080"], "Env": ["PATH=/bin", "MODE=test"],
        "WorkingDir": "/app", "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_unpacks_caches_and_shares_one_pull() {
    let reg = Registry::start().unwrap();
    let base = layer_tar(&[
        ("bin/", b""),
        ("bin/server", b"#!/bin/sh\necho hi\n"),
        ("etc/", b""),
        ("etc/old.conf", b"old"),
        ("app/", b""),
        ("app/data/", b""),
        ("app/data/a", b"a"),
    ]);
    let top = layer_tar(&[
        ("etc/.wh.old.conf", b""),
        ("etc/new.conf", b"new"),
        ("app/data/.wh..wh..opq", b""),
        ("app/data/b", b"b"),
        ("lib", b"->bin"),
    ]);
    let digest = reg.push_image("team/web", "v1", &[base, top], config()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::new(dir.path(), RegistryConfig::default(), Limits::default()).unwrap());
    let reference = format!("{}/team/web:v1", reg.addr);
    // Five concurrent requests share one pull.
    let pulls: Vec<_> = (0..5)
        .map(|_| {
            let store = store.clone();
            let reference = reference.clone();
            tokio::spawn(async move { store.prepare(&reference).await })
        })
        .collect();
    let mut images = Vec::new();
    for p in pulls {
        images.push(p.await.unwrap().unwrap());
    }
    assert_eq!(store.client.blob_fetches.load(Ordering::Relaxed), 3, "config + 2 layers, fetched once");
    let img = &images[0];
    assert_eq!(img.manifest_digest, digest);
    let root = &img.rootfs;
    assert_eq!(std::fs::read(root.join("etc/new.conf")).unwrap(), b"new");
    assert!(!root.join("etc/old.conf").exists(), "whiteout removed the lower file");
    assert!(!root.join("app/data/a").exists() && root.join("app/data/b").exists(), "opaque dir");
    assert_eq!(std::fs::read_link(root.join("lib")).unwrap(), std::path::Path::new("bin"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(root.join("bin/server")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(img.config.entrypoint, ["/bin/server"]);
    assert_eq!(img.config.cmd, ["--port", "8080"]);
    assert_eq!(img.config.working_dir.as_deref(), Some("/app"));
    assert_eq!(img.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(img.config.exposed_ports, ["8080/tcp"]);

    // Cached by digest: a new store on the same directory fetches no blob.
    let again = ImageStore::new(dir.path(), RegistryConfig::default(), Limits::default()).unwrap();
    let cached = again.prepare(&format!("{}/team/web@{digest}", reg.addr)).await.unwrap();
    assert_eq!(cached.rootfs, img.rootfs);
    assert_eq!(again.client.blob_fetches.load(Ordering::Relaxed), 0);

    // The ext4 image for VMs.
    let ext4 = store.ext4(img).await.unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/new.conf"])
        .arg(&ext4)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_fail_with_a_reason_and_leave_the_cache_intact() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path(), RegistryConfig::default(), Limits::default()).unwrap();
    let good = reg.push_image("ok/app", "v1", &[layer_tar(&[("hello", b"world")])], config()).await.unwrap();
    let good_img = store.prepare(&format!("{}/ok/app:v1", reg.addr)).await.unwrap();
    assert_eq!(good_img.manifest_digest, good);

    // Missing image.
    let err = store.prepare(&format!("{}/ok/nothing:v1", reg.addr)).await.unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err}");

    // A layer that climbs out of the root.
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_old();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    let name = b"../../../../tmp/zeitwork-escape";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    evil.append(&h, &b"evil"[..]).unwrap();
    reg.push_image("bad/escape", "v1", &[evil.into_inner().unwrap()], config()).await.unwrap();
    let err = store.prepare(&format!("{}/bad/escape:v1", reg.addr)).await.unwrap_err();
    assert!(matches!(err, ImageError::BadLayer { .. }), "{err}");
    assert!(err.to_string().contains(".."), "{err}");
    assert!(!std::path::Path::new("/tmp/zeitwork-escape").exists());

    // A blob whose bytes do not match its digest.
    let tar = layer_tar(&[("file", b"genuine")]);
    let digest = reg.push_image("bad/corrupt", "v1", std::slice::from_ref(&tar), config()).await.unwrap();
    let manifest: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/v2/bad/corrupt/manifests/v1", reg.addr))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let path = reg.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let err = store.prepare(&format!("{}/bad/corrupt@{digest}", reg.addr)).await.unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

    // Nothing half-written stays behind; the good image is still there.
    assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none(), "staging is cleaned up");
    assert_eq!(std::fs::read(good_img.rootfs.join("hello")).unwrap(), b"world");

    // An unreachable registry says so.
    let port = zeitwork_testkit::free_port();
    let err = store.prepare(&format!("127.0.0.1:{port}/x/y:1")).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_keeps_images_in_use_and_shared_layers() {
    let reg = Registry::start().unwrap();
    let shared = layer_tar(&[("bin/", b""), ("bin/server", b"shared")]);
    let only_a = layer_tar(&[("a.txt", b"a")]);
    let only_b = layer_tar(&[("b.txt", &[b'b'; 100_000])]);
    reg.push_image("team/a", "v1", &[shared.clone(), only_a], config()).await.unwrap();
    reg.push_image("team/b", "v1", &[shared, only_b], config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path(), RegistryConfig::default(), Limits::default()).unwrap();
    let a = store.prepare(&format!("{}/team/a:v1", reg.addr)).await.unwrap();
    let b = store.prepare(&format!("{}/team/b:v1", reg.addr)).await.unwrap();
    let blobs = || std::fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs(), 5, "two configs, one shared layer, two own layers");
    let before = store.usage();

    // Under budget: nothing goes.
    let keep: std::collections::HashSet<String> = [a.manifest_digest.clone()].into();
    assert!(store.gc(u64::MAX, &keep, std::time::Duration::ZERO).await.is_empty());
    // Recently used images stay even over budget.
    assert!(store.gc(0, &keep, std::time::Duration::from_secs(3600)).await.is_empty());
    // Over budget: the image not in use goes, with the blobs only it used.
    let removed = store.gc(0, &keep, std::time::Duration::ZERO).await;
    assert_eq!(removed, vec![b.manifest_digest.clone()]);
    assert!(a.rootfs.join("a.txt").exists() && !b.rootfs.exists());
    assert_eq!(blobs(), 3, "a's config, the shared layer and a's own layer remain");
    assert!(store.usage() < before);
    // A removed image comes back on the next request.
    let again = store.prepare(&format!("{}/team/b:v1", reg.addr)).await.unwrap();
    assert_eq!(std::fs::read(again.rootfs.join("b.txt")).unwrap().len(), 100_000);
}

/// A registry that answers every request with `response` (or never, when `None`).
async fn hostile_registry(response: Option<&'static str>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                match response {
                    Some(r) => {
                        let _ = s.write_all(r.as_bytes()).await;
                    }
                    None => tokio::time::sleep(std::time::Duration::from_secs(30)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_registries_fail_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let registries = RegistryConfig { timeout_secs: Some(1), ..Default::default() };
    let store = ImageStore::new(dir.path(), registries, Limits::default()).unwrap();
    let pull = |addr: std::net::SocketAddr| {
        let store = &store;
        async move { store.prepare(&format!("{addr}/team/app:v1")).await.unwrap_err() }
    };
    let denied = hostile_registry(Some(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let err = pull(denied).await;
    assert!(matches!(err, ImageError::Unauthorized(_)), "{err}");
    assert!(err.to_string().contains("credentials"), "{err}");

    let broken = hostile_registry(Some("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops")).await;
    let err = pull(broken).await;
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert!(err.to_string().contains("500"), "{err}");

    let silent = hostile_registry(None).await;
    let started = std::time::Instant::now();
    let err = pull(silent).await;
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "a silent registry is given up on");

    let huge = hostile_registry(Some(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 99999999\r\n\r\n{",
    ))
    .await;
    let err = pull(huge).await;
    assert!(matches!(err, ImageError::TooLarge(_)), "{err}");

    // A layer of a media type no one can unpack.
    let reg = Registry::start().unwrap();
    let cfg = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}})).unwrap();
    let cfg_digest = reg.push_blob("odd/app", &cfg).await.unwrap();
    let layer = b"not a tar at all".to_vec();
    let layer_digest = reg.push_blob("odd/app", &layer).await.unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.example.squashfs", "digest": layer_digest, "size": layer.len()}],
    });
    let res = reqwest::Client::new()
        .put(format!("http://{}/v2/odd/app/manifests/v1", reg.addr))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let err = store.prepare(&format!("{}/odd/app:v1", reg.addr)).await.unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedMediaType(ref m) if m == "application/vnd.example.squashfs"), "{err}");
    assert!(std::fs::read_dir(dir.path().join("rootfs")).unwrap().next().is_none(), "nothing was cached");
}

/// A registry whose auth challenge names a token service on an internal
/// address (the cloud metadata address here) gets no token request: the
/// pull fails and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_service_on_an_internal_address_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let answer = "HTTP/1.1 401 Unauthorized\r\n\
                WWW-Authenticate: Bearer realm=\"http://169.254.169.254/latest/meta-data/token\",service=\"x\"\r\n\
                Content-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path(), RegistryConfig::default(), Limits::default()).unwrap();
    let err = store.prepare(&format!("{addr}/team/web:v1")).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized(_)), "{err}");
    assert!(err.to_string().contains("refused the token service"), "{err}");
    assert_eq!(seen.load(Ordering::SeqCst), 1, "only the registry itself was asked");
}
