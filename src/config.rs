//! Server configuration: `DATA_DIR/imgsrv.toml`.
//!
//! The file is strict (unknown keys are errors) with one deliberate exception:
//! `[image_verification] mode`. That setting fails closed: a missing section
//! or key means `enforce`, and a value that cannot be read (wrong type,
//! unknown word) also means `enforce`, reported loudly as a warning instead
//! of stopping the server. Verification is only ever weakened by a readable,
//! explicit `mode = "warn"` or `mode = "off"` in this file; there is no API
//! route or flag for it (ADR: weakening verification must not be one click away).

use anyhow::{bail, Context};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod storage;
mod witness;
pub use storage::{
    redact_url, BlobBackend, CatalogBackend, S3Settings, StorageConfig, POSTGRES_URL_ENV,
    S3_SECRET_ENV,
};
pub use witness::{LogWitness, WitnessConfig};

pub const CONFIG_FILE: &str = "imgsrv.toml";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Where the Prometheus metrics are served by default (plain HTTP, loopback only).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationMode {
    Off,
    Warn,
    Enforce,
}

impl fmt::Display for VerificationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerificationMode::Off => "off",
            VerificationMode::Warn => "warn",
            VerificationMode::Enforce => "enforce",
        })
    }
}

/// Reads the verification mode out of a parsed TOML document. Never fails:
/// anything but an explicit readable `off`/`warn`/`enforce` is `Enforce`, and
/// unreadable values come back with a warning to print.
pub fn verification_mode(doc: &toml::Table) -> (VerificationMode, Option<String>) {
    let section = match doc.get("image_verification") {
        None => return (VerificationMode::Enforce, None),
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return (
                VerificationMode::Enforce,
                Some(format!(
                    "[image_verification] is a {} instead of a table; verification mode is ENFORCE",
                    other.type_str()
                )),
            )
        }
    };
    let mut warning = None;
    for k in section.keys() {
        if k != "mode" {
            warning = Some(format!("unknown key image_verification.{k} ignored"));
        }
    }
    match section.get("mode") {
        None => (VerificationMode::Enforce, warning),
        Some(toml::Value::String(s)) => match s.as_str() {
            "off" => (VerificationMode::Off, warning),
            "warn" => (VerificationMode::Warn, warning),
            "enforce" => (VerificationMode::Enforce, warning),
            other => (
                VerificationMode::Enforce,
                Some(format!(
                    "image_verification.mode = {other:?} is not one of off | warn | enforce; verification mode is ENFORCE"
                )),
            ),
        },
        Some(v) => (
            VerificationMode::Enforce,
            Some(format!(
                "image_verification.mode is a {} (expected \"off\", \"warn\" or \"enforce\"); verification mode is ENFORCE",
                v.type_str()
            )),
        ),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    /// `""` turns the metrics listener off.
    metrics_listen: Option<String>,
    #[serde(default)]
    tls: RawTls,
    /// Parsed separately by [`verification_mode`]; kept loose here.
    #[allow(dead_code)]
    image_verification: Option<toml::Value>,
    #[serde(default)]
    limits: RawLimits,
    /// Continuous mirroring jobs, validated by `schedule::parse_jobs`.
    #[serde(default)]
    mirror: Vec<toml::Table>,
    #[serde(default)]
    gc: RawGc,
    #[serde(default)]
    retention: Vec<RawRetention>,
    #[serde(default)]
    scrub: RawScrub,
    #[serde(default)]
    storage: storage::RawStorage,
    #[serde(default)]
    transparency_log: witness::RawTransparencyLog,
    witness: Option<witness::RawWitness>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGc {
    interval: Option<String>,
    grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    images: String,
    keep_latest: Option<usize>,
    min_age: Option<String>,
}

/// Default `[gc] grace`: an Incus client caches a Simple Streams index for up
/// to an hour, and a daemon may be in the middle of a long download; a day
/// covers both with room to spare, and gives an operator who retired the
/// wrong version a day to notice before its bytes go.
pub const DEFAULT_GC_GRACE: &str = "24h";
/// Default `[gc] interval`.
pub const DEFAULT_GC_INTERVAL: &str = "24h";

/// `[gc]`: the periodic garbage collection inside `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcConfig {
    /// `None`: no periodic run (`interval = "off"`).
    pub interval: Option<std::time::Duration>,
    /// How long an unreferenced blob, and the bytes of a retired version,
    /// are kept before they are collected.
    pub grace: std::time::Duration,
}

/// One `[[retention]]` rule: of the published versions of the images matching
/// `images` (a glob), keep the newest `keep_latest` and any younger than
/// `min_age`; garbage collection retires the rest, except a version an alias
/// points at. The first rule that matches an image applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub images: String,
    pub keep_latest: usize,
    pub min_age: std::time::Duration,
}

/// Parses a duration: `0`, or a whole number with a unit `s`, `m`, `h`, `d`
/// (`90s`, `15m`, `24h`, `30d`).
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let s = s.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .with_context(|| format!("duration {s:?}: expected e.g. 0, 90s, 15m, 24h, 30d"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("duration {s:?}: the unit must be s, m, h or d (e.g. 24h)"),
    };
    let secs = n
        .checked_mul(mul)
        .with_context(|| format!("duration {s:?} is too long"))?;
    Ok(std::time::Duration::from_secs(secs))
}

fn gc_config(raw: RawGc) -> anyhow::Result<GcConfig> {
    let grace =
        parse_duration(raw.grace.as_deref().unwrap_or(DEFAULT_GC_GRACE)).context("[gc] grace")?;
    let interval = match raw.interval.as_deref().unwrap_or(DEFAULT_GC_INTERVAL) {
        "off" => None,
        s => {
            let d = parse_duration(s).context("[gc] interval")?;
            if d < std::time::Duration::from_secs(60) {
                bail!("[gc] interval {s:?}: at least 1m (or \"off\")");
            }
            Some(d)
        }
    };
    Ok(GcConfig { interval, grace })
}

fn retention_rules(raw: Vec<RawRetention>) -> anyhow::Result<Vec<RetentionRule>> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("[[retention]] #{} (images = {:?})", i + 1, r.images);
            glob::Pattern::new(&r.images).with_context(|| format!("{at}: images is not a glob"))?;
            if r.keep_latest.is_none() && r.min_age.is_none() {
                bail!("{at}: give keep_latest, min_age or both (a rule with neither keeps nothing)");
            }
            let keep_latest = r.keep_latest.unwrap_or(0);
            if r.keep_latest == Some(0) {
                bail!("{at}: keep_latest must be at least 1 (retire a whole image with `imgsrv version retire`)");
            }
            let min_age = match &r.min_age {
                Some(s) => parse_duration(s).with_context(|| format!("{at}: min_age"))?,
                None => std::time::Duration::ZERO,
            };
            Ok(RetentionRule {
                images: r.images,
                keep_latest,
                min_age,
            })
        })
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScrub {
    interval: Option<String>,
    rate: Option<String>,
    sample: Option<toml::Value>,
}

/// How often `serve` scrubs by default: weekly (see [`ScrubSchedule`]).
pub const DEFAULT_SCRUB_INTERVAL: &str = "7d";
/// How fast a periodic scrub reads by default.
pub const DEFAULT_SCRUB_RATE: &str = "50MB/s";

/// `[scrub]`: the periodic scrub inside `serve` (`crate::maint::scrub`).
///
/// On by default, weekly, at most 50 MB/s, every blob: a flipped bit is
/// silent (the bytes are served as if nothing happened) until a client's
/// install fails, and only reading everything back finds it; 50 MB/s covers
/// 30 TB a week, far more than a store of this kind holds, while leaving
/// the disk to the downloads. `interval = "off"` turns it off (run `imgsrv
/// scrub` from cron instead); `rate = "unlimited"` lifts the limit.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrubSchedule {
    /// `None`: off.
    pub interval: Option<std::time::Duration>,
    /// Bytes per second; `None`: unlimited.
    pub rate: Option<u64>,
    /// Percent of the blobs re-hashed each run, in (0, 100].
    pub sample_percent: f64,
}

impl ScrubSchedule {
    fn parse(raw: RawScrub) -> anyhow::Result<ScrubSchedule> {
        let interval = match raw.interval.as_deref().unwrap_or(DEFAULT_SCRUB_INTERVAL) {
            "off" => None,
            s => Some(crate::schedule::parse_interval(s).context("scrub.interval")?),
        };
        let rate = match raw.rate.as_deref().unwrap_or(DEFAULT_SCRUB_RATE) {
            "unlimited" => None,
            s => Some(crate::maint::scrub::parse_rate(s).context("scrub.rate")?),
        };
        let sample_percent = match raw.sample {
            None => 100.0,
            Some(toml::Value::Integer(n)) => n as f64,
            Some(toml::Value::Float(f)) => f,
            Some(v) => bail!("scrub.sample = {v}: a percentage such as 100 or 10"),
        };
        crate::maint::scrub::parse_sample(&sample_percent.to_string()).context("scrub.sample")?;
        Ok(ScrubSchedule {
            interval,
            rate,
            sample_percent,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    names: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_workers: Option<usize>,
}

/// Validated configuration with paths resolved against the data directory.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `metrics_listen`: where `GET /metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// True when cert/key come from the config (never generated).
    pub tls_configured: bool,
    pub tls_names: Vec<String>,
    pub verification: VerificationMode,
    /// `[limits]`: open connections and requests processed at once; `None`: the
    /// connection engine's defaults.
    pub max_connections: Option<usize>,
    pub max_workers: Option<usize>,
    /// `[[mirror]]` entries (see `schedule`).
    pub mirrors: Vec<toml::Table>,
    pub gc: GcConfig,
    pub retention: Vec<RetentionRule>,
    /// `[scrub]`.
    pub scrub: ScrubSchedule,
    /// `[storage]`: the catalog's and the blobs' backends.
    pub storage: StorageConfig,
    /// `[transparency_log] witnesses`: asked to cosign the log's checkpoints.
    pub log_witnesses: Vec<LogWitness>,
    /// `[witness]`: the logs this server witnesses.
    pub witness: Option<WitnessConfig>,
    /// Problems that did not stop loading (printed loudly at start).
    pub warnings: Vec<String>,
}

impl Config {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(CONFIG_FILE)
    }

    /// Loads `DATA_DIR/imgsrv.toml` (defaults when absent). `listen` overrides
    /// the file's listen address.
    pub fn load(data_dir: &Path, listen: Option<&str>) -> anyhow::Result<Config> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(data_dir, &text, listen).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(data_dir: &Path, text: &str, listen: Option<&str>) -> anyhow::Result<Config> {
        let doc: toml::Table = text.parse().context("not valid TOML")?;
        let (verification, warning) = verification_mode(&doc);
        let raw: RawConfig = toml::from_str(text).context("invalid configuration")?;
        let listen_s = listen
            .map(str::to_string)
            .or(raw.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_s.parse().with_context(|| {
            format!("listen address {listen_s:?} is not IP:PORT (e.g. 0.0.0.0:8443 or [::]:8443)")
        })?;
        let metrics_listen = parse_metrics_listen(
            raw.metrics_listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )?;
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { data_dir.join(p) };
        let tls_configured = raw.tls.cert.is_some() || raw.tls.key.is_some();
        if raw.tls.cert.is_some() != raw.tls.key.is_some() {
            bail!("[tls] needs both cert and key (or neither, for the generated self-signed certificate)");
        }
        let tls_cert = resolve(
            raw.tls
                .cert
                .unwrap_or_else(|| PathBuf::from("tls/cert.pem")),
        );
        let tls_key = resolve(raw.tls.key.unwrap_or_else(|| PathBuf::from("tls/key.pem")));
        for (name, v) in [
            ("max_connections", raw.limits.max_connections),
            ("max_workers", raw.limits.max_workers),
        ] {
            if v == Some(0) {
                bail!("limits.{name} must be at least 1");
            }
        }
        Ok(Config {
            data_dir: data_dir.to_path_buf(),
            listen,
            metrics_listen,
            tls_cert,
            tls_key,
            tls_configured,
            tls_names: raw.tls.names,
            verification,
            max_connections: raw.limits.max_connections,
            max_workers: raw.limits.max_workers,
            mirrors: raw.mirror,
            gc: gc_config(raw.gc)?,
            retention: retention_rules(raw.retention)?,
            scrub: ScrubSchedule::parse(raw.scrub)?,
            storage: StorageConfig::parse(raw.storage, data_dir)?,
            log_witnesses: witness::log_witnesses(raw.transparency_log, data_dir)?,
            witness: witness::witness(raw.witness)?,
            warnings: warning.into_iter().collect(),
        })
    }
}

/// A `metrics_listen` value (the file's, or `serve --metrics-listen`): `IP:PORT`, or
/// `""` for no metrics listener (`None`).
pub fn parse_metrics_listen(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).with_context(|| {
        format!(
            "metrics_listen {s:?} is not IP:PORT (e.g. {DEFAULT_METRICS_LISTEN}), nor \"\" to \
             turn the metrics listener off"
        )
    })
}

/// The default configuration file written by `imgsrv init`.
pub fn default_file() -> String {
    format!(
        r#"# imgsrv configuration. Paths are relative to this directory.

# Address to serve HTTPS on (plain HTTP on the same port is answered for
# artifact downloads only, which Incus clients try first).
listen = "{DEFAULT_LISTEN}"

# Prometheus metrics (plain HTTP, GET /metrics; see the README) on a listener of
# their own; "" turns it off. Not authenticated: keep it on loopback or a
# network only your monitoring reaches. A port already taken is logged and the
# server serves without metrics.
metrics_listen = "{DEFAULT_METRICS_LISTEN}"

[tls]
# A certificate of your own; without these, imgsrv generates a self-signed
# one in tls/ on first start.
# cert = "/etc/imgsrv/cert.pem"
# key = "/etc/imgsrv/key.pem"
# Extra host names or IPs for the generated certificate.
# names = ["images.example.org"]

[image_verification]
# Signature check at publish time: "enforce" (default) refuses unsigned or
# wrongly signed publications; "warn" logs and publishes; "off" skips it.
# An unreadable value means "enforce". There is no API to change this.
mode = "enforce"

[limits]
# Open connections at most (idle and half-open ones cost a few KiB each, no
# thread); at the limit the waiting connection nearest its timeout is closed
# first. Also bounded by the file descriptor limit (ulimit -n).
# max_connections = 16384
# Requests processed at once (worker threads, started on demand); complete
# requests beyond it wait for a worker.
# max_workers = 256

# Continuous mirroring: `imgsrv serve` runs each [[mirror]] job at start and
# then every `interval`, publishing into this server (the mirror key's public
# half must be trusted here: `imgsrv key add`). `imgsrv mirrors` shows them.
# [[mirror]]
# name = "debian"
# upstream = "https://images.linuxcontainers.org"
# key = "/etc/imgsrv/mirror.key"
# interval = "6h"
# os = "debian"
# latest = 2

[gc]
# Garbage collection inside `imgsrv serve`: expired uploads, crash leftovers,
# blobs nothing refers to, and the bytes of retired versions, once they are
# older than `grace` (clients cache the index for up to an hour). "off" stops
# the periodic run; `imgsrv gc` runs it by hand.
# interval = "{DEFAULT_GC_INTERVAL}"
# grace = "{DEFAULT_GC_GRACE}"

# Retention: garbage collection retires the published versions of matching
# images beyond the newest `keep_latest` that are older than `min_age`, never
# one an alias points at. The first matching rule applies.
# [[retention]]
# images = "debian-*"
# keep_latest = 3
# min_age = "30d"
[scrub]
# `imgsrv serve` re-reads every blob and re-checks every signature this
# often (first at start when it never ran), quarantining damaged blobs; see
# `imgsrv scrub`. "off" turns it off.
# interval = "{DEFAULT_SCRUB_INTERVAL}"
# At most this read rate, so that downloads keep the disk ("unlimited": none).
# rate = "{DEFAULT_SCRUB_RATE}"
# Percent of the blobs re-hashed each run.
# sample = 100

# Where the catalog and the blobs live. The default is this directory
# (catalog.db, sha256/). A full deployment (an imgsrv built with
# `--features full`; several instances may share them) names a PostgreSQL
# database and an S3 bucket (Garage, MinIO, AWS); see docs/deployment.md.
# [storage]
# catalog = "postgres"
# postgres_url = "postgresql://imgsrv@127.0.0.1:5432/imgsrv"
# blobs = "s3"
# [storage.s3]
# endpoint = "http://127.0.0.1:3900"
# bucket = "imgsrv"
# region = "garage"
# access_key_id = "GK..."
# secret_access_key_file = "/etc/imgsrv/s3.secret"
# path_style = true
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(text: &str) -> (VerificationMode, Option<String>) {
        verification_mode(&text.parse::<toml::Table>().unwrap())
    }

    #[test]
    fn verification_mode_fails_closed() {
        assert_eq!(mode("").0, VerificationMode::Enforce);
        assert_eq!(mode("[image_verification]").0, VerificationMode::Enforce);
        assert_eq!(
            mode("[image_verification]\nmode = \"warn\"").0,
            VerificationMode::Warn
        );
        assert_eq!(
            mode("[image_verification]\nmode = \"off\"").0,
            VerificationMode::Off
        );
        assert_eq!(
            mode("[image_verification]\nmode = \"enforce\"").0,
            VerificationMode::Enforce
        );
        for bad in [
            "[image_verification]\nmode = \"Off\"",
            "[image_verification]\nmode = \"disabled\"",
            "[image_verification]\nmode = 0",
            "[image_verification]\nmode = false",
            "[image_verification]\nmode = [\"off\"]",
            "image_verification = \"off\"",
        ] {
            let (m, w) = mode(bad);
            assert_eq!(m, VerificationMode::Enforce, "{bad}");
            assert!(w.unwrap().contains("ENFORCE"), "{bad}");
        }
    }

    #[test]
    fn strict_config_with_defaults() {
        let d = Path::new("/data");
        let c = Config::parse(d, "", None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.tls_cert, Path::new("/data/tls/cert.pem"));
        assert_eq!(c.verification, VerificationMode::Enforce);
        let c = Config::parse(d, &default_file(), Some("127.0.0.1:9")).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9");
        assert!(!c.tls_configured);
        assert!(
            Config::parse(d, "listne = \"x\"", None).is_err(),
            "unknown keys are refused"
        );
        assert!(Config::parse(d, "listen = \"nowhere\"", None).is_err());
        assert!(Config::parse(d, "[tls]\ncert = \"a.pem\"", None).is_err());
        assert!(Config::parse(d, "this is not toml", None).is_err());
        let c = Config::parse(d, "[tls]\ncert = \"/c.pem\"\nkey = \"k.pem\"", None).unwrap();
        assert!(c.tls_configured);
        assert_eq!(c.tls_key, Path::new("/data/k.pem"));
        assert_eq!(c.gc.grace, std::time::Duration::from_secs(86400));
        assert_eq!(c.gc.interval, Some(std::time::Duration::from_secs(86400)));
        let c = Config::parse(
            d,
            "[gc]\ninterval = \"off\"\ngrace = \"0\"\n[[retention]]\nimages = \"debian-*\"\nkeep_latest = 2\nmin_age = \"30d\"",
            None,
        )
        .unwrap();
        assert_eq!(c.gc.interval, None);
        assert_eq!(c.gc.grace, std::time::Duration::ZERO);
        assert_eq!(c.retention[0].keep_latest, 2);
        assert_eq!(c.retention[0].min_age.as_secs(), 30 * 86400);
        for bad in [
            "[gc]\ngrace = \"1y\"",
            "[gc]\ninterval = \"10s\"",
            "[gc]\ngrace = \"-1h\"",
            "[[retention]]\nimages = \"a\"",
            "[[retention]]\nimages = \"a\"\nkeep_latest = 0",
            "[[retention]]\nimages = \"[\"\nkeep_latest = 1",
            "[[retention]]\nimages = \"a\"\nkeep = 1",
        ] {
            assert!(Config::parse(d, bad, None).is_err(), "{bad}");
        }
        assert_eq!(
            c.metrics_listen.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_METRICS_LISTEN)
        );
        let c = Config::parse(d, "metrics_listen = \"\"", None).unwrap();
        assert_eq!(c.metrics_listen, None);
        let c = Config::parse(d, "metrics_listen = \"[::1]:0\"", None).unwrap();
        assert_eq!(c.metrics_listen.unwrap().to_string(), "[::1]:0");
        let e = Config::parse(d, "metrics_listen = \"9464\"", None).unwrap_err();
        assert!(format!("{e:#}").contains("metrics_listen"), "{e:#}");
        let c = Config::parse(d, "[image_verification]\nmode = 3", None).unwrap();
        assert_eq!(c.verification, VerificationMode::Enforce);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn scrub_is_weekly_and_rate_limited_unless_configured() {
        let d = Path::new("/data");
        let c = Config::parse(d, "", None).unwrap();
        assert_eq!(
            c.scrub,
            ScrubSchedule {
                interval: Some(std::time::Duration::from_secs(7 * 86400)),
                rate: Some(50_000_000),
                sample_percent: 100.0,
            }
        );
        let c = Config::parse(
            d,
            "[scrub]\ninterval = \"off\"\nrate = \"unlimited\"\nsample = 12.5",
            None,
        )
        .unwrap();
        assert_eq!((c.scrub.interval, c.scrub.rate), (None, None));
        assert_eq!(c.scrub.sample_percent, 12.5);
        let c = Config::parse(d, "[scrub]\ninterval = \"1d\"\nsample = 10", None).unwrap();
        assert_eq!(c.scrub.sample_percent, 10.0);
        for bad in [
            "[scrub]\ninterval = \"sometimes\"",
            "[scrub]\ninterval = \"10s\"",
            "[scrub]\nrate = \"fast\"",
            "[scrub]\nsample = 0",
            "[scrub]\nsample = \"all\"",
            "[scrub]\nevery = \"1d\"",
        ] {
            assert!(Config::parse(d, bad, None).is_err(), "{bad}");
        }
    }
}
