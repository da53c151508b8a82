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

pub const CONFIG_FILE: &str = "imgsrv.toml";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";

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
    scrub: RawScrub,
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
    /// `[scrub]`.
    pub scrub: ScrubSchedule,
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
            tls_cert,
            tls_key,
            tls_configured,
            tls_names: raw.tls.names,
            verification,
            max_connections: raw.limits.max_connections,
            max_workers: raw.limits.max_workers,
            mirrors: raw.mirror,
            scrub: ScrubSchedule::parse(raw.scrub)?,
            warnings: warning.into_iter().collect(),
        })
    }
}

/// The default configuration file written by `imgsrv init`.
pub fn default_file() -> String {
    format!(
        r#"# imgsrv configuration. Paths are relative to this directory.

# Address to serve HTTPS on (plain HTTP on the same port is answered for
# artifact downloads only, which Incus clients try first).
listen = "{DEFAULT_LISTEN}"

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

[scrub]
# `imgsrv serve` re-reads every blob and re-checks every signature this
# often (first at start when it never ran), quarantining damaged blobs; see
# `imgsrv scrub`. "off" turns it off.
# interval = "{DEFAULT_SCRUB_INTERVAL}"
# At most this read rate, so that downloads keep the disk ("unlimited": none).
# rate = "{DEFAULT_SCRUB_RATE}"
# Percent of the blobs re-hashed each run.
# sample = 100
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
