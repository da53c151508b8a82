//! Command line: argument definitions and dispatch. Exit codes: 0 success,
//! 1 the operation failed (refused, verification failed, server error),
//! 2 it could not run (bad usage, unreadable input).

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "imgsrv",
    version,
    about = "Self-hosted image server for Incus: signed, content-addressed, one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a data directory: config, catalog, blob store, TLS certificate, admin token.
    Init {
        #[command(flatten)]
        data: DataArg,
        /// Extra host name or IP for the generated certificate (repeatable).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
    /// Serve HTTPS (bootstraps the data directory on first use).
    Serve {
        #[command(flatten)]
        data: DataArg,
        /// Listen address IP:PORT, e.g. 0.0.0.0:8443 or [::]:8443 (default: the config
        /// file's, else 0.0.0.0:8443).
        #[arg(long, value_name = "ADDR", env = "IMGSRV_LISTEN", value_parser = listen_arg)]
        listen: Option<String>,
        /// Metrics listen address, e.g. 127.0.0.1:9464, or "" for none (default: the
        /// config file's metrics_listen, else 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR", env = "IMGSRV_METRICS_LISTEN")]
        metrics_listen: Option<String>,
    },
    /// Manage trusted publisher keys (minisign public keys) in the server's catalog.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Upload, sign and publish an Incus image (metadata tarball + rootfs and/or disk).
    Publish(PublishArgs),
    /// Move or remove an alias.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Delete a draft version, or retire a published one.
    #[command(subcommand)]
    Version(VersionCommand),
    /// Garbage collection on a data directory (safe beside a running
    /// server): applies the retention policy, collects retired versions past
    /// the grace, removes expired uploads, crash leftovers and blobs nothing
    /// refers to. Prints the plan first; --dry-run stops there.
    Gc(GcArgs),
    /// Manage principals (who may authenticate) on the server's data directory.
    #[command(subcommand)]
    Principal(PrincipalCommand),
    /// Grant or remove a role on an image-name glob (the identity matrix).
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Issue or revoke API tokens on the server's data directory.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the identity matrix.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Show the scheduled mirror jobs ([[mirror]] in imgsrv.toml) and their last runs.
    Mirrors {
        #[command(flatten)]
        data: DataArg,
    },
    /// Read the audit log (append-only) of the server's data directory.
    Audit(AuditArgs),
    /// Change an image on a server.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List the published images, one row per artifact: image, version, os, release,
    /// variant, architecture, type, fingerprint, size, date, aliases (drafts too, for a
    /// writer of the image).
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Only this image.
        image: Option<String>,
        /// table (the Incus tools' layout; fingerprints cut to 12 digits), json or csv
        /// (full fingerprints, sizes in bytes, RFC 3339 times).
        #[arg(long, value_enum, default_value_t = FormatArg::Table)]
        format: FormatArg,
    },
    /// Check a published image against the public keys you trust (nothing is kept).
    /// Exit 0 verified, 1 verification failed, 2 could not run.
    Verify(VerifyArgs),
    /// Verify an image, then write it into --out DIR for `incus image import`.
    /// Exit 0 verified, 1 verification failed (nothing kept), 2 could not run.
    Pull(PullArgs),
    /// Mirror images from an upstream Simple Streams server (images.linuxcontainers.org,
    /// an incus-simplestreams tree, another imgsrv) into a server or a data directory.
    /// Exit 0 all mirrored, 1 something failed, 2 could not run.
    Mirror(crate::mirror::command::MirrorArgs),
    /// Copy the published versions of another imgsrv, keeping the publisher's
    /// manifests and signatures (the target verifies them with its own keys).
    /// Exit 0 done, 1 some version refused or failed, 2 could not run.
    MirrorImgsrv(crate::replicate::MirrorImgsrvArgs),
    /// Write published versions into a bundle file (a tar) for an air-gapped site.
    Export(crate::bundle::ExportArgs),
    /// Verify a bundle completely, then publish its versions.
    /// Exit 0 imported, 1 refused (nothing published) or failed, 2 could not run.
    Import(crate::bundle::ImportArgs),
    /// Back up a data directory into DEST while it is served: a catalog snapshot,
    /// the blobs it cites (only new ones into an earlier backup), config, keys, TLS.
    /// Exit 0 complete, 1 failed (nothing in DEST says it is a newer backup than before).
    Backup(BackupArgs),
    /// Restore a backup into a new data directory, checking the catalog, every
    /// blob and every signature before the directory is usable.
    /// Exit 0 restored, 1 refused or failed (the directory is then not usable).
    Restore(RestoreArgs),
    /// Copy an appliance (a data directory's SQLite catalog and blob files) into the
    /// PostgreSQL + S3 deployment an imgsrv.toml names: the same ids, fingerprints,
    /// manifests and signatures, every blob and signature checked on the far side.
    /// Prints the plan, then copies (--dry-run: stops after the plan). Resumable: run
    /// it again after an interruption. The appliance must not be served meanwhile.
    /// Exit 0 complete (or nothing to do), 1 refused or failed (the problems listed;
    /// run it again once they are repaired).
    Migrate(MigrateArgs),
    /// The server's transparency log (every publication, retirement and publisher key
    /// change, in a Merkle tree whose checkpoints the log's key signs).
    #[command(subcommand)]
    Log(LogCommand),
    /// This server as a witness of other imgsrv logs (C2SP tlog-witness): it cosigns a
    /// log's checkpoint only when it extends every one of that log it cosigned before.
    #[command(subcommand)]
    Witness(WitnessCommand),
    /// Re-hash the blob store, check every version's blobs and every publication's
    /// manifest and signature; move damaged blobs to quarantine (never served again
    /// until the right bytes are put back). Exit 0 no problem, 1 problems (listed),
    /// 2 could not run.
    Scrub(ScrubArgs),
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Recompute the log from its entries and check it against the catalog: every
    /// stored hash, every published version logged once with the manifest digest it
    /// holds now, every stored checkpoint signed by the log's key over the tree the
    /// entries make. Changes nothing. Exit 0 no problem, 1 problems (listed, naming the
    /// versions), 2 could not run.
    Verify {
        #[command(flatten)]
        data: DataArg,
        /// Print the report as one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Follow another server's log (its /log/) and print its new entries about the
    /// images or keys given (all of them without a filter): a publisher's early warning
    /// of a publication signed by their key that they did not make. Checks every run
    /// that the log only grew since the last (a fork or rollback is refused) and that
    /// its entries make the tree its key signed. Exit 0 checked (the entries printed),
    /// 1 the log is not what it must be, 2 could not run.
    Monitor {
        /// The server: https://HOST[:PORT].
        url: String,
        /// The log's verifier key (its DATA/log/log.vkey, /log/vkey), or a file holding it.
        #[arg(long, value_name = "VKEY")]
        vkey: String,
        /// PEM certificate(s) to trust for the server instead of the system store.
        #[arg(long, value_name = "FILE", env = "IMGSRV_CA")]
        ca: Option<PathBuf>,
        /// Where the checkpoint and leaf hashes seen are kept (default: the XDG state
        /// directory's imgsrv/monitor, ~/.local/state/imgsrv/monitor).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Report entries about images matching this glob (repeatable).
        #[arg(long = "image", value_name = "GLOB")]
        images: Vec<String>,
        /// Report entries about this publisher key id, hex (repeatable): its additions,
        /// retirements, revocations and the publications it signed.
        #[arg(long = "key", value_name = "KEY_ID")]
        keys: Vec<String>,
        /// Print the report as one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum WitnessCommand {
    /// Make the witness key (DATA/witness/witness.key, mode 0600) unless there is one,
    /// and print its verifier key (also in DATA/witness/witness.vkey): give it to the
    /// logs that ask this witness ([transparency_log] witnesses) and to the consumers
    /// that count its cosignatures. Then list the logs to witness under [witness] logs
    /// in imgsrv.toml and serve: it answers POST /witness/add-checkpoint.
    Init {
        #[command(flatten)]
        data: DataArg,
        /// The witness's name (default: HOST/imgsrv-witness).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// The backup directory: new, empty, or an earlier backup's (then only new blobs are copied).
    #[arg(long, value_name = "DEST")]
    pub out: PathBuf,
    /// Print the plan (blobs to copy, bytes, skipped) and stop.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup directory (made by `imgsrv backup`).
    #[arg(long, value_name = "DEST")]
    pub from: PathBuf,
    /// The data directory to restore into: new or empty, and not used by a server.
    #[arg(long = "data", value_name = "NEWDIR", env = "IMGSRV_DATA")]
    pub data: PathBuf,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The appliance's data directory (not served while it is copied).
    #[arg(long, value_name = "DATA_DIR")]
    pub from: PathBuf,
    /// The deployment's imgsrv.toml, with a [storage] section naming PostgreSQL and
    /// S3 (an empty database and bucket, or those of an interrupted migrate of the
    /// same appliance); its directory is the instance's data directory.
    #[arg(long, value_name = "CONFIG")]
    pub to: PathBuf,
    /// Print the plan (what would be copied, what an earlier run copied) and stop:
    /// nothing is written to the target.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct ScrubArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Re-hash a random PERCENT of the stored blobs (default 100: all). Blobs whose
    /// size the catalog disputes are read whatever the sample; the catalog and
    /// signature checks always cover everything.
    #[arg(long, value_name = "PERCENT", value_parser = sample_arg)]
    pub sample: Option<f64>,
    /// Read at most this fast, e.g. 50MB/s or 1GiB/s (a bare number is MB/s, 10^6
    /// bytes per second); default: as fast as the disk.
    #[arg(long, value_name = "MB/s", value_parser = rate_arg)]
    pub rate: Option<u64>,
    /// Print the plan (what would be read) and stop: nothing is read or changed.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `serve --listen`: IP:PORT, said so when only a port is given.
fn listen_arg(s: &str) -> Result<String, String> {
    match s.parse::<std::net::SocketAddr>() {
        Ok(_) => Ok(s.to_string()),
        Err(_) if s.parse::<u16>().is_ok() => Err(format!(
            "--listen wants IP:PORT, not a port alone: 0.0.0.0:{s} (every IPv4 address), \
             [::]:{s} (IPv6 too) or 127.0.0.1:{s} (this machine only)"
        )),
        Err(e) => Err(format!(
            "--listen wants IP:PORT, e.g. 0.0.0.0:8443 or [::]:8443 ({e})"
        )),
    }
}

fn audit_time_arg(s: &str) -> Result<String, String> {
    crate::admin_cli::parse_audit_time(s).map_err(|e| format!("{e:#}"))
}

fn sample_arg(s: &str) -> Result<f64, String> {
    crate::maint::scrub::parse_sample(s).map_err(|e| format!("{e:#}"))
}

fn rate_arg(s: &str) -> Result<u64, String> {
    crate::maint::scrub::parse_rate(s).map_err(|e| format!("{e:#}"))
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The minisign public keys you trust: one `.pub` file, or a directory of
    /// `<name>.pub` files with optional `<name>.toml` policies.
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub trusted_keys: Option<PathBuf>,
    /// Consumer config (default: IMGSRV_CLIENT_CONFIG, else
    /// $XDG_CONFIG_HOME/imgsrv/client.toml or ~/.config/imgsrv/client.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Architecture (default: this machine's; amd64 = x86_64, arm64 = aarch64).
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// The virtual-machine disk (qcow2) instead of the container rootfs (squashfs).
    #[arg(long)]
    pub vm: bool,
    /// Artifact variant (default: `default` when the version has several).
    #[arg(long, value_name = "VARIANT")]
    pub variant: Option<String>,
    /// IMAGE (newest published version), IMAGE:ALIAS or IMAGE@VERSION.
    #[arg(value_name = "IMAGE[:ALIAS|@VERSION]")]
    pub image: String,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// Directory to write incus.tar.xz, rootfs.squashfs or disk.qcow2,
    /// manifest.json and manifest.json.minisig into (created if needed).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum PrincipalCommand {
    /// Add a principal (a user or a service such as a CI pipeline).
    Add {
        #[command(flatten)]
        data: DataArg,
        /// A person (user) or a machine (service: CI, a mirror job).
        #[arg(long, default_value = "user", value_parser = ["user", "service"])]
        kind: String,
        /// A longer name to show (default: NAME).
        #[arg(long)]
        display_name: Option<String>,
        /// The principal's name: 1 to 64 of [a-z0-9._-], e.g. ci or alice.
        name: String,
    },
    /// List principals and their grants.
    List {
        #[command(flatten)]
        data: DataArg,
    },
    /// Remove a principal with its grants and tokens.
    Remove {
        #[command(flatten)]
        data: DataArg,
        /// The principal's name (as `imgsrv principal list` shows it).
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GrantCommand {
    /// Give PRINCIPAL the ROLE (auth-manager, content-writer, reader) on images matching GLOB.
    Add {
        #[command(flatten)]
        data: DataArg,
        /// The principal's name (`imgsrv principal list`).
        principal: String,
        /// auth-manager, content-writer or reader.
        role: String,
        /// Image-name glob the role applies to, e.g. debian-* or * (quote it in the shell).
        glob: String,
    },
    /// Remove a grant.
    Rm {
        #[command(flatten)]
        data: DataArg,
        /// The principal's name (`imgsrv principal list`).
        principal: String,
        /// auth-manager, content-writer or reader.
        role: String,
        /// Image-name glob the role applies to, e.g. debian-* or * (quote it in the shell).
        glob: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issue an API token for PRINCIPAL; the token is printed once, alone on the last line.
    Issue {
        #[command(flatten)]
        data: DataArg,
        /// Lifetime (30d, 12h, 2w, never) or an RFC 3339 time.
        #[arg(long, default_value = "90d")]
        expires: String,
        /// A label for the token.
        #[arg(long)]
        name: Option<String>,
        /// The principal the token authenticates as.
        principal: String,
    },
    /// List API tokens (every principal's, or PRINCIPAL's): id, principal, name, state,
    /// creation, expiry, last use, revocation. Never a secret: only hashes are kept.
    List {
        #[command(flatten)]
        data: DataArg,
        /// table, json or csv.
        #[arg(long, value_enum, default_value_t = FormatArg::Table)]
        format: FormatArg,
        /// Only this principal's tokens (name or id).
        principal: Option<String>,
    },
    /// Revoke a token by its id.
    Revoke {
        #[command(flatten)]
        data: DataArg,
        /// The token's id (printed when it was issued).
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Print principals x roles x scopes as a table.
    Matrix {
        #[command(flatten)]
        data: DataArg,
    },
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Only this principal (name or id).
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this action (e.g. publish), or a prefix ending in '.' (e.g. grant.).
    #[arg(long)]
    pub action: Option<String>,
    /// ok, denied or failed.
    #[arg(long, value_parser = ["ok", "denied", "failed"])]
    pub outcome: Option<String>,
    /// Only rows whose target contains this (e.g. an image name).
    #[arg(long)]
    pub target: Option<String>,
    /// From this time: a date (2026-11-01, midnight UTC), an RFC 3339 time
    /// (2026-11-01T12:00:00Z) or a duration ago (90m, 24h, 7d).
    #[arg(long, value_name = "TIME", value_parser = audit_time_arg)]
    pub since: Option<String>,
    /// Before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = audit_time_arg)]
    pub until: Option<String>,
    /// At most this many rows (the oldest first).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Print JSON lines (for export) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Make IMAGE public or private (content-writer on the image).
    SetVisibility {
        #[command(flatten)]
        server: ServerArgs,
        /// The image, e.g. debian-bookworm.
        image: String,
        /// public (anyone may read it) or private (readers only).
        #[arg(value_parser = ["public", "private"])]
        visibility: String,
    },
}

/// `--format` of the listing commands.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    Table,
    Json,
    Csv,
}

impl From<FormatArg> for crate::listing::Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Table => crate::listing::Format::Table,
            FormatArg::Json => crate::listing::Format::Json,
            FormatArg::Csv => crate::listing::Format::Csv,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct DataArg {
    /// Data directory.
    #[arg(
        long = "data",
        value_name = "DIR",
        env = "IMGSRV_DATA",
        default_value = "imgsrv-data"
    )]
    pub dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Server URL, e.g. https://images.example.org:8443
    #[arg(long, value_name = "URL", env = "IMGSRV_SERVER")]
    pub server: String,
    /// PEM certificate to trust for the server (e.g. DATA/tls/cert.pem; pinned:
    /// a self-signed one too).
    #[arg(long, value_name = "CERT", env = "IMGSRV_CA")]
    pub ca: Option<PathBuf>,
    /// File holding the API token (else the token in IMGSRV_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The API token: --token-file, else IMGSRV_TOKEN.
    pub fn token(&self) -> Result<Option<String>> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading token file {}", f.display()))?;
            let t = t.trim().to_string();
            anyhow::ensure!(!t.is_empty(), "token file {} is empty", f.display());
            return Ok(Some(t));
        }
        Ok(std::env::var("IMGSRV_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }

    pub fn require_token(&self) -> Result<String> {
        self.token()?
            .context("this command needs an API token: --token-file FILE or IMGSRV_TOKEN")
    }

    pub fn client(&self, token: Option<String>) -> Result<crate::client::ApiClient> {
        Ok(crate::client::ApiClient::new(
            &self.server,
            self.ca.as_deref(),
            token,
        )?)
    }
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Trust a publisher's minisign public key (a file made by `minisign -G`).
    Add {
        #[command(flatten)]
        data: DataArg,
        /// Key name (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// Image-name glob this key may sign for (repeatable; default: every image).
        #[arg(long = "scope", value_name = "GLOB")]
        scopes: Vec<String>,
        /// The public key file (`minisign -G` writes it, e.g. minisign.pub).
        pubkey_file: PathBuf,
    },
    /// Replace the image globs a key may sign for (the whole new list).
    Scope {
        #[command(flatten)]
        data: DataArg,
        /// The key's name or key id (as `imgsrv key list` shows them).
        name: String,
        /// Image-name glob this key may sign for (repeatable; none: every image).
        #[arg(long = "scope", value_name = "GLOB")]
        scopes: Vec<String>,
    },
    /// Retire a key: it signs no new publications; what it signed still verifies.
    Retire {
        #[command(flatten)]
        data: DataArg,
        /// The key's name or key id (as `imgsrv key list` shows them).
        name: String,
    },
    /// Revoke a compromised key: nothing signed with it verifies any more.
    Revoke {
        #[command(flatten)]
        data: DataArg,
        /// The key's name or key id (as `imgsrv key list` shows them).
        name: String,
    },
    /// List trusted publisher keys.
    List {
        #[command(flatten)]
        data: DataArg,
    },
    /// Stop trusting a key (by name or key id; a revoked key stays listed).
    Remove {
        #[command(flatten)]
        data: DataArg,
        /// The key's name or key id (as `imgsrv key list` shows them).
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// A server (`--server`, through the API, with a content-writer token) or a data
    /// directory on this machine (`--data`, through the server's own code: its
    /// verification mode and trusted keys apply, audited as the local user).
    #[command(flatten)]
    pub site: crate::replicate::SiteArgs,
    /// minisign secret key file (from `minisign -G`, encrypted or -W).
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub key: PathBuf,
    /// Image name (default: {os}-{release} from metadata.yaml, lower-case).
    #[arg(long)]
    pub image: Option<String>,
    /// Version (default: the serial property, else the creation date as YYYYMMDD_HHMM).
    #[arg(long)]
    pub version: Option<String>,
    /// Alias to point at the new version (repeatable).
    #[arg(long = "alias", value_name = "ALIAS")]
    pub aliases: Vec<String>,
    /// Make the image private: only principals with reader (or more) on it see it.
    #[arg(long)]
    pub private: bool,
    /// The image files, in any order (recognised by their content): the metadata
    /// tarball (incus.tar.xz) and rootfs.squashfs and/or disk.qcow2.
    #[arg(value_name = "FILE", required = true, num_args = 2..=3)]
    pub files: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AliasCommand {
    /// Point IMAGE's ALIAS at VERSION (creates or moves it).
    Set {
        #[command(flatten)]
        server: ServerArgs,
        /// The image, e.g. debian-bookworm.
        image: String,
        /// The alias, e.g. stable (Incus sees IMAGE/ALIAS).
        alias: String,
        /// The published version it points at.
        version: String,
    },
    /// Remove an alias.
    Rm {
        #[command(flatten)]
        server: ServerArgs,
        /// The image, e.g. debian-bookworm.
        image: String,
        /// The alias to remove.
        alias: String,
    },
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep what became unreferenced (or retired) less than this long ago
    /// (e.g. 0, 30m, 24h, 7d); default: `[gc] grace` of the configuration (24h).
    #[arg(long, value_name = "DURATION")]
    pub grace: Option<String>,
    /// Print the plan and the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VersionCommand {
    /// Delete a draft version (a published version cannot be deleted: retire it).
    Delete {
        #[command(flatten)]
        server: ServerArgs,
        /// The image, e.g. debian-bookworm.
        image: String,
        /// The draft version to delete.
        version: String,
    },
    /// Take a published version out of service: it leaves the Simple Streams
    /// index and the listings at once; its bytes still download until garbage
    /// collection collects them after the grace (then 410 Gone); its manifest,
    /// signature and publish record stay readable forever.
    Retire {
        #[command(flatten)]
        server: ServerArgs,
        /// The image, e.g. debian-bookworm.
        image: String,
        /// The published version to retire.
        version: String,
        /// Why (kept forever in the retirement record and the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// Runs a command; the error is printed by `main`.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { data, names } => {
            let report = crate::app::init(&data.dir, &names)?;
            print_init(&data.dir, &report);
            Ok(())
        }
        Command::Serve {
            data,
            listen,
            metrics_listen,
        } => crate::serve::serve(&data.dir, listen.as_deref(), metrics_listen.as_deref()),
        Command::Key(k) => key_command(k),
        Command::Publish(p) => {
            let (metadata, roots) =
                crate::image::sort_files(&p.files).map_err(crate::replicate::cannot_run)?;
            let destination = match p.site.site()? {
                crate::site::Site::Data(dir) => crate::publish::Destination::Data(dir),
                crate::site::Site::Server(server) => {
                    let args = ServerArgs {
                        server,
                        ca: p.site.ca.clone(),
                        token_file: p.site.token_file.clone(),
                    };
                    crate::publish::Destination::Server {
                        token: args.require_token()?,
                        server: args.server,
                        ca: args.ca,
                    }
                }
            };
            let opts = crate::publish::PublishOptions {
                destination,
                key: p.key,
                image: p.image,
                version: p.version,
                aliases: p.aliases,
                metadata_tarball: metadata,
                roots,
                private: p.private,
                progress: std::io::stderr().is_terminal(),
            };
            crate::publish::publish(&opts, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Principal(PrincipalCommand::Add {
            data,
            kind,
            display_name,
            name,
        }) => crate::admin_cli::principal_add(&data.dir, &name, &kind, display_name.as_deref()),
        Command::Principal(PrincipalCommand::List { data }) => {
            crate::admin_cli::principal_list(&data.dir)
        }
        Command::Principal(PrincipalCommand::Remove { data, name }) => {
            crate::admin_cli::principal_remove(&data.dir, &name)
        }
        Command::Grant(GrantCommand::Add {
            data,
            principal,
            role,
            glob,
        }) => crate::admin_cli::grant_add(&data.dir, &principal, &role, &glob),
        Command::Grant(GrantCommand::Rm {
            data,
            principal,
            role,
            glob,
        }) => crate::admin_cli::grant_rm(&data.dir, &principal, &role, &glob),
        Command::Token(TokenCommand::Issue {
            data,
            expires,
            name,
            principal,
        }) => crate::admin_cli::token_issue(&data.dir, &principal, &expires, name.as_deref()),
        Command::Token(TokenCommand::List {
            data,
            format,
            principal,
        }) => {
            let cat = crate::admin_cli::open_catalog(&data.dir)?;
            let rows = crate::listing::token_rows(cat.as_ref(), principal.as_deref())?;
            print_rows(|out| crate::listing::print_tokens(&rows, format.into(), out))
        }
        Command::Token(TokenCommand::Revoke { data, token_id }) => {
            crate::admin_cli::token_revoke(&data.dir, &token_id)
        }
        Command::Auth(AuthCommand::Matrix { data }) => {
            print!("{}", crate::admin_cli::matrix(&data.dir)?);
            Ok(())
        }
        Command::Mirrors { data } => crate::schedule::print_status(&data.dir),
        Command::Gc(a) => gc_command(a),
        Command::Audit(a) => {
            let q = crate::catalog::AuditQuery {
                principal: a.principal,
                action: a.action,
                outcome: a.outcome,
                target: a.target,
                since: a.since,
                until: a.until,
                after_id: None,
                limit: a.limit,
            };
            crate::admin_cli::audit(&a.data.dir, &q, a.json)
        }
        Command::Image(ImageCommand::SetVisibility {
            server,
            image,
            visibility,
        }) => {
            let c = server.client(Some(server.require_token()?))?;
            let img = c.set_visibility(&image, &visibility)?;
            println!("{} is {visibility}", img.name);
            Ok(())
        }
        Command::Alias(AliasCommand::Set {
            server,
            image,
            alias,
            version,
        }) => {
            let c = server.client(Some(server.require_token()?))?;
            let a = c.put_alias(&image, &alias, &version)?;
            println!("{image}:{} -> {}", a.alias, a.version);
            Ok(())
        }
        Command::Alias(AliasCommand::Rm {
            server,
            image,
            alias,
        }) => {
            let c = server.client(Some(server.require_token()?))?;
            c.delete_alias(&image, &alias)?;
            println!("removed alias {image}:{alias}");
            Ok(())
        }
        Command::Version(VersionCommand::Delete {
            server,
            image,
            version,
        }) => {
            let c = server.client(Some(server.require_token()?))?;
            c.delete_version(&image, &version)?;
            println!("deleted draft {image}@{version}");
            Ok(())
        }
        Command::Version(VersionCommand::Retire {
            server,
            image,
            version,
            reason,
        }) => {
            let c = server.client(Some(server.require_token()?))?;
            let t = c.retire_version(&image, &version, &reason)?;
            println!(
                "retired {image}@{version} at {}: it has left the index; its bytes download \
                 until garbage collection collects them after the grace",
                t.retired_at
            );
            Ok(())
        }
        Command::List {
            server,
            image,
            format,
        } => {
            let c = server.client(server.token()?)?;
            let rows = crate::listing::image_rows(&c, image.as_deref())?;
            print_rows(|out| crate::listing::print_images(&rows, format.into(), out))
        }
        Command::Verify(v) => verify_command(v, None),
        Command::Pull(p) => verify_command(p.verify, Some(p.out)),
        Command::Mirror(m) => crate::mirror::command::command(m),
        Command::MirrorImgsrv(a) => crate::replicate::mirror_command(a),
        Command::Export(a) => crate::bundle::export_command(a),
        Command::Import(a) => crate::bundle::import_command(a),
        Command::Backup(a) => {
            let opts = crate::maint::backup::BackupOptions {
                data_dir: a.data.dir,
                out: a.out,
                dry_run: a.dry_run,
            };
            crate::maint::backup::backup(&opts, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Restore(a) => {
            let opts = crate::maint::restore::RestoreOptions {
                from: a.from,
                data_dir: a.data,
            };
            crate::maint::restore::restore(&opts, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Migrate(a) => {
            let opts = crate::maint::migrate::MigrateOptions {
                from: a.from,
                to: a.to,
                dry_run: a.dry_run,
            };
            crate::maint::migrate::migrate(&opts, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Scrub(a) => scrub_command(a),
        Command::Log(LogCommand::Verify { data, json }) => log_verify_command(&data.dir, json),
        Command::Log(LogCommand::Monitor {
            url,
            vkey,
            ca,
            state_dir,
            images,
            keys,
            json,
        }) => log_monitor_command(&url, &vkey, ca, state_dir, images, keys, json),
        Command::Witness(WitnessCommand::Init { data, name }) => {
            let name = name.unwrap_or_else(|| {
                format!(
                    "{}/imgsrv-witness",
                    crate::tls::host_name().unwrap_or_else(|| "localhost".into())
                )
            });
            let (vkey, made) = crate::tlog::witness::init(&data.dir, &name)
                .map_err(crate::replicate::cannot_run)?;
            if made {
                eprintln!(
                    "made {}",
                    data.dir
                        .join(crate::tlog::witness::DIR)
                        .join(crate::tlog::witness::KEY_FILE)
                        .display()
                );
            }
            println!("{vkey}");
            Ok(())
        }
    }
}

/// `imgsrv log verify`: exit 0 no problem, 1 problems found, 2 could not run.
/// The log of a server, read through its API client.
struct RemoteLog(crate::client::ApiClient);

impl crate::tlog::monitor::LogReader for RemoteLog {
    fn checkpoint(&self) -> Result<String> {
        self.0.get_log_checkpoint()?.ok_or_else(|| {
            anyhow::anyhow!(
                "{} keeps no transparency log (/log/checkpoint: 404)",
                self.0.server()
            )
        })
    }
    fn tile(&self, path: &str) -> Result<Vec<u8>> {
        Ok(self.0.get_log_tile(path)?)
    }
}

fn log_monitor_command(
    url: &str,
    vkey: &str,
    ca: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    images: Vec<String>,
    keys: Vec<String>,
    json: bool,
) -> Result<()> {
    use crate::replicate::cannot_run;
    use crate::tlog::monitor::{self, MonitorError, MonitorOptions};
    let setup = || -> Result<(RemoteLog, MonitorOptions)> {
        let text = match std::fs::read_to_string(vkey) {
            Ok(t) => t,
            Err(_) if vkey.contains('+') => vkey.to_string(),
            Err(e) => anyhow::bail!("--vkey {vkey:?}: neither a vkey nor a file with one ({e})"),
        };
        let log_key = crate::tlog::note::Verifier::parse(text.trim()).map_err(|e| {
            anyhow::anyhow!("--vkey: {e}; copy it from the server's /log/vkey or DATA/log/log.vkey")
        })?;
        for g in &images {
            anyhow::ensure!(
                crate::names::scope(g),
                "invalid --image glob {g:?}: an image-name glob such as debian-* or *"
            );
        }
        for k in &keys {
            anyhow::ensure!(
                k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()),
                "invalid --key {k:?}: a minisign key id, 16 hex digits (imgsrv key list)"
            );
        }
        let state_dir = match state_dir {
            Some(d) => d,
            None => crate::tlog::consumer::default_state_dir()?.join("monitor"),
        };
        let client = crate::client::ApiClient::new(url, ca.as_deref(), None)?;
        Ok((
            RemoteLog(client),
            MonitorOptions {
                log_key,
                state_dir,
                images,
                keys,
            },
        ))
    };
    let (reader, opts) = setup().map_err(cannot_run)?;
    let report = match monitor::run(&reader, &opts) {
        Ok(r) => r,
        Err(MonitorError::CannotRun(e)) => return Err(cannot_run(e.context("log monitor"))),
        Err(MonitorError::Problem(p)) => {
            eprintln!("PROBLEM {p}");
            std::process::exit(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, &report)?;
        writeln!(stdout)?;
        return Ok(());
    }
    for (index, text) in &report.matched {
        writeln!(stdout, "entry {index}: {text}")?;
    }
    let since = match report.since {
        Some(n) => format!("{} new since the {n} seen before", report.size - n),
        None => "the first run".to_string(),
    };
    writeln!(
        stdout,
        "log {}: {} entries ({since}), consistent; {} new entr{} matched",
        report.origin,
        report.size,
        report.matched.len(),
        if report.matched.len() == 1 {
            "y"
        } else {
            "ies"
        }
    )?;
    Ok(())
}

fn log_verify_command(dir: &std::path::Path, json: bool) -> Result<()> {
    use crate::replicate::cannot_run;
    let app = (|| -> Result<crate::app::App> {
        crate::admin_cli::open_catalog(dir)?;
        crate::app::App::open(crate::config::Config::load(dir, None)?)
    })()
    .map_err(cannot_run)?;
    let ledger = app.ledger.as_ref().ok_or_else(|| {
        cannot_run(anyhow::anyhow!(
            "{} has no transparency log key (DATA/log/log.key) and its catalog names none: run `imgsrv init --data {}` to start the log",
            dir.display(),
            dir.display()
        ))
    })?;
    let report = crate::maint::logcheck::verify(app.catalog.as_ref(), &ledger.vkey())
        .map_err(|e| cannot_run(anyhow::Error::from(e).context("log verify")))?;
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, &report)?;
        writeln!(stdout)?;
    } else {
        for p in &report.problems {
            writeln!(stdout, "PROBLEM {p}")?;
        }
        writeln!(stdout, "{}", report.describe())?;
    }
    if !report.ok() {
        anyhow::bail!(
            "the transparency log of {} has {} problem(s) (listed above)",
            dir.display(),
            report.problems.len()
        );
    }
    Ok(())
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn print_rows(print: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    match print(&mut std::io::stdout().lock()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `imgsrv scrub`: exit 0 no problem, 1 problems found, 2 could not run.
fn scrub_command(a: ScrubArgs) -> Result<()> {
    use crate::maint::scrub::{self, ScrubError, ScrubOptions};
    use crate::replicate::cannot_run;
    let open = || -> Result<crate::app::App> {
        crate::admin_cli::open_catalog(&a.data.dir)?;
        let config = crate::config::Config::load(&a.data.dir, None)?;
        for w in &config.warnings {
            eprintln!("WARNING: {w}");
        }
        crate::app::App::open(config)
    };
    let app = open().map_err(cannot_run)?;
    let opts = ScrubOptions {
        sample_percent: a.sample.unwrap_or(100.0),
        rate: a.rate,
        dry_run: a.dry_run,
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    let outcome = match a.json {
        true => scrub::scrub(&app, &opts, &mut std::io::sink()),
        false => scrub::scrub(&app, &opts, &mut stdout),
    };
    let report = match outcome {
        Ok(r) => r,
        Err(e @ ScrubError::Busy) => return Err(cannot_run(e.into())),
        Err(ScrubError::Failed(e)) => return Err(cannot_run(e.context("scrub"))),
    };
    if a.json {
        serde_json::to_writer_pretty(&mut stdout, &report)?;
        writeln!(stdout)?;
    }
    if !report.ok() {
        anyhow::bail!(
            "scrub found {} problem(s) in {}",
            report.problems.len(),
            a.data.dir.display()
        );
    }
    Ok(())
}

/// `imgsrv verify` / `imgsrv pull`. Errors are [`crate::verify::VerifyError`],
/// which `main` maps to exit code 1 (verification failed) or 2 (could not run).
fn verify_command(v: VerifyArgs, out: Option<PathBuf>) -> Result<()> {
    use crate::verify::{self, VerifyError};
    let cannot = |e: anyhow::Error| VerifyError::CannotRun(e);
    let target: verify::Target = v
        .image
        .parse()
        .map_err(|e: String| cannot(anyhow::anyhow!(e)))?;
    let setting = verify::load_mode(verify::config_path(v.config.as_deref()));
    for w in &setting.warnings {
        eprintln!("WARNING: {w}");
    }
    let log = verify::load_log_policy(verify::config_path(v.config.as_deref())).map_err(cannot)?;
    let opts = verify::Options {
        log,
        token: v.server.token().map_err(cannot)?,
        server: v.server.server,
        ca: v.server.ca,
        trusted_keys: v.trusted_keys,
        mode: setting.mode,
        target,
        arch: verify::normalize_arch(&v.arch.unwrap_or_else(verify::host_arch)),
        vm: v.vm,
        variant: v.variant,
        out,
        progress: std::io::stderr().is_terminal(),
    };
    verify::run(
        &opts,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    Ok(())
}

fn print_init(dir: &Path, report: &crate::app::InitReport) {
    if report.created.is_empty() {
        println!("{} is already initialised; nothing to do", dir.display());
        return;
    }
    println!("initialised {}:", dir.display());
    for p in &report.created {
        println!("  created {}", p.display());
    }
    if report.bootstrap_principal.is_some() {
        println!(
            "the admin API token is in {} (mode 0600); use it with --token-file",
            dir.join(crate::auth::ADMIN_TOKEN_FILE).display()
        );
    }
    let log = dir.join(crate::ledger::LOG_DIR);
    if report.created.contains(&log.join(crate::ledger::KEY_FILE)) {
        if let Ok(vkey) = std::fs::read_to_string(log.join(crate::ledger::VKEY_FILE)) {
            println!(
                "the transparency log's verifier key (give it to consumers; also in {} and at \
                 /log/vkey):\n  {}",
                log.join(crate::ledger::VKEY_FILE).display(),
                vkey.trim()
            );
        }
    }
}

/// `imgsrv key retire|revoke`: the state change, audited, then reported.
fn set_key_state(
    data_dir: &Path,
    name: &str,
    state: crate::sign::KeyState,
    action: &str,
) -> Result<()> {
    let cat = crate::admin_cli::open_catalog(data_dir)?;
    let key = crate::sign::set_key_state(cat.as_ref(), name, state)?;
    crate::admin_cli::record(
        cat.as_ref(),
        action,
        &key.name,
        serde_json::json!({ "key_id": key.key_id }),
    )?;
    println!(
        "key {} ({}) is {}",
        key.name,
        key.key_id,
        key.policy.state.as_str()
    );
    Ok(())
}

/// Key changes go to the catalog, where every instance sharing it sees them at its
/// next request, and are audited.
fn key_command(k: KeyCommand) -> Result<()> {
    match k {
        KeyCommand::Add {
            data,
            name,
            scopes,
            pubkey_file,
        } => {
            let cat = crate::admin_cli::open_catalog(&data.dir)?;
            let key =
                crate::sign::add_trusted_key(cat.as_ref(), name.as_deref(), &pubkey_file, &scopes)?;
            crate::admin_cli::record(
                cat.as_ref(),
                "key.add",
                &key.name,
                serde_json::json!({ "key_id": key.key_id, "scopes": key.policy.scopes }),
            )?;
            println!(
                "trusted key {} (key id {}) added for images {}: in the catalog (every \
                 instance sharing it trusts it from its next request)",
                key.name,
                key.key_id,
                key.policy.scopes.join(", "),
            );
        }
        KeyCommand::Scope { data, name, scopes } => {
            let cat = crate::admin_cli::open_catalog(&data.dir)?;
            let key = crate::sign::set_key_scopes(cat.as_ref(), &name, &scopes)?;
            crate::admin_cli::record(
                cat.as_ref(),
                "key.scope",
                &key.name,
                serde_json::json!({ "key_id": key.key_id, "scopes": key.policy.scopes }),
            )?;
            println!(
                "key {} ({}) may sign images {}",
                key.name,
                key.key_id,
                key.policy.scopes.join(", ")
            );
        }
        KeyCommand::Retire { data, name } => set_key_state(
            &data.dir,
            &name,
            crate::sign::KeyState::Retired,
            "key.retire",
        )?,
        KeyCommand::Revoke { data, name } => set_key_state(
            &data.dir,
            &name,
            crate::sign::KeyState::Revoked,
            "key.revoke",
        )?,
        KeyCommand::List { data } => {
            let cat = crate::admin_cli::open_catalog(&data.dir)?;
            let keys = crate::sign::load_trusted_keys(cat.as_ref())?;
            if keys.is_empty() {
                println!(
                    "no trusted keys in the catalog of {} (add one with `imgsrv key add`)",
                    data.dir.display()
                );
            }
            for k in keys {
                println!(
                    "{}\t{}\t{}\t{}",
                    k.name,
                    k.key_id,
                    k.policy.state.as_str(),
                    k.policy.scopes.join(",")
                );
            }
        }
        KeyCommand::Remove { data, name } => {
            let cat = crate::admin_cli::open_catalog(&data.dir)?;
            let key = crate::sign::remove_trusted_key(cat.as_ref(), &name)?;
            crate::admin_cli::record(
                cat.as_ref(),
                "key.remove",
                &key.name,
                serde_json::json!({ "key_id": key.key_id }),
            )?;
            println!("removed trusted key {} (key id {})", key.name, key.key_id);
        }
    }
    Ok(())
}

fn gc_command(a: GcArgs) -> Result<()> {
    let data_dir = &a.data.dir;
    crate::admin_cli::open_catalog(data_dir)?;
    let config = crate::config::Config::load(data_dir, None)?;
    let grace = match &a.grace {
        Some(g) => crate::config::parse_duration(g).context("--grace")?,
        None => config.gc.grace,
    };
    let opts = crate::maint::gc::GcOptions {
        grace,
        retention: config.retention.clone(),
        actor: crate::admin_cli::local_actor(),
    };
    let app = crate::app::App::open(config)?;
    let mut print = |line: &str| println!("{line}");
    let mut quiet = |_: &str| {};
    let say: &mut dyn FnMut(&str) = if a.json { &mut quiet } else { &mut print };
    let run = crate::maint::gc::run(&app, &opts, a.dry_run, say)?;
    let plan = crate::maint::gc::plan_json(&run.plan);
    let Some(report) = run.report else {
        if a.json {
            println!("{plan}");
        }
        return Ok(());
    };
    if a.json {
        println!("{}", serde_json::json!({ "plan": plan, "report": report }));
    }
    if !report.failures.is_empty() {
        anyhow::bail!(
            "{} item(s) could not be collected (see above); the rest was",
            report.failures.len()
        );
    }
    Ok(())
}
