//! CURVE keys: Z85 text, key files and environment variables. A secret key is never printed.
//!
//! Key files are the certificates that libzmq's tools and pyzmq's `zmq.auth` write and read:
//! `NAME.key` holds `public-key = "..."`, and `NAME.key_secret` holds both keys (and is
//! created readable by its owner only). A file may also hold one bare Z85 key. A list of
//! allowed clients is a file with one public key per line (bare Z85 or `public-key = "..."`;
//! a line that starts with `#` is a comment), or public certificates concatenated
//! (`cat worker.key client.key > allowed`).

use std::path::Path;

use crate::Error;

/// A Curve25519 public key (32 bytes; 40 characters of Z85).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_z85())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_z85())
    }
}

impl PublicKey {
    /// Reads 40 Z85 characters; `origin` names where they came from, for the error.
    pub fn from_z85(text: &str, origin: &str) -> Result<Self, Error> {
        omq_tokio::CurvePublicKey::from_z85(text.trim())
            .map(|key| PublicKey(*key.as_bytes()))
            .map_err(|e| key_error(origin, e))
    }

    /// The key as Z85.
    pub fn to_z85(&self) -> String {
        omq_tokio::CurvePublicKey::from_bytes(self.0).to_z85()
    }

    /// Reads a public key from a file (a certificate or one bare Z85 key).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let origin = path.display().to_string();
        let text = read(path)?;
        let z85 = field(&text, "public-key").unwrap_or_else(|| text.trim().to_owned());
        PublicKey::from_z85(&z85, &origin)
    }

    /// Reads a list of public keys, one per line.
    pub fn load_list(path: &Path) -> Result<Vec<Self>, Error> {
        let origin = path.display().to_string();
        let text = read(path)?;
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            // Z85 has `#` among its characters: only a whole line can be a comment.
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Certificates may be concatenated: their other lines are not keys.
            let z85 = match field(line, "public-key") {
                Some(z85) => z85,
                None if line.contains(" = ") || line == "metadata" || line == "curve" => continue,
                None => line.to_owned(),
            };
            keys.push(PublicKey::from_z85(
                &z85,
                &format!("{origin}, line {}", number + 1),
            )?);
        }
        Ok(keys)
    }

    pub(crate) fn omq(&self) -> omq_tokio::CurvePublicKey {
        omq_tokio::CurvePublicKey::from_bytes(self.0)
    }
}

/// A Curve25519 key pair. Its `Debug` shows the public key only.
#[derive(Clone)]
pub struct Keypair {
    /// The public half, given to peers.
    pub public: PublicKey,
    secret: [u8; 32],
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl Keypair {
    /// A new random key pair.
    pub fn generate() -> Self {
        let pair = omq_tokio::CurveKeypair::generate();
        Keypair {
            public: PublicKey(*pair.public.as_bytes()),
            secret: *pair.secret.as_bytes(),
        }
    }

    /// The pair of a secret key given as 40 Z85 characters.
    pub fn from_secret_z85(text: &str, origin: &str) -> Result<Self, Error> {
        let secret =
            omq_tokio::CurveSecretKey::from_z85(text.trim()).map_err(|e| key_error(origin, e))?;
        Ok(Keypair {
            public: PublicKey(*secret.derive_public().as_bytes()),
            secret: *secret.as_bytes(),
        })
    }

    /// Reads a key pair from a secret certificate (or a file with one bare Z85 secret key).
    /// When the file states the public key too, it must match the secret.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let origin = path.display().to_string();
        let text = read(path)?;
        let secret = field(&text, "secret-key").unwrap_or_else(|| text.trim().to_owned());
        let pair = Keypair::from_secret_z85(&secret, &origin)?;
        if let Some(public) = field(&text, "public-key")
            && PublicKey::from_z85(&public, &origin)? != pair.public
        {
            return Err(Error::Key {
                origin,
                reason: "the public key does not belong to the secret key".into(),
            });
        }
        Ok(pair)
    }

    /// Reads a key pair from the Z85 secret key in the environment variable `name`;
    /// `Ok(None)` when it is not set.
    pub fn from_env(name: &str) -> Result<Option<Self>, Error> {
        match std::env::var(name) {
            Ok(secret) => Keypair::from_secret_z85(&secret, &format!("${name}")).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::Key {
                origin: format!("${name}"),
                reason: "not UTF-8".into(),
            }),
        }
    }

    /// Writes `BASE.key` (the public certificate) and `BASE.key_secret` (both keys, readable
    /// by its owner only); refuses to overwrite either. Returns the two paths.
    pub fn write(&self, base: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), Error> {
        let public_path = base.with_extension("key");
        let secret_path = base.with_extension("key_secret");
        let public = self.public.to_z85();
        let secret = omq_tokio::CurveSecretKey::from_bytes(self.secret).to_z85();
        let header = "#   ZeroMQ CURVE certificate written by rylm keygen\n";
        write_new(
            &public_path,
            &format!(
                "{header}#   public: give it to peers\n\nmetadata\ncurve\n    public-key = \"{public}\"\n"
            ),
            false,
        )?;
        write_new(
            &secret_path,
            &format!(
                "{header}#   SECRET: keep it to this host\n\nmetadata\ncurve\n    public-key = \"{public}\"\n    secret-key = \"{secret}\"\n"
            ),
            true,
        )?;
        Ok((public_path, secret_path))
    }

    pub(crate) fn omq(&self) -> omq_tokio::CurveKeypair {
        omq_tokio::CurveKeypair {
            public: omq_tokio::CurvePublicKey::from_bytes(self.public.0),
            secret: omq_tokio::CurveSecretKey::from_bytes(self.secret),
        }
    }
}

fn key_error(origin: &str, error: omq_tokio::Error) -> Error {
    Error::Key {
        origin: origin.to_owned(),
        reason: error.to_string(),
    }
}

/// Files larger than this are not key files.
const MAX_KEY_FILE: u64 = 1024 * 1024;

fn read(path: &Path) -> Result<String, Error> {
    let io = |e: std::io::Error| Error::Key {
        origin: path.display().to_string(),
        reason: e.to_string(),
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_KEY_FILE {
        return Err(Error::Key {
            origin: path.display().to_string(),
            reason: format!("{size} bytes is too large for a key file"),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// The quoted value of `name = "..."` in a certificate.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
    })
}

fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), Error> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let io = |e: std::io::Error| Error::Key {
        origin: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut file = options.open(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_certificates_load_back_and_hide_the_secret() {
        let dir = std::env::temp_dir().join(format!("rylm-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let base = dir.join("server");
        let _ = std::fs::remove_file(base.with_extension("key"));
        let _ = std::fs::remove_file(base.with_extension("key_secret"));
        let pair = Keypair::generate();
        let (public, secret) = pair.write(&base).expect("written");
        assert!(pair.write(&base).is_err(), "overwrote a key");
        assert_eq!(PublicKey::load(&public).expect("public"), pair.public);
        let loaded = Keypair::load(&secret).expect("secret");
        assert_eq!(loaded.public, pair.public);
        assert!(!format!("{loaded:?}").contains(&loaded.secret_z85()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secret readable by others");
        }
        let list = dir.join("allowed");
        let certificate = std::fs::read_to_string(&public).expect("certificate");
        std::fs::write(
            &list,
            format!(
                "# clients\n{}\n  public-key = \"{}\"\n{certificate}",
                pair.public,
                Keypair::generate().public
            ),
        )
        .expect("list");
        assert_eq!(PublicKey::load_list(&list).expect("list").len(), 3);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        let error = Keypair::from_secret_z85("not a key", "$TEST").expect_err("bad key");
        assert!(error.to_string().contains("$TEST"));
        assert!(!error.to_string().contains("not a key"));
        assert!(PublicKey::from_z85("short", "x").is_err());
    }

    impl Keypair {
        fn secret_z85(&self) -> String {
            omq_tokio::CurveSecretKey::from_bytes(self.secret).to_z85()
        }
    }
}
