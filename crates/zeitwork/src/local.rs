//! What `zeitwork up` needs on one machine besides the roles: the host
//! programs of the runtimes, a local certificate authority for
//! HTTPS on `*.zeitwork.localhost`, and the demo app built without Docker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use zeitwork_api_types::{Deployment, DeploymentStatus, UploadedImage};
use zeitwork_client::Client;
use zeitwork_image::archive::layer_tar;

/// (what must exist, the Debian package that provides it).
const HOST_PROGRAMS: &[(&str, &str)] =
    &[("runc", "runc"), ("ip", "iproute2"), ("mkfs.ext4", "e2fsprogs"), ("nft", "nftables")];
/// The demo app's image is built from the host's static busybox.
pub const BUSYBOX: &str = "/usr/bin/busybox";

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(program).is_file())
}

/// Makes sure the host programs are there: installs the missing packages with
/// apt when running as root on Debian/Ubuntu (saying so), else stops with the command to run.
pub fn ensure_host_programs(demo: bool, runtime: &str, may_install: bool) -> Result<()> {
    let mut missing: Vec<&str> = HOST_PROGRAMS.iter().filter(|(p, _)| !on_path(p)).map(|(_, pkg)| *pkg).collect();
    // The QEMU driver: the VMM and a guest kernel (Debian's smallest, with virtio modules).
    if runtime == "qemu" {
        if !on_path("qemu-system-x86_64") {
            missing.push("qemu-system-x86");
        }
        let has_kernel = std::fs::read_dir("/boot")
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
            .unwrap_or(false);
        if !has_kernel {
            missing.push("linux-image-cloud-amd64");
        }
    }
    if demo && !Path::new(BUSYBOX).is_file() {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !(may_install && root && on_path("apt-get")) {
        bail!(
            "this machine lacks what the runtime needs ({list}); install it with:\n    sudo apt-get install -y {list}"
        );
    }
    println!("Installing the host packages Zeitwork's runtime uses: {list}");
    let run = |args: &[&str]| -> Result<()> {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed; install by hand: sudo apt-get install -y {list}", args.join(" "));
        }
        Ok(())
    };
    run(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    run(&args)
}

/// The local CA (created once, its root in `DIR/ca.pem`) and a certificate for
/// `*.<apps domain>` it signs (renewed every start); returns (cert, key) paths.
pub fn local_tls(data: &Path, apps_domain: &str) -> Result<(PathBuf, PathBuf)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key_path = data.join("ca.key");
    let ca_pem_path = data.join("ca.pem");
    let ca_params = || -> Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Zeitwork local CA");
        dn.push(DnType::OrganizationName, "Zeitwork (this machine)");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Ok(p)
    };
    let ca_key = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) if ca_pem_path.exists() => KeyPair::from_pem(&pem).context("the local CA key is unreadable")?,
        _ => {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            crate::roles::write_private(&ca_key_path, &key.serialize_pem())?;
            std::fs::write(&ca_pem_path, cert.pem()).context("cannot write the local CA's root")?;
            key
        }
    };
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut leaf =
        CertificateParams::new(vec![format!("*.{apps_domain}"), apps_domain.to_owned(), "localhost".to_owned()])?;
    leaf.distinguished_name.push(DnType::CommonName, format!("*.{apps_domain}"));
    let now = std::time::SystemTime::now();
    leaf.not_before = (now - Duration::from_secs(3600)).into();
    leaf.not_after = (now + Duration::from_secs(397 * 86_400)).into();
    let leaf_key = KeyPair::generate()?;
    let cert = leaf.signed_by(&leaf_key, &issuer)?;
    let dir = data.join("tls");
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    crate::roles::write_private(&key_path, &leaf_key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// The demo app (examples/hello) as an OCI archive: busybox in one layer, the page in another.
pub fn demo_archive() -> Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("the demo needs {BUSYBOX} (busybox-static)"))?;
    let page = include_bytes!("../../../examples/hello/www/index.html");
    let layers = vec![
        layer_tar(&[("bin/", b""), ("bin/busybox", &busybox), ("bin/sh", b"->busybox")]),
        layer_tar(&[("www/", b""), ("www/index.html", page)]),
    ];
    let config = zeitwork_image::archive::BuildConfig {
        entrypoint: vec!["/bin/busybox".into(), "httpd".into(), "-f".into(), "-p".into(), "8080".into()],
        cmd: vec!["-h".into(), "/www".into()],
        env: vec!["PATH=/bin".into()],
        working_dir: Some("/www".into()),
        exposed_ports: vec![8080],
    };
    let mut out = Vec::new();
    zeitwork_image::archive::write_oci_archive(&mut out, &layers, &config)?;
    Ok(out)
}

/// Builds, uploads and deploys the demo as `demo/hello`; returns the live deployment.
pub async fn deploy_demo(client: &Client) -> Result<Deployment> {
    println!("Building the demo app (examples/hello) into an OCI image…");
    let archive = demo_archive()?;
    for (path, body) in [
        ("/api/v1/orgs", serde_json::json!({"slug": "demo", "name": "Demo"})),
        (
            "/api/v1/projects",
            serde_json::json!({"org": "demo", "name": "hello", "port": 8080, "instances_per_region": 1}),
        ),
    ] {
        match client.post::<_, serde_json::Value>(path, &body).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(409) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot set up the demo ({path})")),
        }
    }
    let up: UploadedImage = client
        .upload("/api/v1/orgs/demo/images?name=hello", "application/x-tar", archive.into())
        .await
        .context("cannot upload the demo image")?;
    // Started before with this very image: it is brought back, not deployed again.
    if let Ok(current) = client.get::<Deployment>("/api/v1/projects/demo/hello/deployments/current").await {
        if current.image == up.image && current.status == DeploymentStatus::Active {
            return Ok(current);
        }
    }
    println!("Deploying {}…", up.image);
    let d: Deployment = client
        .post("/api/v1/deployments", &serde_json::json!({"org": "demo", "project": "hello", "image": up.image}))
        .await
        .context("cannot deploy the demo")?;
    let started = std::time::Instant::now();
    loop {
        let now: Deployment = client.get(&format!("/api/v1/deployments/{}", d.id)).await?;
        match now.status {
            DeploymentStatus::Active => return Ok(now),
            DeploymentStatus::Failed => {
                bail!("the demo deployment failed: {} (see `zeitwork logs {}`)", now.reason.unwrap_or_default(), now.id)
            }
            _ if started.elapsed() > Duration::from_secs(120) => {
                bail!("the demo did not become ready within 2 minutes; it is {}", now.status.as_str())
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
