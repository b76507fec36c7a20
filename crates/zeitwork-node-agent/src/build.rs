//! The node's builder: claims builds from the operator one at a time, builds
//! each with buildah and uploads the image it produced.
//!
//! Isolation: every `RUN` step runs in an OCI container (`--isolation oci`)
//! in a user namespace (root inside is an unprivileged host uid), in a
//! network namespace of its own that holds only its loopback
//! (`--network none`: it reaches neither the platform's services, nor the
//! host, nor other tenants, nor anything else), under memory, CPU and pids
//! limits, and the whole build under a wall-time limit. No step needs more:
//! base images (`FROM`, `COPY --from=IMAGE`) are pulled by buildah itself,
//! on the host's side, from the registries the build names, before the
//! steps that use them run. The layer stores use the `vfs` driver by
//! default: buildah releases before 1.30 (Debian 12 ships 1.28) fail
//! user-namespaced layered builds on `overlay` (a `COPY` into a directory a
//! `RUN` made, any `RUN --mount`); set `build_storage_driver = "overlay"`
//! with a newer buildah for faster cold builds. Each project keeps its own
//! layer store (a cache that survives between builds and is never shared
//! with another project), and its own directory of `RUN --mount=type=cache`
//! mounts (buildah's TMPDIR, otherwise one for the whole node): after each
//! build its images no build refers to any more are pruned, and when the
//! stores of all projects together pass the node's `build_cache_bytes` the
//! least recently built ones are removed. Secrets are passed as build
//! secrets (`RUN --mount=type=secret`) from files that are deleted
//! afterwards, and masked should a step print one.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use zeitwork_api_types::{BuildJob, BuildSource};
use zeitwork_client::Client;

/// First host uid/gid of the builds' user namespace (65536 ids from here).
pub const BUILD_ID_BASE: u32 = 1_900_000_000;
/// Lines of output quoted in a failed build's reason.
const TAIL_LINES: usize = 15;

#[derive(Debug, Clone)]
pub struct BuilderSettings {
    pub node: String,
    pub buildah: PathBuf,
    /// Work directories and the per-project layer stores.
    pub dir: PathBuf,
    pub registries: zeitwork_image::RegistryConfig,
    /// containers-storage driver of the layer stores (`vfs` or `overlay`).
    pub storage_driver: String,
    /// Disk all projects' layer stores may use together, in bytes.
    pub cache_bytes: u64,
    /// Build in microVMs (`build_isolation`): what they boot. `None`: on the host.
    pub vm: Option<crate::build_vm::VmBuilder>,
}

/// A layer store's mark of its last build (its modification time).
const LAST_BUILD: &str = ".zeitwork-last-build";
/// The project's TMPDIR for buildah, inside its layer store.
const TMP_DIR: &str = "tmp";
/// What buildah names the directory of `RUN --mount=type=cache` mounts in TMPDIR.
const CACHE_MOUNTS: &str = "buildah-cache";

/// The builder binary to use: the configured one, else `buildah` on `PATH`.
pub fn find_buildah(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("buildah"))
        .find(|p| p.is_file())
}

/// Claims and runs builds until stopped.
pub async fn run(client: Client, settings: BuilderSettings, mut stop: watch::Receiver<bool>) {
    let isolation = if settings.vm.is_some() { "vm" } else { "host" };
    tracing::info!(builder = %settings.buildah.display(), isolation, "builder ready");
    let mut backoff = Duration::from_millis(500);
    let claim_path = format!("/api/v1/nodes/{}/builds/claim", settings.node);
    loop {
        if *stop.borrow() {
            return;
        }
        let claim = tokio::select! {
            c = client.post_empty::<Option<BuildJob>>(&claim_path) => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        match claim {
            Ok(Some(job)) => {
                backoff = Duration::from_millis(500);
                let id = job.id.clone();
                tracing::info!(build = %id, "building");
                let outcome = tokio::select! {
                    o = build(&client, &settings, job) => o,
                    _ = stop.wait_for(|s| *s) => Err("the node agent stopped during the build".into()),
                };
                match outcome {
                    Ok(image) => tracing::info!(build = %id, %image, "build succeeded"),
                    Err(error) => {
                        tracing::warn!(build = %id, %error, "build failed");
                        let body = zeitwork_api_types::BuildFailure { error };
                        if let Err(e) = client.post_no_content(&format!("/api/v1/builds/{id}/fail"), &body).await {
                            tracing::warn!(build = %id, error = %e, "reporting the failed build failed");
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "claiming builds failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Sends build output to the operator in batches; closes `cancel` when the
/// operator says the build is no longer wanted.
struct Output {
    lines: mpsc::UnboundedSender<String>,
    flushes: mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
}

impl Output {
    fn say(&self, line: impl Into<String>) {
        let _ = self.lines.send(line.into());
    }

    /// Waits until everything said so far reached the operator.
    async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.flushes.send(tx).is_ok() {
            let _ = rx.await;
        }
    }

    fn discard() -> Output {
        Output { lines: mpsc::unbounded_channel().0, flushes: mpsc::unbounded_channel().0 }
    }
}

fn spawn_reporter(
    client: Client,
    id: String,
    secrets: Vec<String>,
    stop: Stopper,
) -> (Output, tokio::task::JoinHandle<VecDeque<String>>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (flush_tx, mut flush_rx) = mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
    let task = tokio::spawn(async move {
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut batch = String::new();
        let path = format!("/api/v1/builds/{id}/log");
        let mut open = true;
        let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        while open {
            let deadline = tokio::time::sleep(Duration::from_millis(300));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    biased;
                    Some(done) = flush_rx.recv() => {
                        // Lines said before the flush are already queued: take them, then send.
                        while let Ok(l) = rx.try_recv() {
                            batch.push_str(&mask(l, &secrets, &mut tail));
                            batch.push('\n');
                        }
                        waiting.push(done);
                        break;
                    }
                    line = rx.recv() => match line {
                        Some(l) => {
                            batch.push_str(&mask(l, &secrets, &mut tail));
                            batch.push('\n');
                            if batch.len() > 64 * 1024 {
                                break;
                            }
                        }
                        None => {
                            open = false;
                            break;
                        }
                    },
                    _ = &mut deadline => break,
                }
            }
            if !batch.is_empty() {
                let body = std::mem::take(&mut batch).into_bytes();
                match client.post_bytes(&path, "text/plain; charset=utf-8", body).await {
                    Ok(()) => {}
                    Err(e) if e.status() == Some(409) => {
                        stop.stop("the deployment no longer waits for this build (it was deleted)");
                    }
                    Err(e) => tracing::warn!(build = %id, error = %e, "sending build output failed"),
                }
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
        }
        tail
    });
    (Output { lines: tx, flushes: flush_tx }, task)
}

/// Stops a build from outside its steps (the operator gave it up, a limit), saying why.
#[derive(Clone)]
struct Stopper {
    tx: std::sync::Arc<watch::Sender<bool>>,
    why: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Stopper {
    fn new() -> (Stopper, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Stopper { tx: std::sync::Arc::new(tx), why: Default::default() }, rx)
    }

    fn stop(&self, why: &str) {
        if let Ok(mut w) = self.why.lock() {
            w.get_or_insert_with(|| why.to_owned());
        }
        let _ = self.tx.send(true);
    }

    fn reason(&self) -> Option<String> {
        self.why.lock().ok().and_then(|w| w.clone())
    }
}

/// Disk the files under `dir` take (their allocated blocks; not following links).
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.blocks() * 512).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Stops the build once its project's layer store and work directory hold more than `limit_mib`.
fn watch_disk(dirs: Vec<PathBuf>, limit_mib: u64, stop: Stopper) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let dirs = dirs.clone();
            let used =
                tokio::task::spawn_blocking(move || dirs.iter().map(|d| dir_size(d)).sum::<u64>()).await.unwrap_or(0);
            if used > limit_mib << 20 {
                stop.stop(&format!(
                    "the build used more than its disk limit of {limit_mib} MiB (the project's layer cache included)"
                ));
                return;
            }
        }
    })
}

/// A line of output with the build's secrets masked, remembered in the tail.
fn mask(mut line: String, secrets: &[String], tail: &mut VecDeque<String>) -> String {
    for s in secrets {
        if !s.is_empty() {
            line = line.replace(s.as_str(), "***");
        }
    }
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line.clone());
    line
}

async fn build(client: &Client, settings: &BuilderSettings, job: BuildJob) -> Result<String, String> {
    let work = settings.dir.join("work").join(&job.id);
    // What an earlier attempt left; usually nothing.
    match tokio::fs::remove_dir_all(&work).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %work.display(), error = %e, "could not clear an earlier build's work directory")
        }
        _ => {}
    }
    tokio::fs::create_dir_all(&work).await.map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let (stopper, cancel_rx) = Stopper::new();
    let secrets: Vec<String> = job.secrets.values().cloned().collect();
    let (out, reporter) = spawn_reporter(client.clone(), job.id.clone(), secrets, stopper.clone());
    // Per-project layer store: the cache of one project is never read by another.
    let storage = settings.dir.join("cache").join(&job.org).join(&job.project);
    // In a VM the layer store is a file of the disk limit's size: nothing to watch.
    let host = settings.vm.is_none();
    let (tmp, tmp_kept) = build_tmp(&settings.dir, &storage, &job.id);
    let disk =
        host.then(|| watch_disk(vec![storage.clone(), work.clone(), tmp.clone()], job.disk_mib, stopper.clone()));
    let result = build_in(client, settings, &job, &work, &storage, &out, cancel_rx).await;
    if let Some(d) = disk {
        d.abort();
    }
    let (cache, budget, keep) = (settings.dir.join("cache"), settings.cache_bytes, storage.clone());
    let cleared = tokio::task::spawn_blocking(move || {
        if host && tmp_kept {
            clear_temporary(&tmp);
        } else if host {
            if let Err(e) = std::fs::remove_dir_all(&tmp) {
                tracing::warn!(dir = %tmp.display(), error = %e, "removing a build's temporary directory failed");
            }
        }
        evict_layer_stores(&cache, budget, &keep)
    });
    match cleared.await {
        Ok(removed) => {
            for (store, bytes) in removed {
                tracing::info!(store = %store.display(), mib = bytes >> 20, "removed a least recently built layer store");
            }
        }
        Err(e) => tracing::warn!(error = %e, "evicting layer stores failed"),
    }
    let result = result.map_err(|e| match stopper.reason() {
        Some(why) if e.contains("cancelled") => why,
        _ => e,
    });
    if let Err(e) = &result {
        out.say(format!("==> build failed: {e}"));
    }
    drop(out);
    let tail = reporter.await.unwrap_or_default();
    if let Err(e) = tokio::fs::remove_dir_all(&work).await {
        tracing::warn!(dir = %work.display(), error = %e, "removing a build's work directory failed");
    }
    result.map_err(|e| {
        let tail: Vec<String> = tail.into_iter().filter(|l| !l.starts_with("==> build failed")).collect();
        if tail.is_empty() {
            e
        } else {
            format!("{e}\n{}", tail.join("\n"))
        }
    })
}

async fn build_in(
    client: &Client,
    settings: &BuilderSettings,
    job: &BuildJob,
    work: &Path,
    storage: &Path,
    out: &Output,
    mut cancel: watch::Receiver<bool>,
) -> Result<String, String> {
    let started = std::time::Instant::now();
    let ctx = work.join("context");
    match &job.source {
        BuildSource::Upload { digest } => {
            out.say(format!("==> fetching the source {digest}"));
            fetch_upload(client, &job.id, work, &ctx).await?;
        }
        BuildSource::Git { url, sha, authorization } => {
            out.say(format!("==> cloning {url} at {sha}"));
            clone(url, sha, authorization.as_deref(), &ctx, out).await?;
        }
    }
    let dockerfile = ctx.join(&job.dockerfile);
    if !tokio::fs::try_exists(&dockerfile).await.unwrap_or(false) {
        return Err(format!("the source has no {} (set the project's build.dockerfile)", job.dockerfile));
    }
    let runroot = work.join("run");
    tokio::fs::create_dir_all(storage).await.map_err(|e| format!("cannot create the layer store: {e}"))?;
    if let Err(e) = tokio::fs::write(storage.join(LAST_BUILD), b"").await {
        tracing::warn!(store = %storage.display(), error = %e, "cannot mark the layer store as used");
    }
    if let Some(vm) = &settings.vm {
        let archive = work.join("image.tar");
        let b = crate::build_vm::VmBuild {
            builder: vm,
            job,
            work,
            ctx: &ctx,
            store_dir: storage,
            vms: &settings.dir.join("vms"),
            registries: &settings.registries,
            storage_driver: &settings.storage_driver,
        };
        crate::build_vm::build(b, &archive, out.lines.clone(), |l| out.say(l), &mut cancel).await?;
        return upload(client, job, &archive, out, started).await;
    }
    let registries = work.join("registries.conf");
    tokio::fs::write(&registries, registries_conf(&settings.registries))
        .await
        .map_err(|e| format!("cannot write the registry settings: {e}"))?;
    let auth = work.join("auth.json");
    write_private(&auth, auth_json(&settings.registries).as_bytes()).await?;
    // buildah keeps `RUN --mount=type=cache` directories (and its temporary files) under
    // TMPDIR, `/var/tmp` by default: one place for every build on the node, where one
    // tenant's step would plant files another's reads. Each project gets its own, in
    // its layer store (within its disk limit, evicted with it). Traverse-only for
    // others: the steps' root file systems are mounted below it by the OCI runtime as
    // the build's unprivileged root (buildah makes its own directories so).
    let (tmp, kept) = build_tmp(&settings.dir, storage, &job.id);
    if !kept {
        tracing::warn!(
            dir = %settings.dir.display(),
            "a directory above the builds' keeps other users out (chmod o+x, e.g. 0711): \
             cache mounts of RUN steps last one build only"
        );
    }
    tokio::fs::DirBuilder::new()
        .mode(0o711)
        .recursive(true)
        .create(&tmp)
        .await
        .map_err(|e| format!("cannot create the build's temporary directory: {e}"))?;
    let secrets_dir = work.join("secrets");
    tokio::fs::create_dir_all(&secrets_dir).await.map_err(|e| format!("cannot store build secrets: {e}"))?;
    // One tag per project, moved by each build: removing a built image would remove the
    // intermediate images that are its steps' cache.
    let tag = format!("localhost/zeitwork-build/{}:latest", job.project);
    let mut args: Vec<String> = store_args(settings, storage, &runroot);
    args.extend([
        "build".into(),
        "--isolation".into(),
        "oci".into(),
        "--network".into(),
        "none".into(),
        "--userns-uid-map".into(),
        format!("0:{BUILD_ID_BASE}:65536"),
        "--userns-gid-map".into(),
        format!("0:{BUILD_ID_BASE}:65536"),
        "--memory".into(),
        format!("{}m", job.memory_mib),
        "--cpu-period".into(),
        "100000".into(),
        "--cpu-quota".into(),
        (u64::from(job.vcpu) * 100_000).to_string(),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
        "--pull".into(),
        "--file".into(),
        dockerfile.display().to_string(),
        "--tag".into(),
        tag.clone(),
    ]);
    // Each step's layer is cached in the project's store and reused by the next build.
    args.push("--layers=true".into());
    if let Some(t) = &job.target {
        args.extend(["--target".into(), t.clone()]);
    }
    for (k, v) in &job.args {
        args.extend(["--build-arg".into(), format!("{k}={v}")]);
    }
    for (k, v) in &job.secrets {
        let file = secrets_dir.join(k);
        write_private(&file, v.as_bytes()).await?;
        args.extend(["--secret".into(), format!("id={k},src={}", file.display())]);
    }
    args.push(ctx.display().to_string());
    out.say(format!(
        "==> building {} (target {}) with buildah; limits: {} MiB memory, {} vCPU, {} s, {} MiB disk, no network in RUN steps",
        job.dockerfile,
        job.target.as_deref().unwrap_or("last stage"),
        job.memory_mib,
        job.vcpu,
        job.timeout_secs,
        job.disk_mib
    ));
    let limit = Duration::from_secs(job.timeout_secs);
    let envs = [
        ("CONTAINERS_REGISTRIES_CONF", registries.display().to_string()),
        ("REGISTRY_AUTH_FILE", auth.display().to_string()),
        ("TMPDIR", tmp.display().to_string()),
    ];
    let built = run_logged(&settings.buildah, &args, &envs, out, limit, &mut cancel).await;
    if built.is_err() {
        remove_working_containers(settings, storage, &runroot, &envs).await;
    }
    built?;
    let remaining = limit.saturating_sub(started.elapsed());
    let archive = work.join("image.tar");
    out.say("==> exporting the image");
    let mut push = store_args(settings, storage, &runroot);
    push.extend(["push".into(), "--quiet".into(), tag.clone(), format!("oci-archive:{}", archive.display())]);
    let pushed = run_logged(&settings.buildah, &push, &envs, out, remaining, &mut cancel).await;
    remove_working_containers(settings, storage, &runroot, &envs).await;
    pushed?;
    prune_images(settings, storage, &runroot, &envs).await;
    upload(client, job, &archive, out, started).await
}

/// Sends the built image (an oci-archive) to the operator.
async fn upload(
    client: &Client,
    job: &BuildJob,
    archive: &Path,
    out: &Output,
    started: std::time::Instant,
) -> Result<String, String> {
    let size = tokio::fs::metadata(&archive).await.map(|m| m.len()).unwrap_or(0);
    out.say(format!(
        "==> built in {:.1} s; uploading the image ({:.1} MB)",
        started.elapsed().as_secs_f64(),
        size as f64 / 1e6
    ));
    // The build's output is complete before the image makes it succeed.
    out.flush().await;
    let file = tokio::fs::File::open(&archive).await.map_err(|e| format!("cannot read the built image: {e}"))?;
    let body = reqwest::Body::wrap_stream(tokio_util_stream(file));
    let uploaded: zeitwork_api_types::UploadedImage = client
        .upload(&format!("/api/v1/builds/{}/image", job.id), "application/x-tar", body)
        .await
        .map_err(|e| format!("uploading the built image failed: {e}"))?;
    Ok(uploaded.image)
}

/// buildah's global options naming a project's layer store.
fn store_args(settings: &BuilderSettings, storage: &Path, runroot: &Path) -> Vec<String> {
    vec![
        "--root".into(),
        storage.display().to_string(),
        "--runroot".into(),
        runroot.display().to_string(),
        "--storage-driver".into(),
        settings.storage_driver.clone(),
    ]
}

/// Removes the images of the project's store that no tag or image refers to
/// any more (earlier builds' results and their steps); the steps of the
/// latest build stay, as the next build's cache.
async fn prune_images(settings: &BuilderSettings, storage: &Path, runroot: &Path, envs: &[(&str, String)]) {
    let mut args = store_args(settings, storage, runroot);
    args.extend(["rmi".into(), "--prune".into()]);
    let out = tokio::process::Command::new(&settings.buildah)
        .args(&args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            store = %storage.display(),
            error = %String::from_utf8_lossy(&o.stderr).trim(),
            "pruning a layer store's unused images failed"
        ),
        Err(e) => tracing::warn!(store = %storage.display(), error = %e, "cannot run buildah to prune a layer store"),
    }
}

/// buildah's TMPDIR for a build, and whether it is the project's own (kept
/// between builds, in its layer store). The steps' unprivileged root must
/// pass through every directory above it; where one above `builds` keeps
/// others out, the build gets a directory of its own under `/var/tmp`,
/// removed afterwards.
fn build_tmp(builds: &Path, storage: &Path, id: &str) -> (PathBuf, bool) {
    use std::os::unix::fs::PermissionsExt;
    let open = builds.ancestors().all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if open {
        (storage.join(TMP_DIR), true)
    } else {
        (PathBuf::from("/var/tmp").join(format!("zeitwork-build-{id}")), false)
    }
}

/// Removes what buildah left in a project's TMPDIR (its temporary copies of
/// images and contexts), keeping the project's cache mounts for its next build.
fn clear_temporary(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(CACHE_MOUNTS) {
            continue;
        }
        let path = e.path();
        let removed = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(err) = removed {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove a build's temporary file");
        }
    }
}

/// Removes the least recently built projects' layer stores under `cache`
/// (`cache/ORG/PROJECT`) until all of them together hold at most `budget`
/// bytes; `keep` (the store just used) always stays. Returns the stores
/// removed and their sizes.
fn evict_layer_stores(cache: &Path, budget: u64, keep: &Path) -> Vec<(PathBuf, u64)> {
    let subdirs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|es| es.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut stores: Vec<(std::time::SystemTime, PathBuf, u64)> = subdirs(cache)
        .iter()
        .flat_map(|org| subdirs(org))
        .map(|store| {
            let used = std::fs::metadata(store.join(LAST_BUILD))
                .or_else(|_| std::fs::metadata(&store))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let size = dir_size(&store);
            (used, store, size)
        })
        .collect();
    let mut total: u64 = stores.iter().map(|s| s.2).sum();
    stores.sort_by_key(|s| s.0);
    let mut removed = Vec::new();
    for (_, store, size) in stores {
        if total <= budget {
            break;
        }
        if store == keep {
            continue;
        }
        match std::fs::remove_dir_all(&store) {
            Ok(()) => {
                total = total.saturating_sub(size);
                removed.push((store, size));
            }
            Err(e) => tracing::warn!(store = %store.display(), error = %e, "cannot remove a layer store"),
        }
    }
    removed
}

/// Removes what a build left in the project's store (working containers, their mounts).
async fn remove_working_containers(
    settings: &BuilderSettings,
    storage: &Path,
    runroot: &Path,
    envs: &[(&str, String)],
) {
    let mut args = store_args(settings, storage, runroot);
    args.extend(["rm".into(), "--all".into()]);
    let quiet = Output::discard();
    let mut never = watch::channel(false).1;
    if let Err(e) = run_logged(&settings.buildah, &args, envs, &quiet, Duration::from_secs(60), &mut never).await {
        tracing::warn!(store = %storage.display(), error = %e, "removing a build's working containers failed");
    }
}

/// A file as a stream of byte chunks.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

async fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(data).await.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// buildah's registries.conf: the registries this node speaks plain HTTP to
/// (the configured ones, and loopback ones, as for image pulls).
fn registries_conf(r: &zeitwork_image::RegistryConfig) -> String {
    let mut s = String::from("unqualified-search-registries = [\"docker.io\"]\n");
    let loopback = ["127.0.0.1", "localhost", "[::1]"].map(str::to_owned);
    for host in r.insecure.iter().chain(loopback.iter()) {
        s.push_str(&format!("\n[[registry]]\nlocation = {host:?}\ninsecure = true\n"));
    }
    s
}

/// Credentials in the containers-auth.json format.
fn auth_json(r: &zeitwork_image::RegistryConfig) -> String {
    use base64::Engine;
    let auths: serde_json::Map<String, serde_json::Value> = r
        .credentials
        .iter()
        .map(|(host, (user, pass))| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            (host.clone(), serde_json::json!({ "auth": token }))
        })
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

async fn fetch_upload(client: &Client, id: &str, work: &Path, ctx: &Path) -> Result<(), String> {
    use futures::StreamExt;
    let tarball = work.join("source.tar.gz");
    let res = client
        .stream(&format!("/api/v1/builds/{id}/source"))
        .await
        .map_err(|e| format!("fetching the source failed: {e}"))?;
    let mut file = tokio::fs::File::create(&tarball).await.map_err(|e| format!("cannot store the source: {e}"))?;
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("fetching the source broke off: {e}"))?;
        file.write_all(&chunk).await.map_err(|e| format!("cannot store the source: {e}"))?;
    }
    file.flush().await.map_err(|e| format!("cannot store the source: {e}"))?;
    let (tarball, ctx) = (tarball.clone(), ctx.to_path_buf());
    tokio::task::spawn_blocking(move || unpack_source(&tarball, &ctx))
        .await
        .map_err(|e| format!("unpacking the source failed: {e}"))?
}

/// Unpacks a source archive into `ctx`, refusing entries that would land outside it.
pub fn unpack_source(tarball: &Path, ctx: &Path) -> Result<(), String> {
    std::fs::create_dir_all(ctx).map_err(|e| format!("cannot create {}: {e}", ctx.display()))?;
    let file = std::fs::File::open(tarball).map_err(|e| format!("cannot read the source: {e}"))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| format!("the source is not a gzip-compressed tar: {e}"))? {
        let mut entry = entry.map_err(|e| format!("the source is not a gzip-compressed tar: {e}"))?;
        let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        match entry.unpack_in(ctx) {
            Ok(true) => {}
            Ok(false) => return Err(format!("{name} escapes the build context")),
            Err(e) => return Err(format!("cannot unpack {name}: {e}")),
        }
    }
    Ok(())
}

async fn clone(url: &str, sha: &str, authorization: Option<&str>, ctx: &Path, out: &Output) -> Result<(), String> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("{url} is not an http(s) git URL"));
    }
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{sha:?} is not a commit SHA"));
    }
    // The credential goes through the environment, never the command line.
    let mut envs: Vec<(&str, String)> = vec![("GIT_TERMINAL_PROMPT", "0".into()), ("GIT_CONFIG_NOSYSTEM", "1".into())];
    if let Some(a) = authorization {
        envs.extend([
            ("GIT_CONFIG_COUNT", "1".into()),
            ("GIT_CONFIG_KEY_0", "http.extraHeader".into()),
            ("GIT_CONFIG_VALUE_0", format!("Authorization: {a}")),
        ]);
    }
    let ctx_s = ctx.display().to_string();
    let mut never = watch::channel(false).1;
    let git = Path::new("git");
    let limit = Duration::from_secs(600);
    let cloned = ["clone", "--quiet", "--no-checkout", url, &ctx_s].map(str::to_owned);
    run_logged(git, &cloned, &envs, out, limit, &mut never).await?;
    let checkout =
        ["-C", &ctx_s, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", sha].map(str::to_owned);
    run_logged(git, &checkout, &envs, out, limit, &mut never).await?;
    tokio::fs::remove_dir_all(ctx.join(".git")).await.map_err(|e| format!("cannot remove .git: {e}"))
}

/// Runs a program, sending each line of its output to `out`; fails with its
/// exit status, on timeout, or when the build is cancelled (the whole process
/// group is killed).
async fn run_logged<S: AsRef<std::ffi::OsStr>>(
    program: &Path,
    args: &[String],
    envs: &[(&str, S)],
    out: &Output,
    limit: Duration,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd.process_group(0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let pid = child.id();
    let mut forwards = Vec::new();
    if let Some(o) = child.stdout.take() {
        forwards.push(forward_lines(o, out.lines.clone()));
    }
    if let Some(e) = child.stderr.take() {
        forwards.push(forward_lines(e, out.lines.clone()));
    }
    let outcome = tokio::select! {
        status = child.wait() => status.map_err(|e| format!("{name} failed: {e}")),
        _ = tokio::time::sleep(limit) => Err(format!("the build took longer than its limit of {} s", limit.as_secs())),
        _ = cancelled(cancel) => Err("the build was cancelled".into()),
    };
    if outcome.is_err() {
        kill_group(pid).await;
    }
    for f in forwards {
        let _ = tokio::time::timeout(Duration::from_secs(5), f).await;
    }
    let status = outcome?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name} {} exited with {status}",
            args.iter().find(|a| !a.starts_with('-') && !a.starts_with('/')).map(String::as_str).unwrap_or("")
        ))
    }
}

/// Resolves when the build is cancelled; never when nobody can cancel it.
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn forward_lines(
    r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    tx: mpsc::UnboundedSender<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    })
}

/// Kills a process group started by [`run_logged`] (buildah and the containers it runs).
async fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = status {
        tracing::warn!(pid, error = %e, "killing a build's processes failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of `mib` MiB last built `age` ago.
    fn store(cache: &Path, org: &str, project: &str, mib: usize, age: Duration) -> PathBuf {
        let dir = cache.join(org).join(project);
        std::fs::create_dir_all(dir.join("vfs")).unwrap();
        std::fs::write(dir.join("vfs").join("layer"), vec![7u8; mib << 20]).unwrap();
        let mark = std::fs::File::create(dir.join(LAST_BUILD)).unwrap();
        mark.set_modified(std::time::SystemTime::now() - age).unwrap();
        dir
    }

    #[test]
    fn temporary_files_go_and_cache_mounts_stay() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("buildah-cache/deps")).unwrap();
        std::fs::write(tmp.path().join("buildah-cache/deps/kept"), b"x").unwrap();
        std::fs::create_dir_all(tmp.path().join("buildah1234/layer")).unwrap();
        std::fs::write(tmp.path().join("buildah1234/layer/blob"), b"x").unwrap();
        std::fs::write(tmp.path().join("stray"), b"x").unwrap();
        clear_temporary(tmp.path());
        let left: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert_eq!(left, vec!["buildah-cache".to_owned()]);
        assert!(tmp.path().join("buildah-cache/deps/kept").exists());
    }

    #[test]
    fn the_least_recently_built_stores_go_first_and_the_current_one_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let oldest = store(&cache, "acme", "a", 1, Duration::from_secs(3000));
        let older = store(&cache, "acme", "b", 1, Duration::from_secs(2000));
        let recent = store(&cache, "other", "c", 1, Duration::from_secs(1000));
        // The current store is the oldest by its mark, and stays anyway.
        let current = store(&cache, "other", "d", 1, Duration::from_secs(4000));

        assert!(evict_layer_stores(&cache, 4 << 20, &current).is_empty(), "within the budget nothing goes");
        let removed = evict_layer_stores(&cache, (2 << 20) + 1, &current);
        assert_eq!(removed.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), vec![oldest.clone(), older.clone()]);
        assert!(removed.iter().all(|r| r.1 >= 1 << 20), "{removed:?}");
        assert!(!oldest.exists() && !older.exists());
        assert!(recent.exists() && current.exists());
        // A budget nothing fits: everything but the current store goes.
        evict_layer_stores(&cache, 0, &current);
        assert!(!recent.exists() && current.exists());
    }
}
