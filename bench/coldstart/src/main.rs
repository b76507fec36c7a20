//! Cold start benchmark: from "start this instance" to the first HTTP 200
//! from the app, with the container runtime (image already in the cache, as
//! on a deploy to a node that has it). Zeitwork's driver (overlay, network
//! namespace, veth, cgroup limits, log capture) against bare `runc run` of
//! the same root filesystem on the host network, in the same run.
//!
//! Then the microVM runtimes available on the host (QEMU, with KVM when it
//! really runs a guest here and TCG otherwise; Firecracker when
//! `ZEITWORK_FIRECRACKER_BIN` names one): create → first HTTP 200, median of
//! `--vm-runs`, next to the floor of the same VMM booting the same kernel and
//! initramfs to the guest init's first line (no disks, network or app).
//!
//! `cargo run --release -p zeitwork-bench-coldstart -- [--runs 10] [--vm-runs 5]`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use zeitwork_bench_coldstart::{bare_runc, first_200, median, ms};
use zeitwork_bench_edge::flag;
use zeitwork_image::{ImageStore, Limits, RegistryConfig};
use zeitwork_runtime::container::ContainerRuntime;
use zeitwork_runtime::logs::LogStore;
use zeitwork_runtime::{InstanceSpec, Runtime};

#[tokio::main]
async fn main() -> Result<()> {
    let runs = flag("--runs", 10).max(1);
    let reg = zeitwork_testkit::Registry::start()?;
    let image = reg.push_busybox("bench/web", "v1", "exec /bin/busybox httpd -f -p $PORT -h /www").await?;
    let dir = tempfile::tempdir()?;
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default())?;
    let img = images.prepare(&image).await?;
    let logs = Arc::new(LogStore::new(&dir.path().join("logs"))?);
    let runtime =
        ContainerRuntime::new(&dir.path().join("instances"), Path::new("runc"), "10.230.0.0".parse()?, logs).await?;

    // The same app for every runtime: 1 vCPU, the image's command on port 8080.
    let spec_of = |id: &str, memory_mib: u32, disk: Option<std::path::PathBuf>| InstanceSpec {
        id: id.to_owned(),
        rootfs: img.rootfs.clone(),
        image: img.config.clone(),
        env: Vec::new(),
        port: 8080,
        vcpu: 1,
        memory_mib,
        disk,
        dns_search: None,
    };
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for i in 0..runs {
        let id = format!("ins_bench{i:04}_{}", std::process::id());
        let spec = spec_of(&id, 128, None);
        let t = Instant::now();
        let running = runtime.start(&spec).await?;
        first_200(running.address, Duration::from_secs(20)).await?;
        let took = t.elapsed();
        ours.push(took);
        runtime.destroy(&id).await?;

        let bare = bare_runc(&img.rootfs, 18_080 + i as u16, dir.path(), &format!("zwbench-bare-{i}")).await?;
        peer.push(bare);
        println!("  run {:>2}: zeitwork {:>6.1} ms, bare runc {:>6.1} ms", i + 1, ms(took), ms(bare));
    }
    let (o, p) = (median(ours), median(peer));
    println!();
    println!("cold start to first HTTP 200 (container runtime, cached image), median of {runs}:");
    println!("  zeitwork container driver: {:>7.1} ms  (goal: < 150 ms)", ms(o));
    println!("  bare runc, host network:   {:>7.1} ms", ms(p));
    println!("  ratio (zeitwork / bare):   {:>7.2}x", o.as_secs_f64() / p.as_secs_f64());

    let vm_runs = flag("--vm-runs", 5).max(1);
    let disk = images.ext4(&img).await?;
    let mut wanted = vec![("qemu", None)];
    if let Some(fc) = std::env::var_os("ZEITWORK_FIRECRACKER_BIN") {
        wanted.push(("firecracker", Some(std::path::PathBuf::from(fc))));
    } else {
        println!();
        println!("firecracker: skipped (set ZEITWORK_FIRECRACKER_BIN to a firecracker binary)");
    }
    for (name, firecracker) in wanted {
        let vm_logs = Arc::new(LogStore::new(&dir.path().join(format!("logs-{name}")))?);
        let options = zeitwork_runtime::select::SelectOptions {
            requested: name.into(),
            dir: dir.path().join(name),
            oci_runtime: "runc".into(),
            qemu: "qemu-system-x86_64".into(),
            firecracker,
            jailer: None,
            kernel: None,
            base: "10.231.0.0".parse()?,
            disk_budget: 4 << 30,
            vmm_user: None,
            confinement: Default::default(),
        };
        let selected = match zeitwork_runtime::select::select(&options, vm_logs).await {
            Ok(s) => s,
            Err(e) => {
                println!();
                println!("{name}: not available here ({e})");
                continue;
            }
        };
        let zeitwork_runtime::AnyRuntime::Vm(vm) = &selected.runtime else { bail!("{name} is not a VM runtime") };
        let (vmm, accel) = (vm.vmm().clone(), vm.vmm().accel());
        let assets = zeitwork_runtime::guest::prepare(
            &dir.path().join(name).join("guest"),
            &zeitwork_runtime::guest::find_kernel(None)?,
            None,
        )?;
        println!();
        println!("{name} ({accel}): {}", selected.detail);
        let (mut vms, mut floors) = (Vec::new(), Vec::new());
        for i in 0..vm_runs {
            let id = format!("ins_benchvm{i:03}_{}", std::process::id());
            let spec = spec_of(&id, 256, Some(disk.clone()));
            let t = Instant::now();
            let running = selected.runtime.start(&spec).await?;
            first_200(running.address, Duration::from_secs(180)).await?;
            let took = t.elapsed();
            selected.runtime.destroy(&id).await?;
            let floor = zeitwork_runtime::vm::probe(&vmm, &assets, &dir.path().join("probe"), Duration::from_secs(120))
                .await
                .map_err(anyhow::Error::msg)?;
            println!("  run {:>2}: zeitwork {:>7.1} ms, kernel-to-init floor {:>7.1} ms", i + 1, ms(took), ms(floor));
            vms.push(took);
            floors.push(floor);
        }
        let (v, f) = (median(vms), median(floors));
        println!("cold start to first HTTP 200 ({name}, {accel}), median of {vm_runs}:");
        println!("  zeitwork {name} driver:        {:>7.1} ms", ms(v));
        println!("  {name} boot to guest init:     {:>7.1} ms", ms(f));
        println!("  ratio (zeitwork / floor):      {:>7.2}x", v.as_secs_f64() / f.as_secs_f64());
        println!("  ratio (microVM / container):   {:>7.2}x", v.as_secs_f64() / o.as_secs_f64());
    }
    Ok(())
}
