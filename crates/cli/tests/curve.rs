//! CURVE from the command line: `rylm keygen` writes the keys, a master admits only the
//! workers and clients on its allow-list, and a peer with an unknown key or none never reaches
//! a function or a worker's credits.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{DEADLINE, Ports, Rylm};
use rylm_components::rylm_transport::{Keypair, PublicKey};
use rylm_components::{Client, ClientOptions, Transport};

fn keygen(dir: &Path, name: &str) -> std::path::PathBuf {
    let base = dir.join(name);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .arg("keygen")
        .arg(&base)
        .output()
        .expect("rylm keygen runs");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    let secret = std::fs::read_to_string(base.with_extension("key_secret")).expect("secret");
    let secret_z85 = secret
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret-key = "))
        .expect("a secret line");
    assert!(
        !printed.contains(secret_z85.trim_matches('"')),
        "keygen printed the secret"
    );
    base
}

async fn client(
    db: &str,
    keys: Option<&Path>,
    server: &Path,
) -> Result<Client, rylm_components::Error> {
    let mut transport = Transport::default();
    if let Some(keys) = keys {
        transport = transport.curve_client(
            Keypair::load(&keys.with_extension("key_secret")).expect("client keys"),
            PublicKey::load(&server.with_extension("key")).expect("server key"),
        );
    }
    let options = ClientOptions {
        deadline: Duration::from_secs(3),
        transport,
        ..ClientOptions::default()
    };
    Client::connect_with(db, options).await
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_curve_master_admits_only_the_keys_it_allows() {
    let dir = TempDir(std::env::temp_dir().join(format!("rylm-cli-curve-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let [master_keys, worker_keys, client_keys, intruder_keys] =
        ["master", "worker", "client", "intruder"].map(|name| keygen(&dir.0, name));
    let allowed = dir.0.join("allowed");
    let certificates = [&worker_keys, &client_keys]
        .map(|base| std::fs::read_to_string(base.with_extension("key")).expect("public"));
    std::fs::write(&allowed, certificates.concat()).expect("allow-list");

    let ports = Ports::new();
    let secret = |base: &Path| base.with_extension("key_secret").display().to_string();
    let public = |base: &Path| base.with_extension("key").display().to_string();
    let mut args = ports.master("m");
    args.extend([
        "--curve-secret".to_owned(),
        secret(&master_keys),
        "--curve-allow".to_owned(),
        allowed.display().to_string(),
    ]);
    let _master = Rylm::start(&args).await;

    // A worker with a key the master does not know connects straight to the workers' port.
    let _intruder_worker = Rylm::start(&[
        "worker",
        "--connect",
        &ports.workers,
        "--curve-secret",
        &secret(&intruder_keys),
        "--curve-server-key",
        &public(&master_keys),
    ])
    .await;
    let allowed_client = client(&ports.db, Some(&client_keys), &master_keys)
        .await
        .expect("an allowed client connects");
    let outcome = allowed_client
        .eval_within("upper", "x", Duration::from_secs(2))
        .await;
    assert!(
        matches!(outcome, Err(rylm_components::Error::Timeout { .. })),
        "the intruding worker got work: {outcome:?}"
    );

    // The allowed worker gets it.
    let _worker = Rylm::start(&[
        "worker",
        "--db",
        &ports.db,
        "--curve-secret",
        &secret(&worker_keys),
        "--curve-server-key",
        &public(&master_keys),
    ])
    .await;
    let result = allowed_client
        .eval_within("upper", "curve", DEADLINE)
        .await
        .expect("served by the allowed worker");
    assert_eq!(&result[..], b"CURVE");

    // Clients with an unknown key, or none, never get an answer.
    let intruder = client(&ports.db, Some(&intruder_keys), &master_keys).await;
    assert!(intruder.is_err(), "an unknown key was admitted");
    let plain = client(&ports.db, None, &master_keys).await;
    assert!(plain.is_err(), "a client without CURVE was admitted");
}
