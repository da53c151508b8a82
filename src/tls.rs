//! TLS certificates and rustls configuration.
//!
//! * [`ensure_self_signed`] creates a self-signed ECDSA P-256 leaf certificate on first
//!   start so the server is usable over HTTPS without any setup.
//! * [`server_config`] turns PEM files into the `rustls::ServerConfig` the connection
//!   engine ([`crate::http::server`]) terminates TLS with.
//! * [`client_config`] builds a `rustls::ClientConfig` trusting given PEM certificates
//!   (tests and the CLI's `--ca`) or the system bundle.
//! * [`pinned`]: the client commands' `--ca CERT`: a certificate given explicitly is
//!   trusted as that certificate (a self-signed CA:TRUE one too).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

pub mod pinned;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Name of the certificate file inside the directory given to [`ensure_self_signed`].
pub const CERT_FILE: &str = "cert.pem";
/// Name of the private key file inside the directory given to [`ensure_self_signed`].
pub const KEY_FILE: &str = "key.pem";

/// Validity of a generated certificate (about ten years).
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600 + 2 * 24 * 3600);

/// Creates DIR/cert.pem + DIR/key.pem (key mode 0600, dir 0700) if either is missing: a
/// self-signed ECDSA P-256 leaf certificate (not a CA: webpki rejects a CA certificate used
/// as an end entity), valid about ten years from one day ago, with the SANs `localhost`,
/// `127.0.0.1`, `::1`, the host name, plus `extra_names` (each an IP address if it parses
/// as one, else a DNS name). Returns `(cert_path, key_path, created)`. Idempotent: when
/// both files exist nothing is written and `created` is false.
///
/// Both files are written atomically (temporary file + rename) so a crash never leaves a
/// half-written key behind; the key is written first, so a crash between the two renames
/// leaves the certificate missing and the next call regenerates both.
pub fn ensure_self_signed(
    dir: &Path,
    extra_names: &[String],
) -> anyhow::Result<(PathBuf, PathBuf, bool)> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if cert_path.is_file() && key_path.is_file() {
        return Ok((cert_path, key_path, false));
    }
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating certificate directory {}", dir.display()))?;
    }

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Some(host) = host_name() {
        names.push(host);
    }
    names.extend(extra_names.iter().map(|n| n.trim().to_string()));
    let mut sans: Vec<rcgen::SanType> = Vec::new();
    for name in names.iter().filter(|n| !n.is_empty()) {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|e| anyhow!("invalid certificate name {name:?}: {e}"))?,
            ),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating ECDSA P-256 key")?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "imgsrv self-signed");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?;
    let not_before = now.saturating_sub(Duration::from_secs(24 * 3600));
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + not_before;
    params.not_after = epoch + not_before + VALIDITY;
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| anyhow!("random serial number: {e}"))?;
    serial[0] &= 0x7f; // positive
    serial[0] |= 0x01; // and without a leading zero byte
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params
        .self_signed(&key)
        .context("self-signing certificate")?;

    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", key_path.display()))?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path, true))
}

/// Writes `data` to a temporary file next to `path` with `mode`, syncs it and renames it
/// over `path`, then syncs the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile creates the file with mode 0600, so the key is never readable by others.
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The machine's host name (gethostname, falling back to /proc/sys/kernel/hostname).
pub(crate) fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success
    // unless truncated, which we handle by searching for NUL within the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        fs::read_to_string("/proc/sys/kernel/hostname").ok()?
    };
    let name = name.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && name != "localhost"
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then_some(name)
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let data =
        fs::read(path).with_context(|| format!("reading certificate file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing PEM certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} contains no PEM certificate", path.display());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let data =
        fs::read(path).with_context(|| format!("reading private key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .with_context(|| format!("parsing PEM private key in {}", path.display()))?
        .ok_or_else(|| anyhow!("{} contains no PEM private key", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls server configuration from PEM files: TLS 1.3 and 1.2 with the ring provider,
/// ALPN `http/1.1`, session resumption through stateless tickets (TLS 1.3 and 1.2) and
/// the in-memory session cache.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(cert_pem)?;
    let key = load_key(key_pem)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("selecting TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "certificate {} does not match private key {} (or is unsupported)",
                cert_pem.display(),
                key_pem.display()
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().context("creating TLS ticketer")?;
    Ok(Arc::new(cfg))
}

/// Default CA bundle used by [`client_config`] without `ca` and without `SSL_CERT_FILE`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// rustls client configuration trusting only the PEM certificates in `ca` (used by tests
/// and the CLI's `--ca`). With `None`, the bundle named by `SSL_CERT_FILE` if set, else
/// [`SYSTEM_CA_BUNDLE`].
pub fn client_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let path: PathBuf = match ca {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("SSL_CERT_FILE") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(SYSTEM_CA_BUNDLE),
        },
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut added = 0usize;
    for cert in load_certs(&path)? {
        // A bundle may hold certificates webpki cannot use as anchors; skip those.
        if roots.add(cert).is_ok() {
            added += 1;
        }
    }
    if added == 0 {
        bail!("{} contains no usable CA certificate", path.display());
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("selecting TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The certificate a server presents, as loaded at its start: what the web catalog
/// shows and offers for download (`/tls/cert.pem`).
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// The `CERTIFICATE` blocks of the file, re-encoded: never anything else the file
    /// may hold (a private key kept in the same file).
    pub pem: String,
    /// SHA-256 of the leaf certificate's DER bytes.
    pub sha256: [u8; 32],
}

impl ServedCert {
    /// Reads the certificates of the PEM file `path` (the leaf first, as served).
    pub fn load(path: &Path) -> anyhow::Result<ServedCert> {
        use sha2::Digest as _;
        let data = fs::read(path)
            .with_context(|| format!("reading certificate file {}", path.display()))?;
        let certs: Vec<pem::Pem> = pem::parse_many(&data)
            .with_context(|| format!("parsing PEM in {}", path.display()))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .collect();
        let leaf = certs
            .first()
            .ok_or_else(|| anyhow!("{} contains no PEM certificate", path.display()))?;
        let sha256 = sha2::Sha256::digest(leaf.contents()).into();
        let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        Ok(ServedCert {
            pem: pem::encode_many_config(&certs, lf),
            sha256,
        })
    }

    /// `AB:CD:…`, as `openssl x509 -noout -fingerprint -sha256` prints it.
    pub fn fingerprint_colons(&self) -> String {
        let hex: Vec<String> = self.sha256.iter().map(|b| format!("{b:02X}")).collect();
        hex.join(":")
    }

    /// Lower-case hex without separators, as `incus remote add` shows it.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}
