//! Builds inside a microVM (`build_isolation = "vm"`): buildah runs in a
//! guest of its own, booted with the runtime's guest kernel and init, so a
//! kernel exploit in a `RUN` step stays inside that guest as an instance's
//! would.
//!
//! The guest gets, as virtio-blk disks of this build's VM only:
//! * the root: a read-only ext4 of the host's buildah with its `ldd` closure,
//!   `/etc/containers/policy.json` and a static busybox, written once per set
//!   of these files and shared between builds ([`zeitwork_runtime::buildvm`]);
//! * the context: a read-only ext4 of the unpacked source;
//! * the base images: a read-only ext4 of OCI layouts, one per image the
//!   Dockerfile names (`FROM`, `COPY --from`, `RUN --mount=…,from=`), fetched
//!   on the host with the node's registry settings and credentials (which
//!   never enter the guest) and verified blob by blob;
//! * the project's layer store: an ext4 image file of the build's disk limit,
//!   kept between the project's builds as its cache (a full store answers
//!   ENOSPC);
//! * the output: a raw disk the guest writes the oci-archive to (a header with
//!   its length, then the bytes), read back by the host without mounting it.
//!
//! The guest has no network device at all: `RUN` steps (buildah's `chroot`
//! isolation inside the VM) see only a loopback, and reach neither the host
//! nor anything else. buildah's output comes over the serial console like an
//! instance's logs. Over its time limit the VMM is killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use zeitwork_api_types::BuildJob;
use zeitwork_runtime::buildvm::{self, BuildVm, RootFiles};
use zeitwork_runtime::guest::GuestAssets;
use zeitwork_runtime::vm::{Accel, Vmm};

/// First bytes of an output disk before the guest wrote to it.
const OUTPUT_MAGIC: &[u8; 8] = b"ZWBOUT1\n";
/// First bytes of an output disk the guest wrote an image to: `ZWBLEN <bytes>\n`.
const OUTPUT_DONE: &str = "ZWBLEN ";
/// Where the image starts on the output disk.
const OUTPUT_OFFSET: u64 = 4096;
/// The layer store's file in the project's store directory.
pub const STORE_IMAGE: &str = "store.ext4";

/// What VM builds boot: the runtime's VMM and guest files, and the root disk.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    pub vmm: Vmm,
    pub assets: GuestAssets,
    pub root: PathBuf,
}

/// Whether this node builds in microVMs: `build_isolation` (`auto`, `vm`,
/// `host`) against the runtime it runs (`None`: host builds). `vm` on a
/// runtime that cannot is an error; `auto` takes a VM only with a VMM that
/// runs guests at full speed (QEMU with KVM).
pub fn vm_wanted(requested: &str, vmm: Option<&Vmm>) -> Result<bool, String> {
    match (requested, vmm) {
        ("host", _) => Ok(false),
        ("auto", Some(Vmm::Qemu { accel: Accel::Kvm, .. })) => Ok(true),
        ("auto", _) => Ok(false),
        ("vm", Some(Vmm::Qemu { .. })) => Ok(true),
        ("vm", Some(Vmm::Firecracker { .. })) => {
            Err("build VMs run on the qemu runtime; this node runs firecracker (use build_isolation host)".into())
        }
        ("vm", None) => Err("build VMs boot the microVM runtime's guest kernel; this node runs containers".into()),
        (other, _) => Err(format!("{other:?} is not a build isolation")),
    }
}

/// The root disk of build VMs for this host's `buildah` and busybox (written
/// once under `dir`, keyed by the digest of its files). Blocking.
pub fn prepare_root(dir: &Path, buildah: &Path) -> Result<PathBuf, String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or("build VMs need a static busybox (Debian: apt-get install busybox-static)")?;
    let policy = Path::new("/etc/containers/policy.json");
    if !policy.is_file() {
        return Err("build VMs need /etc/containers/policy.json (Debian: golang-github-containers-common)".into());
    }
    let mut files = RootFiles::default();
    files.program(buildah)?;
    files.static_program("/bin/busybox", busybox)?;
    files.file("/etc/containers/policy.json", policy);
    files.write("/etc/containers/registries.conf", b"unqualified-search-registries = [\"docker.io\"]\n");
    files.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    files.write("/etc/group", b"root:x:0:\n");
    // buildah's own name in the guest, whatever its path on the host.
    let dest = buildah.to_str().ok_or("buildah's path is not UTF-8")?;
    if dest != "/usr/bin/buildah" {
        files.write("/usr/bin/buildah", format!("#!/bin/busybox sh\nexec {dest} \"$@\"\n").as_bytes());
    }
    buildvm::root_disk(&dir.join("root"), &files)
}

/// The script the guest runs (busybox sh). Its arguments are buildah's build
/// options; the environment says the rest (`ZW_*`).
const GUEST_SCRIPT: &str = r#"set -e
B=/bin/busybox
$B mkdir -p /usr/local/bin
$B --install -s /usr/local/bin
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
mkdir -p /ctx /store /bases /run/buildah /run/secrets
chmod 700 /run/secrets
mount -t ext4 -o ro,noload "$(findfs LABEL=zwdata-ctx)" /ctx
mount -t ext4 "$(findfs LABEL=zwdata-store)" /store
if [ -n "$ZW_BASES" ]; then mount -t ext4 -o ro,noload "$(findfs LABEL=zwdata-bases)" /bases; fi
OUT=
for d in /dev/vd*; do
  if [ "$(head -c 8 "$d" 2>/dev/null)" = "ZWBOUT1" ]; then OUT=$d; fi
done
[ -n "$OUT" ] || { echo "the output disk is missing"; exit 70; }
i=0
for name in $ZW_SECRETS; do
  eval "printf %s \"\$ZW_SECRET_$i\"" > "/run/secrets/$i"
  unset "ZW_SECRET_$i"
  i=$((i + 1))
done
mkdir -p /store/storage /store/tmp
rm -rf /store/out.tar /store/tmp/buildah[0-9]* 2>/dev/null || true
export TMPDIR=/store/tmp
S="--root /store/storage --runroot /run/buildah --storage-driver $ZW_DRIVER"
cleanup() { buildah $S rm --all >/dev/null 2>&1 || true; }
trap cleanup EXIT
for i in $ZW_BASES; do
  id=$(buildah $S pull --quiet "oci:/bases/$i")
  buildah $S tag "$id" "$(cat "/bases/$i/name")"
done
buildah $S build --isolation chroot --pull=never --layers=true --tag "$ZW_TAG" "$@" /ctx
echo "==> exporting the image"
buildah $S push --quiet "$ZW_TAG" "oci-archive:/store/out.tar"
cleanup
buildah $S rmi --prune >/dev/null 2>&1 || echo "pruning the layer store's unused images failed"
n=$(stat -c %s /store/out.tar)
dd if=/store/out.tar of="$OUT" bs=4096 seek=1 conv=notrunc,fsync 2>/dev/null
printf 'ZWBLEN %s\n' "$n" | dd of="$OUT" bs=4096 count=1 conv=sync,notrunc,fsync 2>/dev/null
rm -f /store/out.tar
trap - EXIT
sync
umount /store
"#;

/// Images a Dockerfile builds from (`FROM`, `COPY --from`, `ADD --from`,
/// `RUN --mount=…,from=`), neither `scratch` nor its own stages, with build
/// arguments (`args` over the global `ARG` defaults) substituted.
pub fn base_images(dockerfile: &str, args: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(rest) = t.strip_suffix('\\') {
            cur.push_str(rest);
            cur.push(' ');
        } else {
            cur.push_str(t);
            joined.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        joined.push(cur);
    }
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut images: Vec<String> = Vec::new();
    let mut seen_from = false;
    let subst = |s: &str, vars: &BTreeMap<String, String>| -> Result<String, String> {
        let mut out = s.to_owned();
        for (k, v) in vars {
            out = out.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
        }
        if out.contains('$') {
            return Err(format!("{s:?}: a build argument without a value names the image"));
        }
        Ok(out)
    };
    let add = |image: String, stages: &[String], images: &mut Vec<String>| -> Result<(), String> {
        let lower = image.to_ascii_lowercase();
        if lower == "scratch" || stages.contains(&lower) || lower.parse::<u32>().is_ok() {
            return Ok(());
        }
        zeitwork_image::Reference::parse(&image).map_err(|e| format!("base image {image:?}: {e}"))?;
        if !images.contains(&image) {
            images.push(image);
        }
        Ok(())
    };
    for line in joined {
        let mut words = line.split_whitespace();
        let Some(instr) = words.next() else { continue };
        let words: Vec<&str> = words.collect();
        match instr.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                for w in &words {
                    let (k, v) = w.split_once('=').unwrap_or((w, ""));
                    let v = args.get(k).cloned().unwrap_or_else(|| v.trim_matches('"').to_owned());
                    if !v.is_empty() || args.contains_key(k) {
                        vars.insert(k.to_owned(), v);
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                let mut rest = words.iter().filter(|w| !w.starts_with("--"));
                let image = rest.next().ok_or("a FROM without an image")?;
                add(subst(image, &vars)?, &stages, &mut images)?;
                if let (Some(as_), Some(name)) = (rest.next(), rest.next()) {
                    if as_.eq_ignore_ascii_case("as") {
                        stages.push(name.to_ascii_lowercase());
                    }
                }
            }
            "COPY" | "ADD" => {
                for w in words.iter().take_while(|w| w.starts_with("--")) {
                    if let Some(from) = w.strip_prefix("--from=") {
                        add(subst(from, &vars)?, &stages, &mut images)?;
                    }
                }
            }
            "RUN" => {
                for w in words.iter().take_while(|w| w.starts_with("--")) {
                    if let Some(mount) = w.strip_prefix("--mount=") {
                        for opt in mount.split(',') {
                            if let Some(from) = opt.strip_prefix("from=") {
                                add(subst(from, &vars)?, &stages, &mut images)?;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(images)
}

/// Fetches `image` as an OCI image layout into `dir` (blobs verified by
/// digest), with its name beside it for the guest to tag it by.
async fn fetch_layout(
    registry: &zeitwork_image::registry::RegistryClient,
    image: &str,
    dir: &Path,
    max_bytes: u64,
) -> Result<u64, String> {
    let r = zeitwork_image::Reference::parse(image).map_err(|e| format!("{image}: {e}"))?;
    let (manifest, _) = registry.manifest(&r).await.map_err(|e| format!("pulling {image}: {e}"))?;
    let blobs = dir.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs).await.map_err(|e| format!("cannot store {image}: {e}"))?;
    let mut total = 0u64;
    for d in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
        let hex = d
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("{image}: blob digest {:?} is not sha256", d.digest))?;
        total += d.size;
        if total > max_bytes {
            return Err(format!("the base images are larger than the build's disk limit of {} MiB", max_bytes >> 20));
        }
        let dest = blobs.join(hex);
        if !dest.exists() {
            registry.blob(&r, d, &dest, max_bytes).await.map_err(|e| format!("pulling {image}: {e}"))?;
        }
    }
    // The layout's own manifest, in OCI media types (a Docker manifest's
    // blobs are the same bytes).
    let oci_layer = |m: &str| {
        if m.contains("gzip") {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else if m.contains("zstd") {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        }
    };
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": manifest.config.digest, "size": manifest.config.size},
        "layers": manifest.layers.iter().map(|l| serde_json::json!({
            "mediaType": oci_layer(&l.media_type), "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
    let digest = zeitwork_image::registry::digest_of(&bytes);
    let write = |p: PathBuf, b: Vec<u8>| async move {
        tokio::fs::write(&p, b).await.map_err(|e| format!("cannot store {}: {e}", p.display()))
    };
    write(blobs.join(digest.trim_start_matches("sha256:")), bytes.clone()).await?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": bytes.len()}],
    });
    write(dir.join("index.json"), index.to_string().into_bytes()).await?;
    write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()).await?;
    write(dir.join("name"), image.as_bytes().to_vec()).await?;
    Ok(total)
}

/// Bytes and entries under `dir` (not following links).
fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(list) = std::fs::read_dir(&d) else { continue };
        for e in list.flatten() {
            entries += 1;
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => bytes += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    (bytes, entries)
}

/// A read-only data disk of the tree `from`, labelled `label`. Blocking.
fn data_disk(image: &Path, label: &str, from: &Path) -> Result<(), String> {
    let (bytes, entries) = tree_size(from);
    // Room for the files, their blocks' slack, inodes and the file system itself.
    let size = (bytes + bytes / 4 + entries * 8192 + (8 << 20)).div_ceil(1 << 20) << 20;
    let inodes = (entries * 2 + 256).to_string();
    buildvm::mkfs_ext4(image, size, label, Some(from), &["-O", "^has_journal", "-N", &inodes])
}

/// The project's layer store: its ext4 image (made now when there is none,
/// or when the disk limit changed: then the cache starts cold). Blocking.
fn store_disk(store_dir: &Path, disk_mib: u64) -> Result<PathBuf, String> {
    std::fs::create_dir_all(store_dir).map_err(|e| format!("cannot create the layer store: {e}"))?;
    let image = store_dir.join(STORE_IMAGE);
    let size = disk_mib << 20;
    match std::fs::metadata(&image) {
        Ok(m) if m.len() == size => return Ok(image),
        Ok(m) => tracing::info!(
            store = %image.display(), was_mib = m.len() >> 20, now_mib = disk_mib,
            "the build disk limit changed: the project's layer store starts anew"
        ),
        Err(_) => {}
    }
    buildvm::mkfs_ext4(&image, size, "zwdata-store", None, &[])?;
    Ok(image)
}

/// Reads the image the guest wrote to the output disk into `archive`.
async fn read_output(disk: &Path, archive: &Path) -> Result<u64, String> {
    let mut f = tokio::fs::File::open(disk).await.map_err(|e| format!("cannot read the build's output: {e}"))?;
    let len = f.metadata().await.map_err(|e| format!("cannot read the build's output: {e}"))?.len();
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head).await.map_err(|e| format!("cannot read the build's output: {e}"))?;
    let text = String::from_utf8_lossy(&head);
    let n: u64 = text
        .strip_prefix(OUTPUT_DONE)
        .and_then(|r| r.split('\n').next())
        .and_then(|n| n.trim().parse().ok())
        .ok_or("the build VM wrote no image")?;
    if n == 0 || OUTPUT_OFFSET + n > len {
        return Err(format!("the build VM's image length {n} does not fit its output disk"));
    }
    f.seek(std::io::SeekFrom::Start(OUTPUT_OFFSET))
        .await
        .map_err(|e| format!("cannot read the build's output: {e}"))?;
    let mut out = tokio::fs::File::create(archive).await.map_err(|e| format!("cannot store the built image: {e}"))?;
    let copied =
        tokio::io::copy(&mut f.take(n), &mut out).await.map_err(|e| format!("cannot copy the built image: {e}"))?;
    out.flush().await.map_err(|e| format!("cannot store the built image: {e}"))?;
    if copied != n {
        return Err(format!("the build's output ended after {copied} of {n} bytes"));
    }
    Ok(n)
}

/// What a VM build is given.
pub struct VmBuild<'a> {
    pub builder: &'a VmBuilder,
    pub job: &'a BuildJob,
    pub work: &'a Path,
    pub ctx: &'a Path,
    /// The project's store directory (`cache/ORG/PROJECT`).
    pub store_dir: &'a Path,
    /// Build VMs' directories.
    pub vms: &'a Path,
    pub registries: &'a zeitwork_image::RegistryConfig,
    pub storage_driver: &'a str,
}

/// Builds the job's image in a microVM; the oci-archive lands at `archive`.
pub async fn build(
    b: VmBuild<'_>,
    archive: &Path,
    lines: mpsc::UnboundedSender<String>,
    say: impl Fn(String),
    cancel: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let job = b.job;
    let started = std::time::Instant::now();
    let dockerfile = std::fs::read_to_string(b.ctx.join(&job.dockerfile))
        .map_err(|e| format!("cannot read {}: {e}", job.dockerfile))?;
    let images = base_images(&dockerfile, &job.args)?;
    let disk_limit = job.disk_mib << 20;
    let bases = b.work.join("bases");
    if !images.is_empty() {
        let registry = zeitwork_image::registry::RegistryClient::new(b.registries.clone());
        let mut total = 0u64;
        for (i, image) in images.iter().enumerate() {
            say(format!("==> fetching the base image {image}"));
            let layout = bases.join(i.to_string());
            let fetch = fetch_layout(&registry, image, &layout, disk_limit.saturating_sub(total));
            total += tokio::select! {
                f = fetch => f?,
                _ = async { if cancel.wait_for(|c| *c).await.is_err() { std::future::pending::<()>().await } } => {
                    return Err("the build was cancelled".into())
                }
            };
        }
    }
    let (ctx, work, store_dir, disk_mib) = (b.ctx.to_owned(), b.work.to_owned(), b.store_dir.to_owned(), job.disk_mib);
    let with_bases = !images.is_empty();
    let output = work.join("output.img");
    let disks = tokio::task::spawn_blocking(move || -> Result<(PathBuf, Option<PathBuf>, PathBuf), String> {
        let ctx_disk = work.join("context.ext4");
        data_disk(&ctx_disk, "zwdata-ctx", &ctx)?;
        let bases_disk = if with_bases {
            let d = work.join("bases.ext4");
            data_disk(&d, "zwdata-bases", &work.join("bases"))?;
            let _ = std::fs::remove_dir_all(work.join("bases"));
            Some(d)
        } else {
            None
        };
        let store = store_disk(&store_dir, disk_mib)?;
        Ok((ctx_disk, bases_disk, store))
    })
    .await
    .map_err(|e| format!("preparing the build's disks failed: {e}"))??;
    let (ctx_disk, bases_disk, store) = disks;
    {
        let f = tokio::fs::File::create(&output).await.map_err(|e| format!("cannot create the output disk: {e}"))?;
        f.set_len(OUTPUT_OFFSET + (job.disk_mib << 20))
            .await
            .map_err(|e| format!("cannot size the output disk: {e}"))?;
        let mut f = f;
        f.write_all(OUTPUT_MAGIC).await.map_err(|e| format!("cannot write the output disk: {e}"))?;
        f.flush().await.map_err(|e| format!("cannot write the output disk: {e}"))?;
    }
    let tag = format!("localhost/zeitwork-build/{}:latest", job.project);
    let mut args = vec![
        "/bin/busybox".to_owned(),
        "sh".into(),
        "-c".into(),
        GUEST_SCRIPT.into(),
        "zeitwork-build".into(),
        "--file".into(),
        format!("/ctx/{}", job.dockerfile.trim_start_matches('/')),
    ];
    if let Some(t) = &job.target {
        args.extend(["--target".into(), t.clone()]);
    }
    for (k, v) in &job.args {
        args.extend(["--build-arg".into(), format!("{k}={v}")]);
    }
    let mut env = vec![
        format!("ZW_DRIVER={}", b.storage_driver),
        format!("ZW_TAG={tag}"),
        format!("ZW_BASES={}", (0..images.len()).map(|i| i.to_string()).collect::<Vec<_>>().join(" ")),
        format!("ZW_SECRETS={}", job.secrets.keys().cloned().collect::<Vec<_>>().join(" ")),
    ];
    for (i, (k, v)) in job.secrets.iter().enumerate() {
        env.push(format!("ZW_SECRET_{i}={v}"));
        args.extend(["--secret".into(), format!("id={k},src=/run/secrets/{i}")]);
    }
    let mut read_only = vec![b.builder.root.clone(), ctx_disk];
    read_only.extend(bases_disk);
    let vm = BuildVm {
        vmm: &b.builder.vmm,
        assets: &b.builder.assets,
        dir: b.vms.join(&job.id),
        name: format!("build-{}", job.id),
        vcpu: job.vcpu.max(1),
        memory_mib: job.memory_mib,
        args,
        env,
        read_only,
        writable: vec![store, output.clone()],
        limit: std::time::Duration::from_secs(job.timeout_secs).saturating_sub(started.elapsed()),
    };
    say(format!(
        "==> building {} (target {}) with buildah in a microVM ({}); limits: {} MiB memory, {} vCPU, {} s, {} MiB disk, no network",
        job.dockerfile,
        job.target.as_deref().unwrap_or("last stage"),
        b.builder.vmm.accel(),
        job.memory_mib,
        job.vcpu,
        job.timeout_secs,
        job.disk_mib
    ));
    let ran = buildvm::run_build_vm(vm, lines, cancel).await;
    ran.map_err(|e| e.to_string())?;
    read_output(&output, archive).await?;
    if let Err(e) = tokio::fs::remove_file(&output).await {
        tracing::warn!(disk = %output.display(), error = %e, "cannot remove a build's output disk");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_follows_the_runtime() {
        let kvm = Vmm::Qemu { binary: "q".into(), accel: Accel::Kvm };
        let tcg = Vmm::Qemu { binary: "q".into(), accel: Accel::Tcg };
        let fc = Vmm::Firecracker { binary: "f".into(), jailer: None };
        assert_eq!(vm_wanted("auto", Some(&kvm)), Ok(true));
        assert_eq!(vm_wanted("auto", Some(&tcg)), Ok(false), "TCG builds would be too slow");
        assert_eq!(vm_wanted("auto", Some(&fc)), Ok(false));
        assert_eq!(vm_wanted("auto", None), Ok(false));
        assert_eq!(vm_wanted("vm", Some(&tcg)), Ok(true));
        assert!(vm_wanted("vm", None).unwrap_err().contains("containers"));
        assert!(vm_wanted("vm", Some(&fc)).is_err());
        assert_eq!(vm_wanted("host", Some(&kvm)), Ok(false));
    }

    #[test]
    fn base_images_are_the_named_ones_only() {
        let args = BTreeMap::from([("VERSION".to_owned(), "2".to_owned())]);
        let df = "# syntax\nARG BASE=registry.example.com/node\nARG VERSION=1\n\
                  FROM --platform=linux/amd64 ${BASE}:$VERSION AS build\nRUN make\n\
                  FROM scratch\nCOPY --from=build /out /out\nCOPY --from=127.0.0.1:5000/tools:1 \\\n  /bin/t /t\n\
                  RUN --mount=type=cache,target=/c --mount=type=bind,from=alpine:3,target=/a true\n\
                  FROM build\nCOPY --from=0 /a /b\n";
        assert_eq!(
            base_images(df, &args).unwrap(),
            vec!["registry.example.com/node:2", "127.0.0.1:5000/tools:1", "alpine:3"]
        );
        assert!(base_images("FROM $NOPE\n", &BTreeMap::new()).unwrap_err().contains("build argument"));
        assert!(base_images("FROM scratch\nCOPY a /a\n", &BTreeMap::new()).unwrap().is_empty());
        assert!(base_images("FROM UPPER/Case\n", &BTreeMap::new()).is_err());
    }
}
