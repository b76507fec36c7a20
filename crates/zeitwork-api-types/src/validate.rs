//! Validation of every field that comes from outside. Each check returns a
//! [`ValidationError`] naming the field and saying what a valid value looks like.

use std::collections::BTreeMap;

use crate::{
    CreateDeployment, CreateDomain, CreateOrg, CreateProject, CreateRegion, CreateToken, Egress, PatchProject,
    RateLimit, RegisterNode, Resources, TokenScope,
};

/// A field with a value that does not fit; the message says what would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

type Result<T = ()> = std::result::Result<T, ValidationError>;

pub const VCPU_RANGE: (u32, u32) = (1, 32);
pub const MEMORY_RANGE: (u32, u32) = (128, 65536);
pub const INSTANCES_PER_REGION_MAX: u32 = 100;
pub const ENV_VALUE_MAX: usize = 32 * 1024;
pub const ENV_VARS_MAX: usize = 500;
/// 63 (a DNS label) minus the 7-character nanoid and two dashes of a deployment id.
pub const MAX_PROJECT_AND_ORG: usize = 54;

/// Names of orgs, projects and regions become hostnames: a DNS label,
/// lowercase letters, digits and `-`, 1–63 characters, no `-` at either end.
pub fn dns_label(field: &str, value: &str) -> Result {
    let bad = |why: &str| {
        Err(ValidationError::new(
            field,
            format!(
                "{why}: {value:?} is not a valid name; use 1-63 lowercase letters, digits or '-', not starting or ending with '-' (e.g. \"my-app\")"
            ),
        ))
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > 63 {
        return bad("longer than 63 characters");
    }
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return bad("contains a character other than a-z, 0-9 or '-'");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return bad("starts or ends with '-'");
    }
    Ok(())
}

/// A fully qualified domain name such as `www.example.com`.
pub fn domain_name(field: &str, value: &str) -> Result {
    let msg = |why: &str| {
        Err(ValidationError::new(
            field,
            format!("{why}: {value:?} is not a valid domain name (e.g. \"www.example.com\")"),
        ))
    };
    if value.len() > 253 {
        return msg("longer than 253 characters");
    }
    let labels: Vec<&str> = value.split('.').collect();
    if labels.len() < 2 {
        return msg("needs at least two labels");
    }
    for label in &labels {
        if dns_label(field, label).is_err() {
            return msg("each label must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'");
        }
    }
    if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return msg("the last label must not be numeric");
    }
    Ok(())
}

/// Free text shown to people: bounded, no control characters.
pub fn text(field: &str, value: &str, max: usize) -> Result {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(ValidationError::new(field, format!("must be at most {max} characters")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// The ISO 3166-1 alpha-2 code of a country given by that code (any case),
/// its alpha-3 code, its name ("United States", "Germany") or a common alias.
pub fn country_code(value: &str) -> Option<String> {
    let v = value.trim();
    if v.is_empty() || v.len() > 100 {
        return None;
    }
    // Two letters are a code, assigned or user-assigned (`XK`, `ZZ`), in any case.
    if v.len() == 2 {
        return v.bytes().all(|b| b.is_ascii_alphabetic()).then(|| v.to_ascii_uppercase());
    }
    // Names are matched without spaces, hyphens, dots or apostrophes, in any case.
    let squeezed: String = v.chars().filter(|c| !matches!(c, ' ' | '-' | '.' | '\'' | '_' | ',')).collect();
    let lower = squeezed.to_ascii_lowercase();
    let stripped = lower.strip_prefix("the").filter(|s| !s.is_empty()).unwrap_or(&lower);
    [squeezed.as_str(), stripped].iter().find_map(|s| s.parse::<celes::Country>().ok()).map(|c| c.alpha2.to_owned())
}

pub fn country(field: &str, value: &str) -> Result {
    match country_code(value) {
        Some(_) => Ok(()),
        None => Err(ValidationError::new(
            field,
            format!(
                "{value:?} is not a country; use an ISO 3166-1 code (e.g. \"US\", \"DE\") or a country's name \
                 (e.g. \"United States\")"
            ),
        )),
    }
}

pub fn resources(field: &str, r: &Resources) -> Result {
    if !(VCPU_RANGE.0..=VCPU_RANGE.1).contains(&r.vcpu) {
        return Err(ValidationError::new(
            format!("{field}.vcpu"),
            format!("{} is out of range; use {} to {}", r.vcpu, VCPU_RANGE.0, VCPU_RANGE.1),
        ));
    }
    if !(MEMORY_RANGE.0..=MEMORY_RANGE.1).contains(&r.memory) {
        return Err(ValidationError::new(
            format!("{field}.memory"),
            format!("{} MiB is out of range; use {} to {} MiB", r.memory, MEMORY_RANGE.0, MEMORY_RANGE.1),
        ));
    }
    Ok(())
}

pub fn rate_limit(field: &str, r: &RateLimit) -> Result {
    if r.requests_per_second == 0 || r.requests_per_second > 1_000_000 {
        return Err(ValidationError::new(format!("{field}.requests_per_second"), "use 1 to 1000000"));
    }
    if r.burst == 0 || r.burst > 10_000_000 {
        return Err(ValidationError::new(format!("{field}.burst"), "use 1 to 10000000"));
    }
    Ok(())
}

pub fn instances_per_region(field: &str, n: u32) -> Result {
    if n == 0 || n > INSTANCES_PER_REGION_MAX {
        return Err(ValidationError::new(field, format!("{n} is out of range; use 1 to {INSTANCES_PER_REGION_MAX}")));
    }
    Ok(())
}

pub fn port(field: &str, port: u16) -> Result {
    if port == 0 {
        return Err(ValidationError::new(field, "use a TCP port from 1 to 65535"));
    }
    Ok(())
}

/// `owner/repo` as GitHub spells it.
pub fn github_repo(field: &str, value: &str) -> Result {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 100
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && p != "."
            && p != ".."
    };
    match value.split_once('/') {
        Some((owner, repo)) if ok_part(owner) && ok_part(repo) && !repo.contains('/') => Ok(()),
        _ => Err(ValidationError::new(
            field,
            format!("{value:?} is not a GitHub repository; use \"owner/repo\" (e.g. \"acme/webapp\")"),
        )),
    }
}

/// A git branch name (the rules of `git check-ref-format`, simplified).
pub fn branch(field: &str, value: &str) -> Result {
    let bad = value.is_empty()
        || value.len() > 255
        || value.starts_with('/')
        || value.ends_with('/')
        || value.ends_with(".lock")
        || value.starts_with('-')
        || value.contains("..")
        || value.contains("//")
        || value.contains("@{")
        || value.bytes().any(|b| b <= b' ' || b == 0x7f || b"~^:?*[\\".contains(&b));
    if bad {
        return Err(ValidationError::new(field, format!("{value:?} is not a valid git branch name (e.g. \"main\")")));
    }
    Ok(())
}

/// Environment variable names: a letter or `_`, then letters, digits or `_`.
pub fn env_key(field: &str, key: &str) -> Result {
    let mut bytes = key.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || key.len() > 255 || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ValidationError::new(
            field,
            format!("{key:?} is not a valid variable name; use letters, digits and '_', not starting with a digit (e.g. \"DATABASE_URL\")"),
        ));
    }
    if key.starts_with("ZEITWORK_") {
        return Err(ValidationError::new(field, "names starting with ZEITWORK_ are reserved for the platform"));
    }
    Ok(())
}

pub fn env_value(field: &str, value: &str) -> Result {
    if value.len() > ENV_VALUE_MAX {
        return Err(ValidationError::new(field, format!("longer than {ENV_VALUE_MAX} bytes")));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// An OCI image reference: `[registry/]repository[:tag][@sha256:<64 hex>]`.
pub fn image_reference(field: &str, value: &str) -> Result {
    let bad = |why: &str| {
        Err(ValidationError::new(
            field,
            format!("{why}: {value:?} is not an image reference; use [registry/]name[:tag][@sha256:digest] (e.g. \"ghcr.io/acme/web:1.2\")"),
        ))
    };
    if value.is_empty() || value.len() > 512 {
        return bad("must be 1-512 characters");
    }
    let (rest, digest) = match value.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (value, None),
    };
    if let Some(d) = digest {
        let ok = d
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        if !ok {
            return bad("the digest must be sha256: followed by 64 lowercase hex digits");
        }
    }
    // A tag follows the last ':' after the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !tag.starts_with(['.', '-']);
        if !ok {
            return bad("the tag must be 1-128 letters, digits, '_', '.' or '-'");
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let host = parts[0];
        if host.contains('.') || host.contains(':') || host == "localhost" {
            let ok = host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
            if !ok {
                return bad("the registry host is not valid");
            }
            parts.remove(0);
        }
    }
    if parts.is_empty() {
        return bad("the repository name is missing");
    }
    for p in parts {
        let ok = !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && p.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
        if !ok {
            return bad("repository path components are lowercase letters, digits and separators");
        }
    }
    Ok(())
}

pub fn commit_sha(field: &str, value: &str) -> Result {
    if (7..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ValidationError::new(field, format!("{value:?} is not a commit SHA; use 7 to 64 hex digits")))
    }
}

/// A WireGuard key as `wg` writes it: canonical base64 of 32 bytes, not all zero.
pub fn wireguard_key(field: &str, value: &str) -> Result {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = value.as_bytes();
    // 32 bytes are 43 digits and one '='; the last digit carries 4 bits, so its low 2 are 0.
    let ok = b.len() == 44
        && b[43] == b'='
        && b[..43].iter().all(|c| B64.contains(c))
        && b"AEIMQUYcgkosw048".contains(&b[42])
        && b[..43].iter().any(|c| *c != b'A');
    if !ok {
        return Err(ValidationError::new(
            field,
            format!("{value:?} is not a WireGuard key; use base64 of 32 bytes (44 characters, as `wg pubkey` prints)"),
        ));
    }
    Ok(())
}

/// Where a node's tunnel is reached: `IPv4:port`, a unicast address and a port above 0.
pub fn tunnel_endpoint(field: &str, value: &str) -> Result {
    let ok = value
        .parse::<std::net::SocketAddrV4>()
        .is_ok_and(|a| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast() && !a.ip().is_broadcast());
    if !ok {
        return Err(ValidationError::new(
            field,
            format!("{value:?} is not a tunnel endpoint; use IPv4:PORT (e.g. \"10.0.0.5:51820\")"),
        ));
    }
    Ok(())
}

/// The URL a node agent is reached at: `http(s)://host:port`.
pub fn agent_address(field: &str, value: &str) -> Result {
    let rest = value.strip_prefix("http://").or_else(|| value.strip_prefix("https://"));
    let ok = rest.is_some_and(|r| {
        let host_port = r.trim_end_matches('/');
        !host_port.is_empty()
            && !host_port.contains('/')
            && !host_port.contains('@')
            && host_port.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    });
    if !ok || value.len() > 255 {
        return Err(ValidationError::new(
            field,
            format!("{value:?} is not a node agent URL; use http://HOST:PORT (e.g. \"http://10.0.0.5:8081\")"),
        ));
    }
    Ok(())
}

pub fn hostname(field: &str, value: &str) -> Result {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        return Err(ValidationError::new(
            field,
            format!("{value:?} is not a host name; use letters, digits, '-' and '.' (e.g. \"worker-1\")"),
        ));
    }
    Ok(())
}

impl CreateRegion {
    pub fn validate(&self) -> Result {
        dns_label("code", &self.code)?;
        text("name", &self.name, 100)?;
        country("country", &self.country)
    }
}

impl RegisterNode {
    pub fn validate(&self) -> Result {
        hostname("hostname", &self.hostname)?;
        dns_label("region", &self.region)?;
        agent_address("address", &self.address)?;
        if self.capacity.vcpu == 0 || self.capacity.vcpu > 4096 {
            return Err(ValidationError::new("capacity.vcpu", "use 1 to 4096"));
        }
        // 16 TiB: more than any machine a node agent runs on; a larger figure would only attract placements.
        if self.capacity.memory < 128 || self.capacity.memory > 16 * 1024 * 1024 {
            return Err(ValidationError::new("capacity.memory", "use 128 MiB to 16 TiB (16777216 MiB)"));
        }
        if let Some(p) = &self.physical {
            if p.vcpu == 0 || p.vcpu > 1024 {
                return Err(ValidationError::new("physical.vcpu", "use 1 to 1024 cores"));
            }
            if self.capacity.vcpu > p.vcpu.saturating_mul(64) {
                return Err(ValidationError::new(
                    "capacity.vcpu",
                    format!("{} vCPU on {} cores is more than 64 per core", self.capacity.vcpu, p.vcpu),
                ));
            }
            if self.capacity.memory > p.memory {
                return Err(ValidationError::new(
                    "capacity.memory",
                    "memory is never overcommitted: offer at most the machine's own",
                ));
            }
        }
        if let Some(t) = &self.tunnel {
            wireguard_key("tunnel.public_key", &t.public_key)?;
            tunnel_endpoint("tunnel.endpoint", &t.endpoint)?;
        }
        if self.runtime_detail.as_ref().is_some_and(|d| d.len() > 2000) {
            return Err(ValidationError::new("runtime_detail", "use at most 2000 characters"));
        }
        if let Some(rt) = &self.runtime {
            if !["firecracker", "qemu", "container", "auto"].contains(&rt.as_str()) {
                return Err(ValidationError::new(
                    "runtime",
                    format!("{rt:?} is not a runtime; use firecracker, qemu or container"),
                ));
            }
        }
        Ok(())
    }
}

impl CreateOrg {
    pub fn validate(&self) -> Result {
        dns_label("slug", &self.slug)?;
        if let Some(n) = &self.name {
            text("name", n, 100)?;
        }
        if let Some(o) = &self.owner {
            member_user("owner", o)?;
        }
        Ok(())
    }
}

pub fn member_user(field: &str, user: &str) -> Result {
    text(field, user, 254)?;
    if user.chars().any(char::is_whitespace) {
        return Err(ValidationError::new(field, "must not contain spaces (use an e-mail address or user name)"));
    }
    Ok(())
}

impl CreateProject {
    pub fn validate(&self) -> Result {
        dns_label("name", &self.name)?;
        dns_label("org", &self.org)?;
        // Deployment ids `<project>-<7 chars>-<org>` are hostname labels of their own.
        if self.name.len() + self.org.len() > MAX_PROJECT_AND_ORG {
            return Err(ValidationError::new(
                "name",
                format!("project and org names together must be at most {MAX_PROJECT_AND_ORG} characters, since deployment ids <project>-<id>-<org> are host names"),
            ));
        }
        if let Some(r) = &self.github_repo {
            github_repo("github_repo", r)?;
        }
        if let Some(b) = &self.branch {
            branch("branch", b)?;
        }
        if let Some(p) = self.port {
            port("port", p)?;
        }
        if let Some(r) = &self.resources {
            resources("resources", r)?;
        }
        if let Some(n) = self.instances_per_region {
            instances_per_region("instances_per_region", n)?;
        }
        if let Some(regions) = &self.regions {
            region_list("regions", regions)?;
        }
        lifecycle(self.sleep_after_secs, self.retain_deployments)?;
        if let Some(sc) = &self.scaling {
            scaling(sc)?;
        }
        if let Some(t) = &self.image_template {
            image_template("image_template", t)?;
        }
        if let Some(r) = &self.rate_limit {
            rate_limit("rate_limit", r)?;
        }
        if let Some(b) = &self.staging_branch {
            branch("staging_branch", b)?;
        }
        if let Some(t) = &self.tag_pattern {
            text("tag_pattern", t, 200)?;
        }
        if let Some(b) = &self.build {
            build_settings("build", b)?;
        }
        if let Some(a) = &self.auto_rollback {
            crate::releases::auto_rollback("auto_rollback", a)?;
        }
        if let Some(r) = &self.rollout {
            crate::releases::rollout("rollout", r)?;
        }
        if let Some(sh) = &self.shadow {
            crate::releases::shadow("shadow", sh)?;
        }
        Ok(())
    }
}

/// A path inside a build's source: relative, without `..`, of printable characters.
pub fn source_path(field: &str, p: &str) -> Result {
    if p.is_empty() || p.len() > 255 {
        return Err(ValidationError::new(field, "give a path inside the source, 1 to 255 characters"));
    }
    if p.starts_with('/') || p.split('/').any(|part| part == "..") || p.chars().any(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            format!("{p:?} must be a relative path inside the source, without '..'"),
        ));
    }
    Ok(())
}

/// A build argument's or secret's name, as Dockerfiles write them.
pub fn build_arg_name(field: &str, name: &str) -> Result {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(field, format!("{name:?} is not a build argument name (letters, digits, _ - .)")))
    }
}

fn build_values(field: &str, values: &BTreeMap<String, String>) -> Result {
    if values.len() > 64 {
        return Err(ValidationError::new(field, "at most 64 entries"));
    }
    for (k, v) in values {
        build_arg_name(&format!("{field}.{k}"), k)?;
        if v.len() > 16 * 1024 {
            return Err(ValidationError::new(format!("{field}.{k}"), "values are limited to 16 KiB"));
        }
    }
    Ok(())
}

/// A stage name of a multi-stage Dockerfile.
pub fn build_target(field: &str, t: &str) -> Result {
    if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(ValidationError::new(field, format!("{t:?} is not a stage name (letters, digits, - _ .)")));
    }
    Ok(())
}

pub fn build_settings(field: &str, b: &crate::BuildSettings) -> Result {
    if let Some(d) = &b.dockerfile {
        source_path(&format!("{field}.dockerfile"), d)?;
    }
    if let Some(t) = &b.target {
        build_target(&format!("{field}.target"), t)?;
    }
    build_values(&format!("{field}.args"), &b.args)
}

impl crate::BuildRequest {
    pub fn validate(&self) -> Result {
        let hex = self.source.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ValidationError::new(
                "build.source",
                "name an uploaded source by its digest (sha256:…), as POST /api/v1/orgs/{org}/sources answered",
            ));
        }
        if let Some(d) = &self.dockerfile {
            source_path("build.dockerfile", d)?;
        }
        if let Some(t) = &self.target {
            build_target("build.target", t)?;
        }
        build_values("build.args", &self.args)?;
        build_values("build.secrets", &self.secrets)
    }
}

pub fn region_list(field: &str, regions: &[String]) -> Result {
    if regions.is_empty() {
        return Err(ValidationError::new(field, "name at least one region the project runs in"));
    }
    for (i, r) in regions.iter().enumerate() {
        dns_label(&format!("{field}[{i}]"), r)?;
        if regions[..i].contains(r) {
            return Err(ValidationError::new(format!("{field}[{i}]"), format!("region {r:?} is listed twice")));
        }
    }
    Ok(())
}

pub fn image_template(field: &str, t: &str) -> Result {
    image_reference(field, &t.replace("{sha}", "0123456789abcdef"))
}

impl PatchProject {
    pub fn validate(&self) -> Result {
        if let Some(Some(e)) = &self.egress {
            egress("egress", e)?;
        }
        if let Some(Some(r)) = &self.github_repo {
            github_repo("github_repo", r)?;
        }
        if let Some(b) = &self.branch {
            branch("branch", b)?;
        }
        if let Some(p) = self.port {
            port("port", p)?;
        }
        if let Some(r) = &self.resources {
            resources("resources", r)?;
        }
        if let Some(n) = self.instances_per_region {
            instances_per_region("instances_per_region", n)?;
        }
        if let Some(regions) = &self.regions {
            region_list("regions", regions)?;
        }
        if let Some(Some(t)) = &self.image_template {
            image_template("image_template", t)?;
        }
        if let Some(Some(r)) = &self.rate_limit {
            rate_limit("rate_limit", r)?;
        }
        if let Some(Some(sc)) = &self.scaling {
            scaling(sc)?;
        }
        if let Some(Some(b)) = &self.staging_branch {
            branch("staging_branch", b)?;
        }
        if let Some(Some(t)) = &self.tag_pattern {
            text("tag_pattern", t, 200)?;
        }
        if let Some(b) = &self.build {
            build_settings("build", b)?;
        }
        if let Some(a) = &self.auto_rollback {
            crate::releases::auto_rollback("auto_rollback", a)?;
        }
        if let Some(Some(r)) = &self.rollout {
            crate::releases::rollout("rollout", r)?;
        }
        if let Some(Some(sh)) = &self.shadow {
            crate::releases::shadow("shadow", sh)?;
        }
        if let Some(Some(sp)) = &self.skew_protection {
            skew_protection(sp)?;
        }
        if let Some(Some(c)) = &self.release_command {
            release_command("release_command", c)?;
        }
        lifecycle(self.sleep_after_secs, self.retain_deployments)
    }
}

/// Pins last from one minute to 30 days (retired deployments keep their routes that long).
pub const SKEW_MAX_AGE_RANGE: std::ops::RangeInclusive<u32> = 60..=30 * 24 * 3600;

pub fn skew_protection(s: &crate::SkewProtection) -> Result {
    if !SKEW_MAX_AGE_RANGE.contains(&s.max_age_secs) {
        return Err(ValidationError::new(
            "skew_protection.max_age_secs",
            format!(
                "{} is out of range; use {} to {} seconds",
                s.max_age_secs,
                SKEW_MAX_AGE_RANGE.start(),
                SKEW_MAX_AGE_RANGE.end()
            ),
        ));
    }
    Ok(())
}

/// A release command: one line of shell, at most 4096 bytes (empty: none).
pub fn release_command(field: &str, c: &str) -> Result {
    if c.len() > 4096 {
        return Err(ValidationError::new(field, "must be at most 4096 bytes"));
    }
    if c.chars().any(|ch| ch == '\0' || (ch.is_control() && ch != '\n' && ch != '\t')) {
        return Err(ValidationError::new(field, "must not contain control characters other than newlines and tabs"));
    }
    Ok(())
}

/// Bounds and targets of autoscaling, each checked with the field it is in.
pub fn scaling(s: &crate::Scaling) -> Result {
    if s.min_per_region > 100 {
        return Err(ValidationError::new("scaling.min_per_region", "use 0 to 100"));
    }
    if !(1..=100).contains(&s.max_per_region) {
        return Err(ValidationError::new("scaling.max_per_region", "use 1 to 100"));
    }
    if s.min_per_region > s.max_per_region {
        return Err(ValidationError::new(
            "scaling.min_per_region",
            format!("{} is more than max_per_region ({})", s.min_per_region, s.max_per_region),
        ));
    }
    for (field, v) in [
        ("scaling.target_cpu_percent", s.target_cpu_percent),
        ("scaling.target_memory_percent", s.target_memory_percent),
    ] {
        if v.is_some_and(|p| !(1..=100).contains(&p)) {
            return Err(ValidationError::new(field, "use 1 to 100 (percent)"));
        }
    }
    if s.target_concurrency.is_some_and(|c| !(1..=1000).contains(&c)) {
        return Err(ValidationError::new(
            "scaling.target_concurrency",
            "use 1 to 1000 (requests in flight per instance)",
        ));
    }
    Ok(())
}

/// Longest idle time before a deployment sleeps: 30 days.
pub const MAX_SLEEP_AFTER_SECS: u32 = 30 * 24 * 3600;

fn lifecycle(sleep_after_secs: Option<u32>, retain_deployments: Option<u32>) -> Result {
    if let Some(s) = sleep_after_secs {
        if !(10..=MAX_SLEEP_AFTER_SECS).contains(&s) {
            return Err(ValidationError::new(
                "sleep_after_secs",
                format!("{s} is out of range; use 10 to {MAX_SLEEP_AFTER_SECS} seconds"),
            ));
        }
    }
    if let Some(n) = retain_deployments {
        if !(1..=1000).contains(&n) {
            return Err(ValidationError::new("retain_deployments", format!("{n} is out of range; use 1 to 1000")));
        }
    }
    Ok(())
}

impl CreateDomain {
    pub fn validate(&self) -> Result {
        domain_name("name", &self.name)
    }
}

impl CreateDeployment {
    pub fn validate(&self) -> Result {
        dns_label("org", &self.org)?;
        dns_label("project", &self.project)?;
        match &self.build {
            Some(b) if self.image.is_empty() => b.validate()?,
            Some(_) => {
                return Err(ValidationError::new("image", "give either an image or a build from source, not both"))
            }
            None if self.image.is_empty() => {
                return Err(ValidationError::new(
                    "image",
                    "name the image to deploy, or give build.source to build one from source",
                ))
            }
            None => image_reference("image", &self.image)?,
        }
        if let Some(s) = &self.commit_sha {
            commit_sha("commit_sha", s)?;
        }
        if let Some(m) = &self.commit_message {
            if m.len() > 4096 {
                return Err(ValidationError::new("commit_message", "must be at most 4096 bytes"));
            }
        }
        if let Some(n) = self.instances_per_region {
            instances_per_region("instances_per_region", n)?;
        }
        if let Some(r) = &self.rollout {
            crate::releases::rollout("rollout", r)?;
        }
        if let Some(sh) = &self.shadow {
            crate::releases::shadow("shadow", sh)?;
        }
        if let Some(c) = &self.release_command {
            release_command("release_command", c)?;
        }
        Ok(())
    }
}

impl CreateToken {
    pub fn validate(&self) -> Result {
        text("name", &self.name, 64)?;
        if let TokenScope::Org { org, .. } = &self.scope {
            dns_label("scope.org", org)?;
        }
        if let Some(d) = self.expires_in_days {
            if d == 0 || d > 3650 {
                return Err(ValidationError::new("expires_in_days", "use 1 to 3650"));
            }
        }
        Ok(())
    }
}

impl crate::HealthCheckSpec {
    pub fn validate(&self) -> Result {
        if !self.path.starts_with('/')
            || self.path.len() > 1024
            || self.path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ValidationError::new("path", format!("{:?} is not a URL path like /healthz", self.path)));
        }
        if !matches!(self.method.as_str(), "GET" | "HEAD") {
            return Err(ValidationError::new("method", format!("{:?}: use GET or HEAD", self.method)));
        }
        if !(100..=599).contains(&self.expected_status) {
            return Err(ValidationError::new("expected_status", "use an HTTP status, 100 to 599"));
        }
        if let Some(b) = &self.body_contains {
            if b.is_empty() || b.len() > 256 {
                return Err(ValidationError::new("body_contains", "use 1 to 256 characters"));
            }
            if self.method == "HEAD" {
                return Err(ValidationError::new("body_contains", "HEAD answers have no body; use GET"));
            }
        }
        if !(10..=3600).contains(&self.interval_secs) {
            return Err(ValidationError::new(
                "interval_secs",
                format!("{} is out of range; use 10 to 3600", self.interval_secs),
            ));
        }
        if self.timeout_secs == 0 || self.timeout_secs > 60 || self.timeout_secs > self.interval_secs {
            return Err(ValidationError::new("timeout_secs", "use 1 to 60 seconds, at most interval_secs"));
        }
        if !(1..=60_000).contains(&self.degraded_ms) {
            return Err(ValidationError::new("degraded_ms", "use 1 to 60000"));
        }
        for (i, r) in self.regions.iter().enumerate() {
            dns_label(&format!("regions[{i}]"), r)?;
        }
        Ok(())
    }
}

/// Most entries an egress allow-list may hold.
pub const EGRESS_MAX: usize = 64;

/// An entry of an egress allow-list: an IPv4 network and an optional port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressRule {
    pub addr: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub port: Option<u16>,
}

impl EgressRule {
    /// `203.0.113.0/24`, `198.51.100.7`, `198.51.100.7:443` or `192.0.2.0/28:5432`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (net, port) = match s.rsplit_once(':') {
            Some((net, port)) => {
                let port: u16 =
                    port.parse().map_err(|_| format!("{s:?}: the port must be a number from 1 to 65535"))?;
                if port == 0 {
                    return Err(format!("{s:?}: the port must be a number from 1 to 65535"));
                }
                (net, Some(port))
            }
            None => (s, None),
        };
        let (addr, len) = match net.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{s:?}: the prefix length must be a number from 0 to 32"))?,
            ),
            None => (net, 32),
        };
        let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| {
            format!("{s:?} is not an IPv4 address or CIDR block with an optional port (e.g. 203.0.113.0/24 or 198.51.100.7:443)")
        })?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "{s:?}: host bits are set; the network is {}/{len}",
                std::net::Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(EgressRule { addr, prefix_len: len, port })
    }
}

/// An entry of an egress allow-list: a network, or a host name the node
/// agent resolves (and resolves again at the answer's TTL), each with an
/// optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressEntry {
    Net(EgressRule),
    /// A host name (lowercase, no trailing dot) and an optional port.
    Host {
        name: String,
        port: Option<u16>,
    },
}

impl EgressEntry {
    /// A network as [`EgressRule::parse`] takes it, or `api.example.com` /
    /// `api.example.com:443`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        // A name ends in a label that is not all digits; anything else is an address.
        let last = host.strip_suffix('.').unwrap_or(host).rsplit('.').next().unwrap_or("");
        let named = !host.contains('/') && last.bytes().any(|b| b.is_ascii_alphabetic() || b == b'-');
        if !named {
            return EgressRule::parse(s).map(EgressEntry::Net);
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if hostname("", &name).is_err() || !name.contains('.') || name.ends_with(".internal") {
            return Err(format!(
                "{s:?} is neither an IPv4 address or CIDR block nor a host name with a domain, each with an optional port \
                 (e.g. 203.0.113.0/24, 198.51.100.7:443 or api.example.com:443)"
            ));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{s:?}: the port must be a number from 1 to 65535"))?,
            ),
        };
        Ok(EgressEntry::Host { name, port })
    }
}

pub fn egress(field: &str, e: &Egress) -> Result {
    if e.allow.len() > EGRESS_MAX {
        return Err(ValidationError::new(field, format!("at most {EGRESS_MAX} destinations, not {}", e.allow.len())));
    }
    for a in &e.allow {
        EgressEntry::parse(a).map_err(|m| ValidationError::new(format!("{field}.allow"), m))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
