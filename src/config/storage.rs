//! `[storage]`: which backends hold the catalog and the blobs.
//!
//! ```toml
//! [storage]
//! catalog = "postgres"          # default "sqlite" (DATA_DIR/catalog.db)
//! postgres_url = "postgresql://imgsrv@127.0.0.1:5432/imgsrv"
//! blobs = "s3"                  # default "fs" (DATA_DIR/sha256/...)
//! [storage.s3]
//! endpoint = "http://127.0.0.1:3900"
//! bucket = "imgsrv"
//! region = "garage"
//! access_key_id = "GK..."
//! secret_access_key_file = "/etc/imgsrv/s3.secret"   # or IMGSRV_S3_SECRET_ACCESS_KEY
//! path_style = true
//! ca_file = "/etc/imgsrv/s3-ca.pem"                  # optional: a private CA
//! ```
//!
//! Only what is written here is checked when the file is read (names, required
//! keys, the secret's source); whether this build has a backend is told when the
//! stores are opened (`catalog::open`, `cas::open`), with what to build instead.
//! The PostgreSQL URL may carry a password (keep the file mode 0640, as `imgsrv
//! init` writes it), or take it from `PGPASSWORD`'s usual place outside the URL:
//! `IMGSRV_POSTGRES_URL` replaces the file's URL when set.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the S3 secret comes from when the file names no `secret_access_key_file`.
pub const S3_SECRET_ENV: &str = "IMGSRV_S3_SECRET_ACCESS_KEY";
/// Replaces `[storage] postgres_url` when set (a URL with a password kept out of
/// the file).
pub const POSTGRES_URL_ENV: &str = "IMGSRV_POSTGRES_URL";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    catalog: Option<String>,
    postgres_url: Option<String>,
    blobs: Option<String>,
    s3: Option<RawS3>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    endpoint: String,
    bucket: String,
    region: Option<String>,
    access_key_id: String,
    secret_access_key_file: Option<PathBuf>,
    #[serde(default)]
    path_style: bool,
    ca_file: Option<PathBuf>,
}

/// The backends, as the configuration names them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageConfig {
    pub catalog: CatalogBackend,
    pub blobs: BlobBackend,
}

#[derive(Clone, PartialEq, Eq, Default)]
pub enum CatalogBackend {
    /// `DATA_DIR/catalog.db`, the embedded default.
    #[default]
    Sqlite,
    Postgres {
        url: String,
    },
}

impl std::fmt::Debug for CatalogBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CatalogBackend::Sqlite => f.write_str("Sqlite"),
            // the URL may hold a password
            CatalogBackend::Postgres { url } => write!(f, "Postgres({})", redact_url(url)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BlobBackend {
    /// `DATA_DIR/sha256/...`, the embedded default.
    #[default]
    Fs,
    S3(S3Settings),
}

/// `[storage.s3]`, its secret read.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub path_style: bool,
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `postgresql://user:secret@host/db` → `postgresql://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((auth, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl StorageConfig {
    /// The instance's stores are shared with others (a database and a bucket
    /// several instances use), rather than files in its data directory.
    pub fn is_embedded(&self) -> bool {
        self.catalog == CatalogBackend::Sqlite && self.blobs == BlobBackend::Fs
    }

    pub(super) fn parse(raw: RawStorage, data_dir: &Path) -> anyhow::Result<StorageConfig> {
        let catalog = match raw.catalog.as_deref().unwrap_or("sqlite") {
            "sqlite" => {
                if raw.postgres_url.is_some() {
                    bail!(
                        "[storage] postgres_url is set but catalog is \"sqlite\": add catalog = \
                         \"postgres\" to use it, or remove it"
                    );
                }
                CatalogBackend::Sqlite
            }
            "postgres" => {
                let url = std::env::var(POSTGRES_URL_ENV)
                    .ok()
                    .filter(|u| !u.trim().is_empty())
                    .or(raw.postgres_url)
                    .with_context(|| {
                        format!(
                            "[storage] catalog = \"postgres\" needs postgres_url = \
                             \"postgresql://USER@HOST:5432/DB\" (or {POSTGRES_URL_ENV} in the \
                             environment)"
                        )
                    })?;
                if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
                    bail!(
                        "[storage] postgres_url {:?} is not a postgresql:// URL (e.g. \
                         postgresql://imgsrv@127.0.0.1:5432/imgsrv)",
                        redact_url(&url)
                    );
                }
                CatalogBackend::Postgres { url }
            }
            other => bail!("[storage] catalog = {other:?} is not one of \"sqlite\", \"postgres\""),
        };
        let blobs = match raw.blobs.as_deref().unwrap_or("fs") {
            "fs" => {
                if raw.s3.is_some() {
                    bail!(
                        "[storage.s3] is set but blobs is \"fs\": add blobs = \"s3\" to [storage] \
                         to use it, or remove the section"
                    );
                }
                BlobBackend::Fs
            }
            "s3" => {
                let s3 = raw.s3.context(
                    "[storage] blobs = \"s3\" needs a [storage.s3] section (endpoint, bucket, \
                     region, access_key_id, secret_access_key_file)",
                )?;
                BlobBackend::S3(s3_settings(s3, data_dir)?)
            }
            other => bail!("[storage] blobs = {other:?} is not one of \"fs\", \"s3\""),
        };
        Ok(StorageConfig { catalog, blobs })
    }
}

fn s3_settings(raw: RawS3, data_dir: &Path) -> anyhow::Result<S3Settings> {
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { data_dir.join(p) };
    if !(raw.endpoint.starts_with("http://") || raw.endpoint.starts_with("https://")) {
        bail!(
            "[storage.s3] endpoint {:?} is not an http:// or https:// URL (e.g. \
             http://127.0.0.1:3900 for Garage)",
            raw.endpoint
        );
    }
    if raw.bucket.is_empty() || raw.access_key_id.is_empty() {
        bail!("[storage.s3] bucket and access_key_id must not be empty");
    }
    let secret = match raw.secret_access_key_file {
        Some(p) => {
            let p = resolve(p);
            let s = std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "[storage.s3] secret_access_key_file: cannot read {} (write the S3 secret \
                     key there, mode 0600)",
                    p.display()
                )
            })?;
            s.trim().to_string()
        }
        None => std::env::var(S3_SECRET_ENV)
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    if secret.is_empty() {
        bail!(
            "[storage.s3] has no secret key: set secret_access_key_file = \"/etc/imgsrv/s3.secret\" \
             (a file holding it) or {S3_SECRET_ENV} in the environment"
        );
    }
    Ok(S3Settings {
        endpoint: raw.endpoint.trim_end_matches('/').to_string(),
        bucket: raw.bucket,
        region: raw.region.unwrap_or_else(|| "garage".into()),
        access_key_id: raw.access_key_id,
        secret_access_key: secret,
        path_style: raw.path_style,
        ca_file: raw.ca_file.map(resolve),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<StorageConfig> {
        let raw: RawStorage = toml::from_str(text)?;
        StorageConfig::parse(raw, Path::new("/data"))
    }

    #[test]
    fn defaults_are_the_embedded_stores() {
        let s = parse("").unwrap();
        assert_eq!(s, StorageConfig::default());
        assert!(s.is_embedded());
    }

    #[test]
    fn full_deployment_reads_and_redacts_its_secrets() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("s3.secret");
        std::fs::write(&secret, "very-secret\n").unwrap();
        let s = parse(&format!(
            "catalog = \"postgres\"\npostgres_url = \"postgresql://imgsrv:pw@db:5432/imgsrv\"\n\
             blobs = \"s3\"\n[s3]\nendpoint = \"http://127.0.0.1:3900/\"\nbucket = \"imgsrv\"\n\
             access_key_id = \"GK1\"\nsecret_access_key_file = \"{}\"\npath_style = true\n",
            secret.display()
        ))
        .unwrap();
        let BlobBackend::S3(s3) = &s.blobs else {
            panic!("not s3")
        };
        assert_eq!(s3.secret_access_key, "very-secret");
        assert_eq!(s3.endpoint, "http://127.0.0.1:3900");
        assert_eq!(s3.region, "garage");
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(!s.is_embedded());
    }

    #[test]
    fn mistakes_say_what_to_write() {
        for (text, says) in [
            ("catalog = \"mysql\"", "not one of \"sqlite\", \"postgres\""),
            ("catalog = \"postgres\"", "needs postgres_url"),
            ("postgres_url = \"postgresql://x/y\"", "add catalog = \"postgres\""),
            ("catalog = \"postgres\"\npostgres_url = \"mysql://x\"", "not a postgresql:// URL"),
            ("blobs = \"s3\"", "needs a [storage.s3] section"),
            ("blobs = \"disk\"", "not one of \"fs\", \"s3\""),
            (
                "[s3]\nendpoint = \"http://h\"\nbucket = \"b\"\naccess_key_id = \"k\"",
                "add blobs = \"s3\"",
            ),
            (
                "blobs = \"s3\"\n[s3]\nendpoint = \"h:3900\"\nbucket = \"b\"\naccess_key_id = \"k\"",
                "not an http:// or https:// URL",
            ),
            (
                "blobs = \"s3\"\n[s3]\nendpoint = \"http://h\"\nbucket = \"b\"\naccess_key_id = \
                 \"k\"\nsecret_access_key_file = \"/nonexistent/s3.secret\"",
                "cannot read /nonexistent/s3.secret",
            ),
            ("catalogue = \"sqlite\"", "unknown field"),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
