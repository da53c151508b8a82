//! Prometheus metrics: one registry for the process, small typed recording functions
//! the rest of the code calls ([`request_started`], [`job_finished`], ...), and the
//! listener that serves them ([`start_listener`]: `metrics_listen` in `imgsrv.toml`,
//! plain HTTP, `GET /metrics` only).
//!
//! The exposition is written by `prometheus-client`: OpenMetrics 1.0 to a scraper that
//! asks for it (`Accept: application/openmetrics-text`, as Prometheus does), else the
//! Prometheus text format 0.0.4 (what `curl` and `promtool check metrics` read).
//!
//! Names follow the original imgsrv's (OpenTelemetry's `http.server.*` under the
//! `imgsrv_` prefix, its `imgsrv_cas_*` gauges and `imgsrv_background_job_*` series).
//! Every label is bounded: route *patterns* (`/v1/images/{name}`, never a raw path),
//! methods the engine knows (else `other`), status codes, and fixed words for outcomes,
//! jobs and reasons; no names, ids, digests or principals. The full list is in the
//! README ("Metrics").

use crate::app::App;
use crate::http::message::{Body, Request, Response};
use crate::http::server::{self, Answered, HandshakeFailure, Observer, Server, ServerConfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

/// Content type of the OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text exposition (version 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Request durations, in seconds: OpenTelemetry's default boundaries for
/// `http.server.request.duration`, then longer ones for image downloads.
const DURATION_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Methods that get their own label value; anything else is `other`.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobOutcomeLabels {
    job: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type Timestamp = Gauge<f64, AtomicU64>;
type DurationFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    request_duration: DurationFamily,
    active_requests: Gauge,
    response_bytes: Family<RouteLabel, Counter>,
    uploads: Family<OutcomeLabel, Counter>,
    publishes: Family<OutcomeLabel, Counter>,
    job_attempts: Family<JobOutcomeLabels, Counter>,
    job_last_success: Family<JobLabel, Timestamp>,
    job_last_error: Family<JobLabel, Timestamp>,
    cas_blobs: Gauge,
    cas_blob_bytes: Gauge,
    tls_handshake_failures: Family<ReasonLabel, Counter>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("imgsrv");
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "The imgsrv version running (value 1)",
            build_info,
        );
        let m = Metrics {
            registry,
            request_duration: Family::new_with_constructor(duration_histogram),
            active_requests: Gauge::default(),
            response_bytes: Family::default(),
            uploads: Family::default(),
            publishes: Family::default(),
            job_attempts: Family::default(),
            job_last_success: Family::default(),
            job_last_error: Family::default(),
            cas_blobs: Gauge::default(),
            cas_blob_bytes: Gauge::default(),
            tls_handshake_failures: Family::default(),
        };
        // outcomes known in advance start at 0, so that rate() and absent() work from
        // the first scrape
        for outcome in UploadOutcome::ALL {
            let _ = m.uploads.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            });
        }
        for outcome in PublishOutcome::ALL {
            let _ = m.publishes.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            });
        }
        for reason in ["error", "timeout", "evicted"] {
            let _ = m
                .tls_handshake_failures
                .get_or_create(&ReasonLabel { reason });
        }
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP requests on the API listener, from a complete request head to \
             the end of the response, by method, route pattern and status",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register(
            "http_server_active_requests",
            "HTTP requests being handled now (handler running or response being written)",
            self.active_requests.clone(),
        );
        r.register_with_unit(
            "http_server_response_body",
            "Response body bytes sent in full, by route pattern",
            Unit::Bytes,
            self.response_bytes.clone(),
        );
        r.register(
            "uploads",
            "Upload sessions finished, by outcome: stored (complete, digest checked), \
             already_stored (the blob was there at begin or when it was sent whole), failed (parts did not add up to \
             the declared digest and size), aborted, error (could not be carried out)",
            self.uploads.clone(),
        );
        r.register(
            "publishes",
            "Publications (API, mirror jobs, imports), by outcome: published, refused \
             (a precondition or the signature check), error",
            self.publishes.clone(),
        );
        r.register(
            "background_job_attempts",
            "Runs of background and maintenance jobs (mirror, gc, scrub, backup), by job \
             and outcome (success, error)",
            self.job_attempts.clone(),
        );
        r.register_with_unit(
            "background_job_last_success_timestamp",
            "When a job last ran successfully (Unix time)",
            Unit::Seconds,
            self.job_last_success.clone(),
        );
        r.register_with_unit(
            "background_job_last_error_timestamp",
            "When a job last failed (Unix time)",
            Unit::Seconds,
            self.job_last_error.clone(),
        );
        r.register(
            "cas_blobs",
            "Blobs recorded in the catalog (read at each scrape)",
            self.cas_blobs.clone(),
        );
        r.register_with_unit(
            "cas_blob",
            "Bytes of the blobs recorded in the catalog (read at each scrape)",
            Unit::Bytes,
            self.cas_blob_bytes.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes on the API listener that did not complete, by reason: error \
             (protocol error, an alert from the client such as an untrusted certificate, \
             or a close mid-handshake), timeout, evicted (closed to admit a new connection)",
            self.tls_handshake_failures.clone(),
        );
        self
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// A handler started on a request.
pub fn request_started() {
    metrics().active_requests.inc();
}

/// That request's response was written (or writing it failed).
pub fn request_ended() {
    metrics().active_requests.dec();
}

/// A response went out on the API listener.
pub fn request_done(method: &str, route: &'static str, status: u16, body_bytes: u64, secs: f64) {
    let m = metrics();
    m.request_duration
        .get_or_create(&RequestLabels {
            method: method_label(method),
            route,
            status,
        })
        .observe(secs);
    if body_bytes > 0 {
        m.response_bytes
            .get_or_create(&RouteLabel { route })
            .inc_by(body_bytes);
    }
}

/// A TLS handshake on the API listener did not complete.
pub fn tls_handshake_failed(why: HandshakeFailure) {
    let reason = match why {
        HandshakeFailure::Error => "error",
        HandshakeFailure::Timeout => "timeout",
        HandshakeFailure::Evicted => "evicted",
    };
    metrics()
        .tls_handshake_failures
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// How an upload session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Completed: the parts were joined, their digest and size checked, the blob stored.
    Stored,
    /// The blob was already stored when the upload began (nothing to send).
    AlreadyStored,
    /// The parts did not make the declared digest and size: the session failed.
    Failed,
    Aborted,
    /// The completion could not be carried out (a full disk, a store error).
    Error,
}

impl UploadOutcome {
    const ALL: [UploadOutcome; 5] = [
        UploadOutcome::Stored,
        UploadOutcome::AlreadyStored,
        UploadOutcome::Failed,
        UploadOutcome::Aborted,
        UploadOutcome::Error,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UploadOutcome::Stored => "stored",
            UploadOutcome::AlreadyStored => "already_stored",
            UploadOutcome::Failed => "failed",
            UploadOutcome::Aborted => "aborted",
            UploadOutcome::Error => "error",
        }
    }
}

pub fn upload_finished(outcome: UploadOutcome) {
    metrics()
        .uploads
        .get_or_create(&OutcomeLabel {
            outcome: outcome.as_str(),
        })
        .inc();
}

/// How a publication ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    Published,
    /// A precondition or the signature check refused it (it stays a draft).
    Refused,
    /// It could not be carried out (catalog or blob store error, full disk).
    Error,
}

impl PublishOutcome {
    const ALL: [PublishOutcome; 3] = [
        PublishOutcome::Published,
        PublishOutcome::Refused,
        PublishOutcome::Error,
    ];

    fn as_str(self) -> &'static str {
        match self {
            PublishOutcome::Published => "published",
            PublishOutcome::Refused => "refused",
            PublishOutcome::Error => "error",
        }
    }
}

pub fn publish_finished(outcome: PublishOutcome) {
    metrics()
        .publishes
        .get_or_create(&OutcomeLabel {
            outcome: outcome.as_str(),
        })
        .inc();
}

/// Job names for [`job_finished`].
pub const JOB_MIRROR: &str = "mirror";
pub const JOB_GC: &str = "gc";
pub const JOB_SCRUB: &str = "scrub";
pub const JOB_BACKUP: &str = "backup";

/// A run of background job `job` (one of the `JOB_*` names) ended: `ok` when it did all
/// it had to.
pub fn job_finished(job: &'static str, ok: bool) {
    let m = metrics();
    let outcome = if ok { "success" } else { "error" };
    m.job_attempts
        .get_or_create(&JobOutcomeLabels { job, outcome })
        .inc();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let last = if ok {
        &m.job_last_success
    } else {
        &m.job_last_error
    };
    last.get_or_create(&JobLabel { job }).set(now);
}

/// The last runs the catalog records (`imgsrv gc|scrub|backup` from cron as well
/// as inside this server), read when a scrape comes in: the last success and error
/// timestamps of those jobs are the catalog's, wherever they ran.
pub fn set_job_runs(runs: &[crate::catalog::JobRun]) {
    let m = metrics();
    let secs = |t: &Option<String>| {
        t.as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis() as f64 / 1000.0)
    };
    for r in runs {
        let Some(job) = [JOB_GC, JOB_SCRUB, JOB_BACKUP]
            .into_iter()
            .find(|j| *j == r.job)
        else {
            continue;
        };
        if let Some(t) = secs(&r.last_success_at) {
            m.job_last_success.get_or_create(&JobLabel { job }).set(t);
        }
        if let Some(t) = secs(&r.last_error_at) {
            m.job_last_error.get_or_create(&JobLabel { job }).set(t);
        }
    }
}

/// The catalog's blob count and bytes, read when a scrape comes in.
pub fn set_blob_totals(count: u64, bytes: u64) {
    let m = metrics();
    m.cas_blobs.set(i64::try_from(count).unwrap_or(i64::MAX));
    m.cas_blob_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// The exposition of every metric: OpenMetrics (with its `# EOF`) or the Prometheus
/// text format.
pub fn encode(openmetrics: bool) -> String {
    let mut out = String::new();
    let r = &metrics().registry;
    let written = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, r)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, r)
    };
    if let Err(e) = written {
        // only a fmt::Write into a String: cannot fail
        log::error!("encoding the metrics: {e}");
    }
    out
}

/// Feeds the API listener's engine events into the registry.
#[derive(Debug)]
pub struct EngineObserver;

impl Observer for EngineObserver {
    fn request_started(&self) {
        request_started();
    }
    fn request_ended(&self) {
        request_ended();
    }
    fn answered(&self, a: &Answered<'_>) {
        request_done(
            a.method,
            a.route,
            a.status,
            a.body_bytes,
            a.elapsed.as_secs_f64(),
        );
    }
    fn handshake_failed(&self, why: HandshakeFailure) {
        tls_handshake_failed(why);
    }
}

/// The metrics listener's handler: `GET|HEAD /metrics`, 404 elsewhere, 405 for other
/// methods. The blob gauges are read from the catalog at each scrape.
pub fn handle(app: &App, req: &Request<'_>) -> Response {
    let text = |status: u16, msg: &str| {
        Response::new(status)
            .with_header("Content-Type", "text/plain; charset=utf-8")
            .with_body(Body::Bytes(format!("{msg}\n").into_bytes()))
    };
    if req.path != "/metrics" {
        return text(404, "not found: the metrics are at /metrics");
    }
    if !matches!(req.method.as_str(), "GET" | "HEAD") {
        return text(405, "method not allowed: GET /metrics").with_header("Allow", "GET, HEAD");
    }
    match app.catalog.blob_totals() {
        Ok((count, bytes)) => set_blob_totals(count, bytes),
        Err(e) => log::warn!("metrics: reading the blob totals from the catalog: {e}"),
    }
    match app.catalog.job_runs() {
        Ok(runs) => set_job_runs(&runs),
        Err(e) => log::warn!("metrics: reading the maintenance jobs' last runs: {e}"),
    }
    let openmetrics = req.header("accept").is_some_and(|a| {
        a.split(',').any(|t| {
            t.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/openmetrics-text")
            })
        })
    });
    let (body, ctype) = if openmetrics {
        (encode(true), OPENMETRICS_CONTENT_TYPE)
    } else {
        (encode(false), PROMETHEUS_CONTENT_TYPE)
    };
    Response::new(200)
        .with_header("Content-Type", ctype)
        .with_header("Cache-Control", "no-store")
        .with_body(Body::Bytes(body.into_bytes()))
}

/// The metrics listener, running on its own threads until [`MetricsListener::stop`].
pub struct MetricsListener {
    pub addr: SocketAddr,
    shutdown: server::ShutdownHandle,
    thread: std::thread::JoinHandle<()>,
}

impl MetricsListener {
    pub fn stop(self) {
        self.shutdown.shutdown();
        if self.thread.join().is_err() {
            log::error!("the metrics listener's thread panicked");
        }
    }
}

/// Starts serving `/metrics` on `addr` (plain HTTP, a few connections and workers). A
/// listener that cannot be had (the port is taken) is logged with what to change, and
/// the server goes on without metrics: `None`.
pub fn start_listener(addr: SocketAddr, app: Arc<App>) -> Option<MetricsListener> {
    let server = match Server::bind(ServerConfig {
        listen: addr,
        tls: None,
        max_connections: 64,
        max_workers: 2,
        ..ServerConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "metrics are NOT served: cannot listen on {addr} ({e}); set metrics_listen in \
                 imgsrv.toml to a free address (or \"\" to turn metrics off)"
            );
            return None;
        }
    };
    let addr = server.local_addr();
    let shutdown = server.shutdown_handle();
    let handler: server::Handler = Arc::new(move |req| handle(&app, req));
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            if let Err(e) = server.run(handler) {
                log::error!("the metrics listener stopped: {e}");
            }
        });
    match thread {
        Ok(thread) => Some(MetricsListener {
            addr,
            shutdown,
            thread,
        }),
        Err(e) => {
            log::warn!("metrics are NOT served: cannot start their thread: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_known_set_share_one_label() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("DELETE"), "DELETE");
        assert_eq!(method_label("BREW"), "other");
        assert_eq!(method_label("get"), "other");
    }

    #[test]
    fn both_expositions_carry_the_series() {
        job_finished(JOB_GC, true);
        let om = encode(true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("imgsrv_background_job_attempts_total{job=\"gc\",outcome=\"success\"}"));
        let prom = encode(false);
        assert!(!prom.contains("# EOF"));
        assert!(
            prom.contains("# TYPE imgsrv_uploads_total counter"),
            "{prom}"
        );
        assert!(prom.contains("imgsrv_background_job_last_success_timestamp_seconds{job=\"gc\"}"));
    }
}
