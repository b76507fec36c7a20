//! ARCHITECTURE.md against the Cargo graph: every workspace crate is named,
//! and its "Crate graph" section lists exactly the dependencies between
//! workspace crates that the manifests declare.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The workspace's member directories: `crates/*` and `bench/*`.
fn members(group: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join(group))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn manifest(dir: &Path) -> toml::Table {
    std::fs::read_to_string(dir.join("Cargo.toml")).unwrap().parse().unwrap()
}

/// What the manifests say: each crate under crates/ and the workspace crates
/// it depends on (`[dependencies]` and `[build-dependencies]`).
fn cargo_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dirs = members("crates");
    let names: BTreeSet<String> = dirs.iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect();
    dirs.iter()
        .map(|d| {
            let m = manifest(d);
            let name = m["package"]["name"].as_str().unwrap().to_owned();
            let deps = ["dependencies", "build-dependencies"]
                .iter()
                .filter_map(|s| m.get(*s).and_then(|t| t.as_table()))
                .flat_map(|t| t.keys().cloned())
                .filter(|k| names.contains(k))
                .collect();
            (name, deps)
        })
        .collect()
}

/// What ARCHITECTURE.md says: lines "- `crate` → `dep`, `dep`" (or "→ nothing").
fn documented_graph(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let section = doc.split("## Crate graph").nth(1).expect("ARCHITECTURE.md has a \"## Crate graph\" section");
    let section = section.split("\n## ").next().unwrap();
    let ticked = |s: &str| -> Vec<String> { s.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    section
        .lines()
        .filter_map(|l| l.strip_prefix("- "))
        .filter_map(|l| l.split_once('→'))
        .map(|(from, to)| (ticked(from).concat(), ticked(to).into_iter().collect()))
        .collect()
}

#[test]
fn architecture_names_every_crate_and_lists_the_crate_graph() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut problems = Vec::new();
    for group in ["crates", "bench"] {
        for dir in members(group) {
            let path = format!("{group}/{}", dir.file_name().unwrap().to_string_lossy());
            if !doc.contains(&format!("`{path}`")) {
                problems.push(format!("{path} is not named in ARCHITECTURE.md's table"));
            }
        }
    }
    let cargo = cargo_graph();
    let documented = documented_graph(&doc);
    for (name, deps) in &cargo {
        match documented.get(name) {
            None => problems.push(format!("the crate graph has no line for `{name}`")),
            Some(listed) => {
                for missing in deps.difference(listed) {
                    problems.push(format!("`{name}` depends on `{missing}`, which the crate graph does not list"));
                }
                for extra in listed.difference(deps) {
                    problems
                        .push(format!("the crate graph lists `{name}` → `{extra}`, which Cargo.toml does not declare"));
                }
            }
        }
    }
    for name in documented.keys().filter(|n| !cargo.contains_key(*n)) {
        problems.push(format!("the crate graph names `{name}`, which is not a crate under crates/"));
    }
    assert!(problems.is_empty(), "ARCHITECTURE.md and the Cargo graph disagree:\n{}", problems.join("\n"));
}
