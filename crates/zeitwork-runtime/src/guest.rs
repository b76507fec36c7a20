//! What a microVM boots: an uncompressed ELF kernel (`vmlinux`, for PVH boot
//! in QEMU and for Firecracker) extracted from the host's compressed
//! `vmlinuz`, and an initramfs (newc cpio) written here with Zeitwork's guest
//! init and the kernel modules it needs, listed in dependency order.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::RuntimeError;

/// Zeitwork's guest init, built statically for this target.
pub static GUEST_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/zeitwork-guest-init"));

/// Modules the guest loads when the kernel has them as modules (built-in
/// ones and absent optional ones are skipped).
pub const GUEST_MODULES: &[&str] =
    &["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay", "vmw_vsock_virtio_transport"];

/// Files a VM boots from.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel release (`uname -r` in the guest).
    pub release: String,
    pub source: PathBuf,
}

fn failed(context: &str, e: impl ToString) -> RuntimeError {
    RuntimeError::failed(context, e)
}

/// The kernel to use: `configured`, or the host's newest cloud kernel (the
/// smallest Debian flavour, with virtio drivers), or its newest kernel.
pub fn find_kernel(configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(k) = configured {
        if !k.is_file() {
            return Err(RuntimeError::Unavailable("the guest kernel", format!("{} does not exist", k.display())));
        }
        return Ok(k.to_owned());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    found.sort_by_key(|p| {
        (p.to_string_lossy().contains("-cloud-"), std::fs::metadata(p).and_then(|m| m.modified()).ok())
    });
    found.pop().ok_or_else(|| {
        RuntimeError::Unavailable(
            "the guest kernel",
            "no kernel in /boot; install one (Debian: apt-get install linux-image-cloud-amd64) or set the kernel path"
                .into(),
        )
    })
}

/// The kernel release a `vmlinuz-<release>` file or a bzImage names.
pub fn kernel_release(kernel: &Path, image: &[u8]) -> Option<String> {
    if let Some(r) = kernel.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("vmlinuz-")) {
        return Some(r.to_owned());
    }
    // bzImage: kernel_version at 0x20e points (minus 0x200) at "release (builder) #..."
    let ptr = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]) as usize + 0x200;
    let s = image.get(ptr..ptr + 128)?;
    let s = &s[..s.iter().position(|b| *b == 0).unwrap_or(s.len())];
    std::str::from_utf8(s).ok()?.split_whitespace().next().map(str::to_owned)
}

/// The ELF kernel inside a bzImage (or the file itself when it is ELF).
/// Handles LZ4 (Debian), gzip and zstd payloads.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, String> {
    if image.starts_with(b"\x7fELF") {
        return Ok(image.to_vec());
    }
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS header) and not an ELF kernel".into());
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let le32 = |at: usize| image.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let (offset, length) = (le32(0x248).ok_or("cut header")?, le32(0x24c).ok_or("cut header")?);
    let start = (setup_sects + 1) * 512 + offset;
    let payload = image.get(start..start + length).ok_or("the payload lies outside the file")?;
    let elf = if payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        lz4_legacy(payload)?
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(payload).read_to_end(&mut out).map_err(|e| format!("gzip: {e}"))?;
        out
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut out = Vec::new();
        ruzstd::decoding::StreamingDecoder::new(payload)
            .map_err(|e| format!("zstd: {e}"))?
            .read_to_end(&mut out)
            .map_err(|e| format!("zstd: {e}"))?;
        out
    } else {
        let magic: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "the kernel is compressed with a format Zeitwork does not read (magic {}); use an LZ4, gzip or zstd kernel or an ELF vmlinux",
            magic.join(" ")
        ));
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err("the decompressed kernel is not an ELF file".into());
    }
    Ok(elf)
}

/// The LZ4 "legacy" framing the kernel uses: magic, then blocks of up to
/// 8 MiB, each after its little-endian compressed size; the kernel build
/// appends the decompressed size, which ends the stream.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, String> {
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::new();
    let mut at = 4;
    while at + 4 <= data.len() {
        let size = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if size == 0x184c_2102 {
            at += 4; // a new stream starts
            continue;
        }
        if at + 4 + size > data.len() {
            break; // the trailing decompressed size
        }
        let block = &data[at + 4..at + 4 + size];
        let before = out.len();
        out.resize(before + BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[before..]).map_err(|e| format!("lz4: {e}"))?;
        out.truncate(before + n);
        at += 4 + size;
    }
    if out.is_empty() {
        return Err("lz4: no data".into());
    }
    Ok(out)
}

/// Module name as the kernel knows it (`virtio-net.ko` → `virtio_net`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module files to load for `wanted`, dependencies first, from a
/// `modules.dep` text. Names not listed (built in or absent) are skipped.
pub fn module_order(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else { continue };
        deps.insert(module_name(module), (module.to_owned(), rest.split_whitespace().map(str::to_owned).collect()));
    }
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((path, needs)) = deps.get(name) else { return };
        // modules.dep lists the full closure, the module's direct needs first;
        // loading from the end of the list puts every dependency before its user.
        for dep in needs.iter().rev() {
            visit(&module_name(dep), deps, seen, out);
        }
        out.push(path.clone());
    }
    let (mut seen, mut out) = (HashSet::new(), Vec::new());
    for w in wanted {
        visit(w, &deps, &mut seen, &mut out);
    }
    out
}

/// Writes a newc cpio archive.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), data);
    }

    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | mode, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// The initramfs: the init, /dev/console, and the modules (with /lib/modules/order).
pub fn initramfs(init: &[u8], modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in ["dev", "proc", "sys", "mnt", "lib", "lib/modules", "tmp"] {
        c.dir(d);
    }
    c.char_device("dev/console", 0o600, 5, 1);
    c.char_device("dev/null", 0o666, 1, 3);
    c.file("init", 0o755, init);
    let mut order = String::new();
    for (name, data) in modules {
        c.file(&format!("lib/modules/{name}"), 0o644, data);
        order.push_str(name);
        order.push('\n');
    }
    c.file("lib/modules/order", 0o644, order.as_bytes());
    c.finish()
}

fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        Ok(raw)
    } else if name.ends_with(".ko.zst") {
        let mut out = Vec::new();
        ruzstd::decoding::StreamingDecoder::new(raw.as_slice())
            .map_err(|e| e.to_string())?
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    } else if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    } else {
        Err(format!("{}: compressed in a format Zeitwork does not read (use .ko, .ko.zst or .ko.gz)", path.display()))
    }
}

/// Prepares (once per kernel and init) the guest's kernel and initramfs under `dir`.
pub fn prepare(dir: &Path, kernel: &Path, modules_root: Option<&Path>) -> Result<GuestAssets, RuntimeError> {
    let image = std::fs::read(kernel)
        .map_err(|e| RuntimeError::Unavailable("the guest kernel", format!("cannot read {}: {e}", kernel.display())))?;
    let release = kernel_release(kernel, &image).unwrap_or_default();
    let key = {
        let mut h = Sha256::new();
        h.update(&image);
        h.update(GUEST_INIT);
        h.update(release.as_bytes());
        hex::encode(&h.finalize()[..8])
    };
    let out = dir.join(&key);
    let assets = GuestAssets {
        vmlinux: out.join("vmlinux"),
        initramfs: out.join("initramfs.cpio"),
        release: release.clone(),
        source: kernel.to_owned(),
    };
    if assets.vmlinux.exists() && assets.initramfs.exists() {
        return Ok(assets);
    }
    let vmlinux = extract_vmlinux(&image)
        .map_err(|e| RuntimeError::Unavailable("the guest kernel", format!("{}: {e}", kernel.display())))?;
    let modules_dir =
        modules_root.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/lib/modules")).join(&release);
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep")).unwrap_or_default();
    let mut modules = Vec::new();
    for rel in module_order(&dep, GUEST_MODULES) {
        let data = read_module(&modules_dir.join(&rel)).map_err(|e| failed("reading a guest kernel module", e))?;
        modules.push((format!("{}.ko", module_name(&rel)), data));
    }
    if dep.is_empty() {
        tracing::warn!(dir = %modules_dir.display(), "no modules.dep for the guest kernel; assuming its virtio drivers are built in");
    }
    std::fs::create_dir_all(&out).map_err(|e| failed("creating the guest directory", e))?;
    let write = |path: &Path, data: &[u8]| -> Result<(), RuntimeError> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).map_err(|e| failed("writing the guest files", e))?;
        std::fs::rename(&tmp, path).map_err(|e| failed("writing the guest files", e))
    };
    write(&assets.vmlinux, &vmlinux)?;
    write(&assets.initramfs, &initramfs(GUEST_INIT, &modules))?;
    tracing::info!(kernel = %kernel.display(), %release, modules = modules.len(), dir = %out.display(), "guest kernel and initramfs prepared");
    Ok(assets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies() {
        let dep = "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
                   kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
                   kernel/net/core/failover.ko:\n\
                   kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n\
                   kernel/drivers/virtio/virtio.ko:\n";
        let order = module_order(dep, &["virtio_mmio", "virtio_net", "not_there"]);
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_mmio.ko",
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
            ]
        );
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        // mode field (second) of the first entry
        assert_eq!(&out[14..22], b"000081ED");
        let name_at = 110;
        assert_eq!(&out[name_at..name_at + 5], b"init\0");
        // header + "init\0" = 115, padded to 116, then the data
        assert_eq!(&out[116..119], b"abc");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn lz4_legacy_stream_decompresses() {
        let payload = b"zeitwork guest kernel ".repeat(1000);
        let block = lz4_flex::block::compress(&payload);
        let mut stream = vec![0x02, 0x21, 0x4c, 0x18];
        stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
        stream.extend_from_slice(&block);
        stream.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        assert_eq!(lz4_legacy(&stream).unwrap(), payload);
    }

    #[test]
    fn foreign_files_are_refused_with_the_reason() {
        assert!(extract_vmlinux(b"hello").unwrap_err().contains("not a bzImage"));
        let elf = b"\x7fELF rest".to_vec();
        assert_eq!(extract_vmlinux(&elf).unwrap(), elf);
    }

    /// The host's real kernel, when it has one: the extracted vmlinux is an
    /// x86-64 ELF and the release matches /lib/modules.
    #[test]
    fn the_hosts_kernel_is_extracted_when_present() {
        let Ok(kernel) = find_kernel(None) else {
            zeitwork_testkit::skip_unless_allowed(
                "HOST_KERNEL",
                "no kernel in /boot on this host (install linux-image-cloud-amd64)",
            );
            return;
        };
        let image = std::fs::read(&kernel).unwrap();
        let elf = extract_vmlinux(&image).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "EM_X86_64");
        assert!(elf.len() > image.len(), "decompressed is larger");
        assert!(kernel_release(&kernel, &image).is_some());
    }
}
