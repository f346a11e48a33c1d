//! Third-party peers for interop tests, installed once under `target/` and reused after.
//!
//! - The npm package `syrpc@1.0.6`, run with Node, for the SyRPC interop tests.
//! - The PyPI package `pylm` 0.14.4 (with `protobuf==3.20.3`) in a virtual environment, for the
//!   pylm interop tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const SYRPC_JS: &str = "syrpc@1.0.6";

/// Environment variables that point the tests at the installed peers.
pub fn prepare() -> Result<Vec<(&'static str, String)>> {
    let node = ensure_node()?;
    let ip = ensure_ip()?;
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
    let python = ensure_pylm()?;
    Ok(vec![
        ("RYLM_IP", ip.display().to_string()),
        ("RYLM_PYTHON", python.display().to_string()),
        ("RYLM_NODE", node.display().to_string()),
        (
            "RYLM_NODE_MODULES",
            prefix.join("node_modules").display().to_string(),
        ),
    ])
}

/// A virtual environment under `target/` with pylm, created once; its Python.
pub fn ensure_pylm() -> Result<PathBuf> {
    let venv = crate::workspace_root().join("target/pylm-venv");
    let python = venv.join("bin/python");
    let ready = venv.join("rylm-ready");
    if python.is_file() && ready.is_file() {
        return Ok(python);
    }
    let system = which("python3").context("python3 is needed for the pylm interop tests")?;
    eprintln!(
        "xtask: creating a Python environment with pylm 0.14.4 under {} (once)",
        venv.display()
    );
    let status = Command::new(&system)
        .args(["-m", "venv"])
        .arg(&venv)
        .stdin(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("python3 -m venv failed ({status}); on Debian: apt-get install -y python3-venv");
    }
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "pylm==0.14.4",
            "protobuf==3.20.3",
        ])
        .stdin(Stdio::null())
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip install pylm failed ({status})");
    }
    std::fs::write(&ready, "pylm==0.14.4 protobuf==3.20.3\n")?;
    Ok(python)
}

fn is_version(package_json: &Path, version: &str) -> bool {
    std::fs::read_to_string(package_json)
        .is_ok_and(|text| text.contains(&format!("\"version\": \"{version}\"")))
}

/// `ip` (iproute2), for the tests that build network namespaces; installed with apt-get when
/// missing and allowed (root on Debian).
fn ensure_ip() -> Result<PathBuf> {
    if let Some(ip) = which("ip") {
        return Ok(ip);
    }
    if !crate::provision::may_install() {
        bail!(
            "`ip` (iproute2) is needed for the network-namespace tests. On Debian or Ubuntu:\n    sudo apt-get install -y iproute2"
        );
    }
    eprintln!("xtask: `ip` is missing; installing iproute2 with apt-get (root on Debian)");
    crate::provision::apt_install(&["iproute2"])?;
    which("ip").context("apt-get installed iproute2, but `ip` is still not found")
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
