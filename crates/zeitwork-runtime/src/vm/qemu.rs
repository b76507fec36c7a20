//! QEMU `-M microvm`: the command line of one VM (QMP, its control channel,
//! is in [`crate::qmp`]).

use std::path::{Path, PathBuf};

use super::{kernel_args, Accel, Vmm};
use crate::guest::GuestAssets;

/// QEMU's arguments for one VM.
#[allow(clippy::too_many_arguments)]
pub fn qemu_args(
    accel: Accel,
    assets: &GuestAssets,
    vcpu: u32,
    memory_mib: u32,
    disks: &[&Path],
    tap: Option<(&str, &str)>,
    qmp: Option<&Path>,
    probe: bool,
) -> Vec<String> {
    let vmm = Vmm::Qemu { binary: PathBuf::new(), accel };
    let mut a: Vec<String> = vec![
        "-M".into(),
        // The PIT and PIC let the kernel calibrate its clock under TCG too.
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on".into(),
        "-accel".into(),
        accel.to_string(),
        "-cpu".into(),
        match accel {
            // This host CPU model without arch-capabilities, which nested KVM often lacks.
            Accel::Kvm => "host,-arch-capabilities".into(),
            Accel::Tcg => "max".into(),
        },
        "-m".into(),
        format!("{memory_mib}M"),
        "-smp".into(),
        vcpu.max(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-serial".into(),
        "stdio".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        // QEMU's own seccomp filter: no obsolete system calls, no setuid, no
        // spawning processes, no changing its scheduling or resource limits.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-kernel".into(),
        assets.vmlinux.display().to_string(),
        "-initrd".into(),
        assets.initramfs.display().to_string(),
        "-append".into(),
        kernel_args(&vmm, probe),
    ];
    for (i, disk) in disks.iter().enumerate() {
        a.push("-drive".into());
        a.push(format!("id=disk{i},file={},format=raw,if=none,readonly=on", disk.display()));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{i}"));
    }
    if let Some((tap, mac)) = tap {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,ifname={tap},script=no,downscript=no"));
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={mac}"));
    }
    if let Some(q) = qmp {
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", q.display()));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_uses_microvm_with_the_accelerator_and_read_only_disks() {
        let assets =
            GuestAssets { vmlinux: "/k".into(), initramfs: "/i".into(), release: "r".into(), source: "/s".into() };
        let a = qemu_args(
            Accel::Kvm,
            &assets,
            2,
            256,
            &[Path::new("/d")],
            Some(("zwt1", "02:00:00:00:00:01")),
            None,
            false,
        );
        let joined = a.join(" ");
        assert!(joined.contains("-M microvm,x-option-roms=off"));
        assert!(joined.contains("-accel kvm -cpu host,-arch-capabilities"));
        assert!(joined.contains("-m 256M -smp 2"));
        assert!(joined.contains("file=/d,format=raw,if=none,readonly=on"));
        assert!(joined.contains("tap,id=net0,ifname=zwt1,script=no"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        let t = qemu_args(Accel::Tcg, &assets, 1, 128, &[], None, None, true).join(" ");
        assert!(t.contains("-accel tcg -cpu max"));
    }
}
