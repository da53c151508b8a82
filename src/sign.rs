//! Minisign keys and signatures.
//!
//! Server side: the trust store of publisher **public** keys, in the catalog
//! ([`trust`]: every instance sharing a catalog trusts the same keys, and a
//! revocation holds on all of them at their next request), and
//! [`verify_signature`]. The server never holds a private key. Keys an
//! appliance kept as files (`DATA_DIR/keys/<NAME>.pub`) are imported into the
//! catalog once ([`files`]).
//!
//! Consumer side: [`load_keys_from`] reads the keys a consumer trusts from a
//! directory of `.pub` files (with optional `.toml` policies) or one file.
//!
//! Publisher side: [`load_secret_key`] reads keys made by `minisign -G`
//! (password-protected) and `minisign -G -W` (unencrypted), and [`sign`]
//! produces a prehashed `.minisig` text that the stock `minisign -V` accepts.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use crate::digest::Digest;

mod files;
mod trust;
pub use crate::catalog::KeyState;
pub use files::{import_key_files, load_keys_from, MARKER_FILE};
pub use trust::{
    add_trusted_key, load_trusted_keys, remove_trusted_key, set_key_scopes, set_key_state,
};

/// Environment variable holding the password of an encrypted secret key.
pub const PASSWORD_ENV: &str = "IMGSRV_KEY_PASSWORD";

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";
/// Legacy signature algorithm: Ed25519 over the raw message.
const ALG_LEGACY: [u8; 2] = *b"Ed";
/// Current signature algorithm: Ed25519 over BLAKE2b-512(message).
const ALG_PREHASHED: [u8; 2] = *b"ED";
const KDF_NONE: [u8; 2] = [0, 0];
const KDF_SCRYPT: [u8; 2] = *b"Sc";
const CHK_BLAKE2B: [u8; 2] = *b"B2";
/// alg(2) kdf(2) chk(2) salt(32) opslimit(8) memlimit(8) keynum(8) sk(64) chk(32)
const SECRET_KEY_LEN: usize = 158;
/// The crate refuses scrypt parameters above this (N = 2^20, r = 8: 1 GiB).
const SCRYPT_MEMLIMIT_MAX: u64 = 1 << 30;

/// Why a key or signature operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("invalid key name {0:?}: expected 1 to 64 characters from [A-Za-z0-9._-], starting with a letter or digit")]
    InvalidName(String),
    #[error("{path}: not a minisign public key ({reason})")]
    MalformedKey { path: PathBuf, reason: String },
    #[error("trusted key {name:?} in the catalog is unusable ({reason}): remove it with `imgsrv key remove {name}` and add it again from its .pub file")]
    MalformedStoredKey { name: String, reason: String },
    #[error("the trusted keys cannot be read from the catalog: {0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("key {key_id} was retired or revoked in this catalog before: a key is never trusted again (make a new key pair with `minisign -G`)")]
    NeverAgain { key_id: String },
    #[error("key {name:?} ({key_id}) is revoked: it stays in the trust store, listed as revoked (consumers learn of the revocation from GET /v1/keys), and nothing signed with it is trusted")]
    RevokedStaysListed { name: String, key_id: String },
    #[error("{path}: not a usable minisign secret key ({reason})")]
    MalformedSecretKey { path: PathBuf, reason: String },
    #[error("malformed minisign signature: {0}")]
    Malformed(String),
    #[error("legacy (non-prehashed) minisign signature refused: sign with minisign 0.8 or later, without -l")]
    LegacySignature,
    #[error("signature was made with key {0}, which is not a trusted publisher key (add it with `imgsrv key add`)")]
    UnknownKey(String),
    #[error("signature by key {key_name:?} ({key_id}) does not verify: the signed data or its trusted comment differs from what was signed")]
    BadSignature { key_name: String, key_id: String },
    #[error("a trusted key named {0:?} already exists")]
    DuplicateName(String),
    #[error("key {key_id} is already trusted under the name {name:?}")]
    DuplicateKeyId { key_id: String, name: String },
    #[error("trusted keys {first} and {second} have the same key id {key_id}")]
    ConflictingKeyId {
        key_id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no trusted key has the name or key id {0:?}")]
    NotFound(String),
    #[error("key {name:?} ({key_id}) is {}: it signs no new publications", state.as_str())]
    KeyNotActive {
        name: String,
        key_id: String,
        state: KeyState,
    },
    #[error(
        "key {name:?} ({key_id}) is trusted, but its scope ({scopes}) does not cover image \
         {image:?}: to let it sign {image}, give it the globs it needs on the server, \
         `imgsrv key scope --data DIR {name} --scope GLOB ...` (the whole new list; every \
         instance sees it at its next request), or re-add it: `imgsrv key remove {name}`, \
         then `imgsrv key add --name {name} --scope GLOB ... {name}.pub`"
    )]
    OutOfScope {
        name: String,
        key_id: String,
        image: String,
        scopes: String,
    },
    #[error("key {name:?} ({key_id}) is revoked: nothing signed with it is trusted any more")]
    Revoked { name: String, key_id: String },
    #[error("invalid scope {0:?}: an image-name glob such as debian-* or *")]
    InvalidScope(String),
    #[error("{path}: invalid key policy ({reason})")]
    MalformedPolicy { path: PathBuf, reason: String },
    #[error("key {name:?} is {}; it cannot become {}", from.as_str(), to.as_str())]
    BadTransition {
        name: String,
        from: KeyState,
        to: KeyState,
    },
    #[error("wrong password for secret key {0}")]
    WrongPassword(PathBuf),
    #[error("secret key {0} is encrypted and there is no terminal to ask for its password: set {PASSWORD_ENV}, or use a key made with `minisign -G -W`")]
    NoTerminal(PathBuf),
    #[error("invalid trusted comment {0:?}: it must be a single line")]
    InvalidComment(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SignError + '_ {
    move |source| SignError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A trusted publisher public key: from the catalog (a server's trust store),
/// or from a `<name>.pub` file (a consumer's).
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub name: String,
    /// Upper-case hex, as minisign prints it.
    pub key_id: String,
    /// Where it was read: the `.pub` file's path, or `the catalog`.
    pub origin: String,
    /// Scopes and state (from the catalog, or `<name>.toml` beside a key file).
    pub policy: KeyPolicy,
    /// The public key file's text, normalized.
    text: String,
    key: minisign_verify::PublicKey,
    key_id_bytes: [u8; 8],
}

/// What a trusted key may sign, and its state: a catalog key's, or a key file's
/// `<name>.toml`. A key file without one is active for every image
/// (`scopes = ["*"]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPolicy {
    /// Image-name globs this key may sign publications for.
    pub scopes: Vec<String>,
    pub state: KeyState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy {
            scopes: vec!["*".into()],
            state: KeyState::Active,
            retired_at: None,
            revoked_at: None,
        }
    }
}

impl TrustedKey {
    pub fn public_key(&self) -> &minisign_verify::PublicKey {
        &self.key
    }

    /// The key file's text (`minisign -G` format), for publishing it.
    pub fn public_key_text(&self) -> String {
        self.text.clone()
    }

    /// A key from the text of a `minisign -G` public key file.
    fn from_text(
        name: &str,
        text: &str,
        policy: KeyPolicy,
        origin: String,
    ) -> Result<TrustedKey, String> {
        let (key, id, normalized) = parse_public_key(text)?;
        Ok(TrustedKey {
            name: name.to_string(),
            key_id: key_id_hex(&id),
            origin,
            policy,
            text: normalized,
            key,
            key_id_bytes: id,
        })
    }

    /// Whether this key may sign a new publication of `image`: active, and
    /// one of its scopes matches.
    pub fn may_sign(&self, image: &str) -> Result<(), SignError> {
        match self.policy.state {
            KeyState::Active => {}
            state => {
                return Err(SignError::KeyNotActive {
                    name: self.name.clone(),
                    key_id: self.key_id.clone(),
                    state,
                })
            }
        }
        if self
            .policy
            .scopes
            .iter()
            .any(|g| crate::names::scope_matches(g, image))
        {
            Ok(())
        } else {
            Err(SignError::OutOfScope {
                name: self.name.clone(),
                key_id: self.key_id.clone(),
                image: image.to_string(),
                scopes: self.policy.scopes.join(", "),
            })
        }
    }
}

/// The result of a successful [`verify_signature`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub key_name: String,
    pub key_id: String,
    /// The trusted comment without its `trusted comment: ` prefix.
    pub trusted_comment: String,
}

/// Formats 8 key-id bytes the way minisign prints them (`%PRIX64`: upper
/// hex without leading zeros), so the ids imgsrv shows match the CLI's.
pub fn key_id_hex(keynum: &[u8; 8]) -> String {
    format!("{:X}", u64::from_le_bytes(*keynum))
}

/// The key id of a secret key, as minisign prints it.
pub fn secret_key_id(sk: &minisign::SecretKey) -> String {
    let mut b = [0u8; 8];
    b.copy_from_slice(&sk.keynum()[..8]);
    key_id_hex(&b)
}

/// Whether `name` is a valid trusted-key name.
pub use crate::names::key_name as valid_key_name;

/// Standard base64 with padding, as minisign writes it.
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .filter(|v| !v.is_empty())
}

/// Splits minisign file text into lines (tolerating CRLF) and checks that
/// nothing but blank lines follows the `expected` meaningful ones.
fn split_lines(text: &str, expected: usize) -> Result<Vec<&str>, String> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() < expected {
        return Err(format!("expected {expected} lines, found {}", lines.len()));
    }
    if lines[expected..].iter().any(|l| !l.trim().is_empty()) {
        return Err(format!("unexpected text after line {expected}"));
    }
    Ok(lines[..expected].to_vec())
}

/// Parses the text of a `minisign -G` public key file.
/// Returns the verifier, the key-id bytes and the normalized file text.
fn parse_public_key(text: &str) -> Result<(minisign_verify::PublicKey, [u8; 8], String), String> {
    let lines = split_lines(text, 2)?;
    if !lines[0].starts_with(UNTRUSTED_PREFIX) {
        return Err(format!("line 1 must start with {UNTRUSTED_PREFIX:?}"));
    }
    let b64 = lines[1].trim();
    let raw = b64_decode(b64).ok_or("line 2 is not valid base64")?;
    if raw.len() != 42 {
        return Err(format!(
            "line 2 decodes to {} bytes, a public key has 42",
            raw.len()
        ));
    }
    if raw[0..2] != ALG_LEGACY {
        return Err("unsupported key algorithm (expected Ed25519, \"Ed\")".into());
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&raw[2..10]);
    let key = minisign_verify::PublicKey::from_base64(b64).map_err(|e| e.to_string())?;
    Ok((key, id, format!("{}\n{}\n", lines[0].trim_end(), b64)))
}

/// Verifies a whole `.minisig` text over `message` against the trusted keys.
///
/// Only prehashed (`ED`) signatures are accepted, like `minisign -V -H`:
/// legacy `Ed` signatures sign the raw message, are never produced by current
/// minisign or by [`sign`], and accepting both modes would only widen what
/// an attacker can present. The global signature over the trusted comment is
/// always checked.
pub fn verify_signature(
    keys: &[TrustedKey],
    message: &[u8],
    minisig_text: &str,
) -> Result<Verified, SignError> {
    verify_signed_by(keys, message, minisig_text).map(|(_, v)| v)
}

/// [`verify_signature`], also returning the trusted key that made the
/// signature (for its scopes and state: a valid signature alone does not say
/// the key may sign this image).
pub fn verify_signed_by<'k>(
    keys: &'k [TrustedKey],
    message: &[u8],
    minisig_text: &str,
) -> Result<(&'k TrustedKey, Verified), SignError> {
    let lines = split_lines(minisig_text, 4).map_err(SignError::Malformed)?;
    if !lines[0].starts_with(UNTRUSTED_PREFIX) {
        return Err(SignError::Malformed(format!(
            "line 1 must start with {UNTRUSTED_PREFIX:?}"
        )));
    }
    let raw = b64_decode(lines[1].trim())
        .ok_or_else(|| SignError::Malformed("line 2 is not valid base64".into()))?;
    if raw.len() != 74 {
        return Err(SignError::Malformed(format!(
            "line 2 decodes to {} bytes, a signature has 74",
            raw.len()
        )));
    }
    match [raw[0], raw[1]] {
        ALG_PREHASHED => {}
        ALG_LEGACY => return Err(SignError::LegacySignature),
        _ => {
            return Err(SignError::Malformed(
                "unsupported signature algorithm".into(),
            ))
        }
    }
    if !lines[2].starts_with(TRUSTED_PREFIX) {
        return Err(SignError::Malformed(format!(
            "line 3 must start with {TRUSTED_PREFIX:?}"
        )));
    }
    match b64_decode(lines[3].trim()) {
        Some(g) if g.len() == 64 => {}
        _ => {
            return Err(SignError::Malformed(
                "line 4 is not a base64 global signature of 64 bytes".into(),
            ))
        }
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&raw[2..10]);
    let key = keys
        .iter()
        .find(|k| k.key_id_bytes == id)
        .ok_or_else(|| SignError::UnknownKey(key_id_hex(&id)))?;
    // Re-assemble exactly the 4 lines we validated (CRLF and trailing blank
    // lines removed) for minisign-verify.
    let canonical = format!(
        "{}\n{}\n{}\n{}\n",
        lines[0],
        lines[1].trim(),
        lines[2],
        lines[3].trim()
    );
    let sig = minisign_verify::Signature::decode(&canonical)
        .map_err(|e| SignError::Malformed(e.to_string()))?;
    key.key
        .verify(message, &sig, false)
        .map_err(|_| SignError::BadSignature {
            key_name: key.name.clone(),
            key_id: key.key_id.clone(),
        })?;
    let verified = Verified {
        key_name: key.name.clone(),
        key_id: key.key_id.clone(),
        trusted_comment: sig.trusted_comment().to_string(),
    };
    Ok((key, verified))
}

/// The trusted comment imgsrv puts on a manifest signature.
pub fn manifest_trusted_comment(
    image: &str,
    version: &str,
    manifest: &Digest,
    timestamp: u64,
) -> String {
    format!(
        "imgsrv manifest image={image} version={version} sha256={} timestamp={timestamp}",
        manifest.hex()
    )
}

/// Signs `message` (prehashed, like `minisign -S`), returning the 4-line
/// `.minisig` text.
pub fn sign(
    sk: &minisign::SecretKey,
    message: &[u8],
    trusted_comment: &str,
) -> Result<String, SignError> {
    if trusted_comment.contains(['\n', '\r']) {
        return Err(SignError::InvalidComment(trusted_comment.to_string()));
    }
    let pk =
        minisign::PublicKey::from_secret_key(sk).map_err(|e| SignError::Sign(e.to_string()))?;
    let untrusted = format!("imgsrv signature from minisign key {}", secret_key_id(sk));
    // Passing the public key makes the crate check the global signature it
    // just made: a corrupted secret key fails here rather than at the server.
    let sbox = minisign::sign(
        Some(&pk),
        sk,
        io::Cursor::new(message),
        Some(trusted_comment),
        Some(&untrusted),
    )
    .map_err(|e| SignError::Sign(e.to_string()))?;
    Ok(sbox.into_string())
}

/// Loads a minisign secret key: unencrypted (`minisign -G -W`) or
/// scrypt-encrypted (`minisign -G`). The password of an encrypted key comes
/// from `IMGSRV_KEY_PASSWORD` when set and non-empty, else from a prompt on
/// the controlling terminal (`/dev/tty`); without one, [`SignError::NoTerminal`].
pub fn load_secret_key(path: &Path) -> Result<minisign::SecretKey, SignError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let bad = |reason: &str| SignError::MalformedSecretKey {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let lines = split_lines(&text, 2).map_err(|r| bad(&r))?;
    if !lines[0].starts_with(UNTRUSTED_PREFIX) {
        return Err(bad(&format!("line 1 must start with {UNTRUSTED_PREFIX:?}")));
    }
    let raw = b64_decode(lines[1].trim()).ok_or_else(|| bad("line 2 is not valid base64"))?;
    if raw.len() != SECRET_KEY_LEN {
        return Err(bad(&format!(
            "line 2 decodes to {} bytes, a secret key has {SECRET_KEY_LEN}",
            raw.len()
        )));
    }
    if raw[0..2] != ALG_LEGACY {
        return Err(bad("unsupported signature algorithm (expected \"Ed\")"));
    }
    if raw[4..6] != CHK_BLAKE2B {
        return Err(bad("unsupported checksum algorithm (expected \"B2\")"));
    }
    let sk = match [raw[2], raw[3]] {
        KDF_NONE => {
            let chk = &raw[SECRET_KEY_LEN - 32..];
            if chk.iter().any(|&b| b != 0) {
                // A checksum is present: let the crate verify it (with an
                // empty password it skips decryption and only checks it).
                let skbox =
                    minisign::SecretKeyBox::from_string(&text).map_err(|e| bad(&e.to_string()))?;
                minisign::SecretKey::from_box(skbox, Some(String::new()))
                    .map_err(|_| bad("checksum mismatch: the file is corrupted"))?
            } else {
                // minisign -G -W writes an all-zero checksum, which the
                // crate's from_box would reject: build the key from its bytes.
                minisign::SecretKey::from_bytes(&raw).map_err(|e| bad(&e.to_string()))?
            }
        }
        KDF_SCRYPT => {
            let memlimit = u64::from_le_bytes(raw[46..54].try_into().unwrap_or_default());
            if memlimit > SCRYPT_MEMLIMIT_MAX {
                return Err(bad("scrypt memory limit above 1 GiB"));
            }
            let password = match std::env::var(PASSWORD_ENV) {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    prompt_password(&format!("Password for {}: ", path.display())).map_err(|e| {
                        if e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENXIO)
                        {
                            SignError::NoTerminal(path.to_path_buf())
                        } else {
                            io_err(Path::new("/dev/tty"))(e)
                        }
                    })?
                }
            };
            if password.is_empty() {
                return Err(SignError::WrongPassword(path.to_path_buf()));
            }
            let skbox =
                minisign::SecretKeyBox::from_string(&text).map_err(|e| bad(&e.to_string()))?;
            minisign::SecretKey::from_box(skbox, Some(password)).map_err(|e| {
                let msg = e.to_string();
                if msg.contains("Wrong password") {
                    SignError::WrongPassword(path.to_path_buf())
                } else {
                    bad(&msg)
                }
            })?
        }
        _ => return Err(bad("unsupported key derivation function")),
    };
    // Self-test: the Ed25519 seed must match the public half embedded in the
    // key (an unencrypted key has no checksum to catch corruption).
    sign(&sk, b"imgsrv key self-test", "self-test").map_err(|_| {
        bad("the key is inconsistent (its signature does not verify with its own public key)")
    })?;
    Ok(sk)
}

/// Reads a line from the controlling terminal with echo turned off.
/// Fails with `NotFound`/`ENXIO` when there is no terminal.
fn prompt_password(prompt: &str) -> io::Result<String> {
    use std::os::fd::AsRawFd;

    let mut tty = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    {
        Ok(t) => t,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) || e.kind() == io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no controlling terminal",
            ))
        }
        Err(e) => return Err(e),
    };
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut term) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "/dev/tty is not a terminal",
        ));
    }
    struct Restore(i32, libc::termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores attributes read from the same fd.
            unsafe { libc::tcsetattr(self.0, libc::TCSANOW, &self.1) };
        }
    }
    let restore = Restore(fd, term);
    let mut quiet = term;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: valid fd and termios value.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
        return Err(io::Error::last_os_error());
    }
    tty.write_all(prompt.as_bytes())?;
    tty.flush()?;
    let mut line = String::new();
    io::BufReader::new(&tty).read_line(&mut line)?;
    drop(restore);
    while line.ends_with(['\n', '\r']) {
        line.pop();
    }
    Ok(line)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Generates a key pair with the real minisign CLI. With a password the
    /// key is encrypted (minisign reads it twice from stdin when not a tty).
    pub(crate) fn minisign_keygen(
        dir: &Path,
        stem: &str,
        password: Option<&str>,
    ) -> (PathBuf, PathBuf) {
        let pk = dir.join(format!("{stem}.pub"));
        let sk = dir.join(format!("{stem}.key"));
        let mut cmd = Command::new("minisign");
        cmd.arg("-G").arg("-p").arg(&pk).arg("-s").arg(&sk);
        if password.is_none() {
            cmd.arg("-W");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run minisign");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(p) = password {
            write!(stdin, "{p}\n{p}\n").unwrap();
        }
        drop(stdin);
        assert!(child.wait().unwrap().success(), "minisign -G failed");
        (pk, sk)
    }

    fn minisign_verify_cli(pk: &Path, file: &Path, sig: &Path, prehashed_only: bool) -> bool {
        let mut cmd = Command::new("minisign");
        cmd.arg("-V")
            .arg("-p")
            .arg(pk)
            .arg("-m")
            .arg(file)
            .arg("-x")
            .arg(sig);
        if prehashed_only {
            cmd.arg("-H");
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn minisign_sign_cli(sk: &Path, file: &Path, legacy: bool, tc: &str) -> String {
        let mut cmd = Command::new("minisign");
        cmd.arg("-S")
            .arg("-s")
            .arg(sk)
            .arg("-m")
            .arg(file)
            .arg("-t")
            .arg(tc);
        if legacy {
            cmd.arg("-l");
        }
        let st = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        fs::read_to_string(format!("{}.minisig", file.display())).unwrap()
    }

    #[test]
    fn base64_is_strict() {
        assert_eq!(b64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(b64_decode("aGVsbG8h").unwrap(), b"hello!");
        for bad in ["", "aGk", "aG=k", "a===", "aGk=aGk=", "aG k"] {
            assert!(b64_decode(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn key_names() {
        for ok in ["a", "Alice.2024_x-y", &"k".repeat(64)] {
            assert!(valid_key_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a b", "a/b", &"k".repeat(65)] {
            assert!(!valid_key_name(bad), "{bad}");
        }
    }

    /// A fresh catalog in `dir` trusting `pk`: its keys.
    fn trusting(dir: &Path, pk: &Path) -> Vec<TrustedKey> {
        let cat = crate::catalog::SqliteCatalog::open(&dir.join("catalog.db")).unwrap();
        add_trusted_key(&cat, None, pk, &[]).unwrap();
        load_trusted_keys(&cat).unwrap()
    }

    #[test]
    fn sign_verifies_with_minisign_cli_and_verify_signature() {
        let t = tempfile::tempdir().unwrap();
        let (pk, skp) = minisign_keygen(t.path(), "pub1", None);
        let sk = load_secret_key(&skp).unwrap();
        let keys = trusting(t.path(), &pk);
        let key = keys[0].clone();
        assert_eq!(secret_key_id(&sk), key.key_id);

        let msg = br#"{"image":"debian","schema":"imgsrv.manifest.v1"}"#;
        let tc = manifest_trusted_comment("debian", "1", &Digest::of(msg), 1_700_000_000);
        let sig = sign(&sk, msg, &tc).unwrap();
        assert_eq!(sig.lines().count(), 4);
        let file = t.path().join("manifest.json");
        fs::write(&file, msg).unwrap();
        let sigf = t.path().join("manifest.json.minisig");
        fs::write(&sigf, &sig).unwrap();
        assert!(minisign_verify_cli(&pk, &file, &sigf, false));
        assert!(minisign_verify_cli(&pk, &file, &sigf, true));
        // The CLI notices a changed file (the check above can fail).
        fs::write(&file, b"other").unwrap();
        assert!(!minisign_verify_cli(&pk, &file, &sigf, false));

        let v = verify_signature(&keys, msg, &sig).unwrap();
        assert_eq!(v.key_name, "pub1");
        assert_eq!(v.key_id, key.key_id);
        assert_eq!(v.trusted_comment, tc);
        assert!(tc.contains(&format!("sha256={}", Digest::of(msg).hex())));

        // Wrong message, tampered trusted comment, unknown key.
        assert!(matches!(
            verify_signature(&keys, b"x", &sig),
            Err(SignError::BadSignature { .. })
        ));
        let tampered = sig.replace("image=debian", "image=evil");
        assert!(matches!(
            verify_signature(&keys, msg, &tampered),
            Err(SignError::BadSignature { .. })
        ));
        let (_, other_sk) = minisign_keygen(t.path(), "other", None);
        let other = load_secret_key(&other_sk).unwrap();
        let sig2 = sign(&other, msg, "x").unwrap();
        match verify_signature(&keys, msg, &sig2) {
            Err(SignError::UnknownKey(id)) => assert_eq!(id, secret_key_id(&other)),
            r => panic!("expected UnknownKey, got {r:?}"),
        }
        assert!(sign(&sk, msg, "two\nlines").is_err());
    }

    #[test]
    fn verify_accepts_cli_signatures_and_refuses_legacy_and_malformed() {
        let t = tempfile::tempdir().unwrap();
        let (pk, skp) = minisign_keygen(t.path(), "cli", None);
        let keys = trusting(t.path(), &pk);
        let file = t.path().join("m");
        fs::write(&file, b"manifest bytes").unwrap();

        let sig = minisign_sign_cli(&skp, &file, false, "hello comment");
        let v = verify_signature(&keys, b"manifest bytes", &sig).unwrap();
        assert_eq!(v.trusted_comment, "hello comment");
        // CRLF line endings are tolerated.
        assert!(verify_signature(&keys, b"manifest bytes", &sig.replace('\n', "\r\n")).is_ok());

        let legacy = minisign_sign_cli(&skp, &file, true, "legacy");
        assert!(matches!(
            verify_signature(&keys, b"manifest bytes", &legacy),
            Err(SignError::LegacySignature)
        ));

        let no_prefix = sig.replacen("untrusted comment: ", "comment: ", 1);
        assert!(matches!(
            verify_signature(&keys, b"manifest bytes", &no_prefix),
            Err(SignError::Malformed(_))
        ));
        let mut lines: Vec<&str> = sig.lines().collect();
        lines.truncate(3);
        assert!(matches!(
            verify_signature(&keys, b"manifest bytes", &lines.join("\n")),
            Err(SignError::Malformed(_))
        ));
        assert!(matches!(
            verify_signature(&keys, b"manifest bytes", &format!("{sig}extra\n")),
            Err(SignError::Malformed(_))
        ));
        assert!(matches!(
            verify_signature(&keys, b"manifest bytes", "garbage"),
            Err(SignError::Malformed(_))
        ));
    }

    #[test]
    fn encrypted_key_with_password_from_env() {
        let t = tempfile::tempdir().unwrap();
        let (pk, skp) = minisign_keygen(t.path(), "enc", Some("s3cret pass"));
        let raw = b64_decode(fs::read_to_string(&skp).unwrap().lines().nth(1).unwrap()).unwrap();
        assert_eq!(&raw[2..4], b"Sc", "minisign -G did not encrypt the key");

        // Env var is process-wide: this is the only test that sets it.
        std::env::set_var(PASSWORD_ENV, "wrong");
        let e = load_secret_key(&skp).unwrap_err();
        assert!(matches!(e, SignError::WrongPassword(_)), "{e}");
        std::env::set_var(PASSWORD_ENV, "s3cret pass");
        let sk = load_secret_key(&skp);
        std::env::remove_var(PASSWORD_ENV);
        let sk = sk.unwrap();

        let sig = sign(&sk, b"m", "c").unwrap();
        let v = verify_signature(&trusting(t.path(), &pk), b"m", &sig).unwrap();
        assert_eq!(v.key_name, "enc");
    }

    #[test]
    fn encrypted_key_without_password_or_terminal() {
        // Run in a child without a controlling terminal (setsid) so the
        // prompt cannot open /dev/tty.
        if std::env::var("IMGSRV_TEST_NO_TTY_CHILD").is_ok() {
            let p = PathBuf::from(std::env::var("IMGSRV_TEST_KEY").unwrap());
            let e = load_secret_key(&p).unwrap_err();
            assert!(matches!(e, SignError::NoTerminal(_)), "{e}");
            assert!(e.to_string().contains(PASSWORD_ENV));
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (_, skp) = minisign_keygen(t.path(), "enc2", Some("pw"));
        let exe = std::env::current_exe().unwrap();
        let st = Command::new("setsid")
            .arg("-w")
            .arg(exe)
            .args([
                "--exact",
                "sign::tests::encrypted_key_without_password_or_terminal",
                "--nocapture",
            ])
            .env("IMGSRV_TEST_NO_TTY_CHILD", "1")
            .env("IMGSRV_TEST_KEY", &skp)
            .env_remove(PASSWORD_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&st.stdout);
        assert!(st.status.success(), "child failed: {out}");
        assert!(out.contains("1 passed"), "child ran no test: {out}");
    }

    #[test]
    fn corrupted_unencrypted_key_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (_, skp) = minisign_keygen(t.path(), "c", None);
        let text = fs::read_to_string(&skp).unwrap();
        let mut raw = b64_decode(text.lines().nth(1).unwrap()).unwrap();
        raw[70] ^= 1; // inside the Ed25519 seed (bytes 62..94)
        let corrupted = minisign::SecretKey::from_bytes(&raw)
            .unwrap()
            .to_box(None)
            .unwrap();
        fs::write(&skp, corrupted.into_string()).unwrap();
        let e = load_secret_key(&skp).unwrap_err();
        assert!(matches!(e, SignError::MalformedSecretKey { .. }), "{e}");
        // A public key given as secret key.
        let (pk, _) = minisign_keygen(t.path(), "d", None);
        assert!(load_secret_key(&pk).is_err());
    }
}
