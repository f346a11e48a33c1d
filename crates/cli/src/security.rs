//! CURVE from the command line: `rylm keygen`, and the flags every server, worker, client,
//! service and caller takes. Keys come from files or the environment and are never printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use rylm_components::Transport;
use rylm_components::rylm_transport::{Keypair, Options, PublicKey};

/// The variable that may hold this process's Z85 secret key instead of `--curve-secret`.
pub(crate) const SECRET_VARIABLE: &str = "RYLM_CURVE_SECRET";

#[derive(Args, Debug, Clone, Default)]
pub(crate) struct SecurityArgs {
    /// This process's CURVE key pair: a secret certificate written by `rylm keygen` (or set
    /// RYLM_CURVE_SECRET to the Z85 secret key). With it, the sockets this process binds
    /// accept CURVE clients only.
    #[arg(long, value_name = "FILE")]
    curve_secret: Option<PathBuf>,
    /// The CURVE public key of the server this process connects to (a `.key` file or 40 Z85
    /// characters): its connections use CURVE. A process with no key pair of its own uses a
    /// new one for each run.
    #[arg(long, value_name = "FILE|Z85", env = "RYLM_CURVE_SERVER")]
    curve_server_key: Option<String>,
    /// The clients allowed to connect: a file of CURVE public keys, one per line. Without it,
    /// any client that knows the server's public key is admitted.
    #[arg(long, value_name = "FILE")]
    curve_allow: Option<PathBuf>,
}

impl SecurityArgs {
    fn keypair(&self) -> Result<Option<Keypair>> {
        match &self.curve_secret {
            Some(path) => Ok(Some(Keypair::load(path)?)),
            None => Ok(Keypair::from_env(SECRET_VARIABLE)?),
        }
    }

    fn server_key(&self) -> Result<Option<PublicKey>> {
        let Some(key) = &self.curve_server_key else {
            return Ok(None);
        };
        let path = Path::new(key);
        Ok(Some(if path.is_file() {
            PublicKey::load(path)?
        } else {
            PublicKey::from_z85(key, "--curve-server-key").context(
                "--curve-server-key is neither a key file nor 40 Z85 characters of a public key",
            )?
        }))
    }

    /// The socket options these flags ask for: bound sockets are CURVE servers when a key
    /// pair is given, connected ones CURVE clients when a server key is given.
    pub(crate) fn transport(&self) -> Result<Transport> {
        let keypair = self.keypair()?;
        let allowed = match &self.curve_allow {
            Some(path) => Some(PublicKey::load_list(path)?),
            None => None,
        };
        let mut transport = Transport::default();
        match (&keypair, allowed) {
            (Some(keypair), allowed) => {
                transport = transport.curve_server(keypair.clone(), allowed);
            }
            (None, Some(_)) => bail!(
                "--curve-allow needs this process's own key pair (--curve-secret or {SECRET_VARIABLE})"
            ),
            (None, None) => {}
        }
        if let Some(server) = self.server_key()? {
            let own = keypair.unwrap_or_else(Keypair::generate);
            transport = transport.curve_client(own, server);
        }
        Ok(transport)
    }

    /// The options of a process that only connects (a worker, a client, a caller).
    pub(crate) fn connecting(&self) -> Result<Options> {
        if self.curve_allow.is_some() {
            bail!("--curve-allow is for processes that bind; this one connects");
        }
        Ok(self.transport()?.connected)
    }

    /// The options of a process that only binds (a service).
    pub(crate) fn binding(&self) -> Result<Options> {
        if self.curve_server_key.is_some() {
            bail!("--curve-server-key is for processes that connect; this one binds");
        }
        Ok(self.transport()?.bound)
    }
}

#[derive(Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Where to write: BASE.key (public, give it to peers) and BASE.key_secret (both keys,
    /// readable by its owner only). Existing files are never overwritten.
    base: PathBuf,
}

/// `rylm keygen BASE`.
pub(crate) fn keygen(args: KeygenArgs) -> Result<()> {
    let pair = Keypair::generate();
    let (public, secret) = pair.write(&args.base)?;
    println!("public key: {}", pair.public);
    println!(
        "wrote {} (public) and {} (secret)",
        public.display(),
        secret.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rylm_components::rylm_transport::Security;

    #[test]
    fn flags_make_curve_servers_and_clients() {
        let dir = std::env::temp_dir().join(format!("rylm-cli-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let base = dir.join("server");
        keygen(KeygenArgs { base: base.clone() }).expect("keygen");
        let server = SecurityArgs {
            curve_secret: Some(base.with_extension("key_secret")),
            ..SecurityArgs::default()
        };
        assert!(matches!(
            server.binding().expect("options").security,
            Security::CurveServer { allowed: None, .. }
        ));
        let client = SecurityArgs {
            curve_server_key: Some(base.with_extension("key").display().to_string()),
            ..SecurityArgs::default()
        };
        assert!(matches!(
            client.connecting().expect("options").security,
            Security::CurveClient { .. }
        ));
        let lonely_allow = SecurityArgs {
            curve_allow: Some(base.with_extension("key")),
            ..SecurityArgs::default()
        };
        assert!(lonely_allow.transport().is_err());
        assert!(keygen(KeygenArgs { base }).is_err(), "overwrote a key");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
