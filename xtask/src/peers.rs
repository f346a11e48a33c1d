//! Third-party peers for interop tests, installed once under `target/` and reused after.
//!
//! - The npm package `syrpc@1.0.6`, run with Node, for the SyRPC interop tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const SYRPC_JS: &str = "syrpc@1.0.6";

/// Environment variables that point the tests at the installed peers.
pub fn prepare() -> Result<Vec<(&'static str, String)>> {
    let node = ensure_node()?;
    let prefix = crate::workspace_root().join("target/node-peers");
    let installed = prefix.join("node_modules/syrpc/package.json");
    if !installed.is_file() || !is_version(&installed, "1.0.6") {
        eprintln!(
            "xtask: installing the npm package {SYRPC_JS} under {} (once)",
            prefix.display()
        );
        std::fs::create_dir_all(&prefix)?;
        let status = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&prefix)
            .arg(SYRPC_JS)
            .stdin(Stdio::null())
            .status()
            .context("running npm")?;
        if !status.success() || !installed.is_file() {
            bail!("npm install {SYRPC_JS} failed ({status})");
        }
    }
    Ok(vec![
        ("RYLM_NODE", node.display().to_string()),
        (
            "RYLM_NODE_MODULES",
            prefix.join("node_modules").display().to_string(),
        ),
    ])
}

fn is_version(package_json: &Path, version: &str) -> bool {
    std::fs::read_to_string(package_json)
        .is_ok_and(|text| text.contains(&format!("\"version\": \"{version}\"")))
}

/// Node.js and npm, installed with apt-get when missing and allowed (root on Debian).
fn ensure_node() -> Result<PathBuf> {
    if let (Some(node), Some(_)) = (which("node"), which("npm")) {
        return Ok(node);
    }
    if !crate::provision::may_install() {
        bail!(
            "Node.js and npm are needed for the interop tests. On Debian or Ubuntu:\n    sudo apt-get install -y nodejs npm"
        );
    }
    eprintln!("xtask: Node.js or npm is missing; installing them with apt-get (root on Debian)");
    crate::provision::apt_install(&["nodejs", "npm"])?;
    which("node").context("apt-get installed nodejs, but `node` is still not found")
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
