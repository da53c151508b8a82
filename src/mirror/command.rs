//! `imgsrv mirror` on the command line: arguments, the target, exit codes
//! (0 all mirrored or present, 1 something failed, 2 could not run).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{ImageType, MirrorOptions};
use crate::replicate::{cannot_run, Destination};
use crate::target::RemoteTarget;

/// Arguments of `imgsrv mirror`.
#[derive(Args, Debug)]
pub struct MirrorArgs {
    /// Destination server URL, e.g. `https://images.example.org:8443` (needs a
    /// content-writer token: --token-file or IMGSRV_TOKEN).
    #[arg(long, value_name = "URL", env = "IMGSRV_SERVER")]
    pub server: Option<String>,
    /// PEM certificate to trust for the destination server (pinned: a self-signed one too).
    #[arg(long, value_name = "CERT", env = "IMGSRV_CA")]
    pub ca: Option<PathBuf>,
    /// File holding the destination server's API token (else the token in IMGSRV_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Destination data directory, written through the server's own code
    /// (its verification mode and trusted keys apply). A flag typed wins over
    /// the other's variable; --server and --data typed together are refused.
    #[arg(long, value_name = "DIR", env = "IMGSRV_DATA")]
    pub data: Option<PathBuf>,
    /// minisign secret key that signs the mirrored manifests (its public key
    /// must be trusted by the destination: `imgsrv key add`).
    #[arg(long, value_name = "SECRET_KEY")]
    pub key: PathBuf,
    /// PEM certificate(s) to trust for an https upstream (pinned: a self-signed one
    /// too; default: the system store).
    #[arg(long, value_name = "CERT")]
    pub upstream_ca: Option<PathBuf>,
    /// Only this operating system (case-insensitive).
    #[arg(long)]
    pub os: Option<String>,
    /// Only this release (case-insensitive).
    #[arg(long)]
    pub release: Option<String>,
    /// Only this variant (case-insensitive).
    #[arg(long)]
    pub variant: Option<String>,
    /// Only this architecture (amd64 = x86_64, arm64 = aarch64).
    #[arg(long)]
    pub arch: Option<String>,
    /// Only containers or only virtual machines.
    #[arg(long = "type", value_name = "TYPE", value_parser = ["container", "vm"])]
    pub image_type: Option<String>,
    /// Only images whose imgsrv name ({os}-{release}[-{variant}]) matches this glob.
    #[arg(long, value_name = "GLOB")]
    pub image: Option<String>,
    /// Only the newest N versions of each upstream product.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub latest: Option<u32>,
    /// Parallel downloads.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// Read the upstream's Simple Streams even when it is an imgsrv server
    /// (re-sign with --key instead of keeping the publishers' signatures).
    #[arg(long)]
    pub simplestreams: bool,
    /// Base URL of the upstream Simple Streams tree (streams/v1/index.json is
    /// below it), https:// or (with a warning) http://.
    #[arg(value_name = "UPSTREAM_URL")]
    pub upstream: String,
}

/// Runs `imgsrv mirror`. A [`crate::verify::VerifyError::CannotRun`] error
/// ([`cannot_run`]) means exit 2 (`main` maps it); any other error exit 1.
pub fn command(a: MirrorArgs) -> Result<()> {
    let mut opts = MirrorOptions::new(&a.upstream, &a.key);
    opts.upstream_ca = a.upstream_ca.clone();
    opts.os = a.os.clone();
    opts.release = a.release.clone();
    opts.variant = a.variant.clone();
    opts.arch = a.arch.clone();
    opts.image_type = match a.image_type.as_deref() {
        Some(t) => Some(
            t.parse::<ImageType>()
                .map_err(|e| cannot_run(anyhow::anyhow!(e)))?,
        ),
        None => None,
    };
    opts.image = a.image.clone();
    opts.latest = a.latest.map(|n| n as usize);
    opts.jobs = a.jobs as usize;
    opts.progress = std::io::stderr().is_terminal();

    // Another imgsrv as the upstream: copy its signed manifests unchanged
    // (the publishers' signatures, not the mirror key's) instead of
    // re-signing a Simple Streams view of it.
    if !a.simplestreams && upstream_is_imgsrv(&a.upstream, a.upstream_ca.as_deref()) {
        return imgsrv_upstream(&a);
    }

    if let Some(crate::site::Site::Data(dir)) = site(&a).map_err(cannot_run)? {
        opts.staging_dir = Some(dir.join("tmp").join("mirror"));
    }
    let dest = destination(&a).map_err(cannot_run)?;
    let report =
        super::run(&opts, dest.target(), &mut std::io::stdout().lock()).map_err(cannot_run)?;
    if !report.ok() {
        return Err(anyhow::anyhow!(
            "mirror incomplete: {} failed (see above)",
            match report.failed.len() {
                1 => "1 version".to_string(),
                n => format!("{n} versions"),
            }
        ));
    }
    Ok(())
}

/// Whether `upstream` answers like an imgsrv server (`GET /v1/keys`).
fn upstream_is_imgsrv(upstream: &str, ca: Option<&std::path::Path>) -> bool {
    if !upstream.starts_with("https://") {
        return false;
    }
    let Ok(client) = crate::client::ApiClient::new(upstream, ca, None) else {
        return false;
    };
    client.get_keys().is_ok()
}

/// The destination named: `--data` or `--server` ([`crate::site::choose`]).
fn site(a: &MirrorArgs) -> Result<Option<crate::site::Site>> {
    crate::site::choose(a.server.as_deref(), a.data.as_deref())
}

/// The destination: `--data`, or `--server` with a token.
fn destination(a: &MirrorArgs) -> Result<Destination> {
    match site(a)? {
        Some(crate::site::Site::Data(dir)) => Destination::open_data(&dir),
        Some(crate::site::Site::Server(server)) => {
            let server = crate::cli::ServerArgs {
                server,
                ca: a.ca.clone(),
                token_file: a.token_file.clone(),
            };
            let token = server.require_token()?;
            Ok(Destination::Remote(RemoteTarget {
                client: server.client(Some(token))?,
            }))
        }
        None => anyhow::bail!(
            "no destination: --server URL (or IMGSRV_SERVER) or --data DIR (or IMGSRV_DATA)"
        ),
    }
}

fn imgsrv_upstream(a: &MirrorArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    writeln!(
        out,
        "{} is an imgsrv server: copying its published manifests and their original signatures \
         (the mirror key is not used)",
        a.upstream
    )?;
    for (flag, set) in [
        ("--os", a.os.is_some()),
        ("--release", a.release.is_some()),
        ("--variant", a.variant.is_some()),
        ("--arch", a.arch.is_some()),
        ("--type", a.image_type.is_some()),
    ] {
        if set {
            writeln!(
                out,
                "warning: {flag} does not apply to an imgsrv upstream (use --image and --latest)"
            )?;
        }
    }
    let dest = destination(a).map_err(cannot_run)?;
    let opts = crate::replicate::MirrorOptions {
        upstream: a.upstream.clone(),
        upstream_ca: a.upstream_ca.clone(),
        upstream_token: std::env::var("IMGSRV_UPSTREAM_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        image_glob: a.image.clone(),
        latest: a.latest.map(|n| n as usize),
        log: crate::verify::load_log_policy(crate::verify::config_path(None))
            .map_err(cannot_run)?,
    };
    let report = crate::replicate::mirror_imgsrv(&opts, &dest, &mut out).map_err(cannot_run)?;
    if !report.failed.is_empty() {
        return Err(anyhow::anyhow!(
            "{} version(s) not mirrored (see above)",
            report.failed.len()
        ));
    }
    Ok(())
}
