//! The application: configuration, catalog, blob store and the Simple Streams
//! cache, built once at start and shared by every request thread. Domain
//! operations that span the catalog and the store (ingest, publish) live here
//! so that the HTTP layer stays a thin translation.

use crate::cas::{BlobStore, FsStore};
use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{Config, VerificationMode};
use crate::simplestreams::StreamsCache;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CATALOG_FILE: &str = "catalog.db";

pub struct App {
    pub config: Config,
    pub catalog: Arc<dyn Catalog>,
    pub blobs: Arc<dyn BlobStore>,
    pub streams: StreamsCache,
    pub auth_failures: crate::auth::FailureThrottle,
}

/// What `init` made (for printing).
#[derive(Debug, Default)]
pub struct InitReport {
    pub created: Vec<PathBuf>,
    pub bootstrap_principal: Option<String>,
}

/// Creates the data directory layout if missing: config, catalog, CAS, TLS
/// certificate, bootstrap token. Idempotent.
pub fn init(data_dir: &Path, extra_names: &[String]) -> anyhow::Result<(Config, InitReport)> {
    use std::os::unix::fs::PermissionsExt;
    let mut report = InitReport::default();
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o750))?;
        report.created.push(data_dir.to_path_buf());
    }
    let cfg_path = Config::path(data_dir);
    if !cfg_path.exists() {
        crate::auth::write_secret_file(&cfg_path, &crate::config::default_file())?;
        std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o640))?;
        report.created.push(cfg_path);
    }
    let config = Config::load(data_dir, None)?;
    let db = data_dir.join(CATALOG_FILE);
    if !db.exists() {
        report.created.push(db.clone());
    }
    let catalog =
        SqliteCatalog::open(&db).with_context(|| format!("opening catalog {}", db.display()))?;
    let cas_dir = data_dir.join("sha256");
    if !cas_dir.exists() {
        report.created.push(cas_dir);
    }
    FsStore::open(data_dir).context("opening the blob store")?;
    let keys = data_dir.join("keys");
    if !keys.exists() {
        std::fs::create_dir_all(&keys)?;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))?;
        report.created.push(keys);
    }
    if !config.tls_configured {
        let mut names = config.tls_names.clone();
        names.extend(extra_names.iter().cloned());
        let (cert, key, created) = crate::tls::ensure_self_signed(&data_dir.join("tls"), &names)?;
        if created {
            report.created.push(cert);
            report.created.push(key);
        }
    }
    if let Some(p) = crate::auth::bootstrap(&catalog, data_dir)? {
        report
            .created
            .push(data_dir.join(crate::auth::ADMIN_TOKEN_FILE));
        report.bootstrap_principal = Some(p.id);
    }
    Ok((config, report))
}

impl App {
    /// Opens an initialised data directory with `config`.
    pub fn open(config: Config) -> anyhow::Result<App> {
        let db = config.data_dir.join(CATALOG_FILE);
        let catalog = SqliteCatalog::open(&db)
            .with_context(|| format!("opening catalog {}", db.display()))?;
        let blobs = FsStore::open(&config.data_dir).context("opening the blob store")?;
        Ok(App {
            config,
            catalog: Arc::new(catalog),
            blobs: Arc::new(blobs),
            streams: StreamsCache::default(),
            auth_failures: Default::default(),
        })
    }

    pub fn verification(&self) -> VerificationMode {
        self.config.verification
    }
}
