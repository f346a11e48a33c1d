//! Tidy checks, run as ordinary tests: every crate carries the documents and metadata that the
//! workspace promises.

use std::path::{Path, PathBuf};

use crate::workspace_root;

/// Every package folder under `crates/`.
fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("crates"))
        .expect("crates/ is readable")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_crate_opens_with_an_essay() {
    for dir in crate_dirs() {
        let root = ["src/lib.rs", "src/main.rs"]
            .iter()
            .map(|file| dir.join(file))
            .find(|path| path.is_file())
            .unwrap_or_else(|| panic!("{} has no lib.rs or main.rs", dir.display()));
        let text = read(&root);
        let essay: Vec<&str> = text.lines().take_while(|l| l.starts_with("//!")).collect();
        assert!(
            essay.len() >= 3,
            "{} must open with a `//!` essay of what the crate is for",
            root.display()
        );
        if root.ends_with("lib.rs") {
            assert!(
                text.contains("#![warn(missing_docs)]"),
                "{} must warn on missing docs",
                root.display()
            );
        }
    }
}

#[test]
fn every_publishable_crate_has_its_metadata() {
    for dir in crate_dirs() {
        let manifest = read(&dir.join("Cargo.toml"));
        if manifest.contains("publish = false") {
            continue;
        }
        let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            manifest.contains(&format!("name = \"rylm-{folder}\"")),
            "{folder}: the package is named rylm-{folder}"
        );
        for field in [
            "description = ",
            "keywords = ",
            "categories = ",
            "readme = \"README.md\"",
        ] {
            assert!(
                manifest.contains(field),
                "{folder}/Cargo.toml lacks {field}"
            );
        }
        assert!(
            dir.join("README.md").is_file(),
            "{folder} lacks a README.md"
        );
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{folder} must use the workspace lints"
        );
    }
}

#[test]
fn ci_runs_the_readme_test_command() {
    let root = workspace_root();
    let readme = read(&root.join("README.md"));
    let ci = read(&root.join(".ci/run"));
    assert!(readme.contains("cargo xtask test") && readme.contains("cargo xtask demo"));
    assert!(ci.lines().any(|line| line.trim() == "cargo xtask test"));
}
