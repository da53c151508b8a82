//! Blocking client of the imgsrv HTTP API (docs/api.md), used by
//! `imgsrv publish` and the other client commands.
//!
//! HTTPS only. TLS roots are the `--ca` PEM when given, else the system
//! store. HTTP statuses are not transport errors: a non-2xx answer becomes
//! [`ClientError::Api`] carrying the problem+json `detail`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Deserializer, Serialize};
use ureq::http::{self, StatusCode};
use ureq::tls::RootCerts;

use crate::digest::{Digest, Hasher};

/// Files up to this size are sent as a single part.
pub const SINGLE_PART_MAX: u64 = 4 << 30;
/// Part size for larger files.
pub const PART_SIZE: u64 = 1 << 30;
/// JSON responses larger than this are refused.
const MAX_JSON_RESPONSE: u64 = 64 << 20;
/// Error bodies are read up to this size.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// A request's error and, for a 503, how long the server asked to wait.
type Refused = (ClientError, Option<Duration>);
/// How long a request answered 503 is sent again ([`ApiClient::send`]).
const RETRY_503_FOR: Duration = Duration::from_secs(60);
/// System CA bundles, first found wins (after `SSL_CERT_FILE`).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine, BSDs
];

/// Path segment encoding: everything but unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("refusing server URL {0:?}: plain http:// is not allowed, use https://")]
    NotHttps(String),
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid API token: {0}")]
    InvalidToken(String),
    #[error("CA certificate file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("{method} {url}: HTTP {status}: {detail}")]
    Api {
        method: String,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{method} {url}: {source}")]
    Transport {
        method: String,
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{method} {url}: unexpected response: {reason}")]
    Protocol {
        method: String,
        url: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: the file changed while it was being uploaded ({reason})")]
    FileChanged { path: PathBuf, reason: String },
    #[error("{method} {url}: writing the response body: {source}")]
    Sink {
        method: String,
        url: String,
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Accepts ids sent as JSON strings or integers.
fn id_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(i64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    })
}

// ---- Wire types (docs/api.md). Unknown fields are ignored. ----

#[derive(Debug, Clone, Deserialize)]
pub struct UploadSession {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    pub expected_digest: Digest,
    pub expected_size_bytes: u64,
    /// `created`, `uploading`, `ready`, `failed` or `aborted`.
    pub state: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub media_type_hint: Option<String>,
    #[serde(default)]
    pub filename_hint: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UploadPart {
    #[serde(deserialize_with = "id_string")]
    pub upload_id: String,
    pub part_number: u32,
    /// `sha256:<hex of the part>` (possibly quoted like an HTTP ETag).
    pub etag: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BeginUpload {
    pub expected_digest: Digest,
    pub expected_size_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type_hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename_hint: Option<String>,
    /// For a root: the metadata tarball it is published with (the server takes
    /// the Incus fingerprint while the root arrives).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incus_metadata: Option<Digest>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageVersion {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    #[serde(deserialize_with = "id_string")]
    pub image_id: String,
    pub image_name: String,
    pub version: String,
    /// `draft`, `publishing` or `published`.
    pub state: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub published_at: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

/// Body of `POST …/artifacts`.
#[derive(Debug, Clone, Serialize)]
pub struct NewArtifact {
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: Digest,
    pub primary_blob_size_bytes: u64,
    pub primary_media_type: String,
}

/// `GET /v1/images/{name}/versions/{version}` (the parts the CLI uses).
#[derive(Debug, Clone, Deserialize)]
pub struct VersionView {
    pub version: ImageVersion,
    pub artifacts: Vec<ArtifactEntry>,
    /// Present once the version is published.
    #[serde(default)]
    pub publication: Option<PublishRecord>,
}

/// One artifact of a [`VersionView`].
#[derive(Debug, Clone, Deserialize)]
pub struct ArtifactEntry {
    pub artifact: Artifact,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Artifact {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    #[serde(deserialize_with = "id_string")]
    pub version_id: String,
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: Digest,
    pub primary_blob_size_bytes: u64,
    pub primary_media_type: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

/// Body of `POST …/attachments`.
#[derive(Debug, Clone, Serialize)]
pub struct NewAttachment {
    pub name: String,
    pub media_type: String,
    pub blob_digest: Digest,
    pub blob_size_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Attachment {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    #[serde(deserialize_with = "id_string")]
    pub artifact_id: String,
    pub name: String,
    pub media_type: String,
    pub blob_digest: Digest,
    pub blob_size_bytes: u64,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Fingerprint {
    #[serde(deserialize_with = "id_string")]
    pub artifact_id: String,
    /// `container` or `virtual-machine`.
    #[serde(rename = "type")]
    pub kind: String,
    /// 64 lowercase hex digits (Incus fingerprint).
    pub fingerprint: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PublishRecord {
    pub image: String,
    pub version: String,
    pub state: String,
    #[serde(default)]
    pub published_at: Option<String>,
    pub manifest_digest: Digest,
    /// `verified`, `unverified` or `skipped`.
    pub verification: String,
    #[serde(default)]
    pub signer_key_id: Option<String>,
    /// The server's name for the signing key.
    #[serde(default)]
    pub signer_key_name: Option<String>,
    #[serde(default)]
    pub fingerprints: Vec<Fingerprint>,
}

/// One entry of `GET /v1/keys`: a publisher key the server trusts.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    /// Upper-case hex, as minisign prints it.
    pub key_id: String,
    #[serde(default)]
    pub public_key: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `active`, `retired` or `revoked`.
    pub state: String,
    #[serde(default)]
    pub retired_at: Option<String>,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Alias {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    #[serde(deserialize_with = "id_string")]
    pub image_id: String,
    pub alias: String,
    #[serde(deserialize_with = "id_string")]
    pub version_id: String,
    pub version: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Deserialize)]
struct Problem {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

/// Checks and normalizes a server URL: `https://host[:port][/prefix]`,
/// without a trailing slash. `http://` is refused.
pub fn normalize_server_url(server: &str) -> Result<String, ClientError> {
    let s = server.trim();
    let invalid = |reason: &str| ClientError::InvalidUrl {
        url: server.to_string(),
        reason: reason.to_string(),
    };
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("http://") {
        return Err(ClientError::NotHttps(server.to_string()));
    }
    if !lower.starts_with("https://") {
        return Err(invalid("expected https://host[:port]"));
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    if uri.query().is_some() || s.contains('#') {
        return Err(invalid("a query or fragment is not allowed"));
    }
    if s.contains('@') {
        return Err(invalid(
            "credentials in the URL are not allowed (use the API token)",
        ));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    Ok(format!(
        "https://{authority}{}",
        uri.path().trim_end_matches('/')
    ))
}

pub(crate) fn load_ca(path: &Path) -> Result<RootCerts, ClientError> {
    let pem = std::fs::read(path).map_err(io_err(path))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(ClientError::Ca {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        }
    }
    if certs.is_empty() {
        return Err(ClientError::Ca {
            path: path.to_path_buf(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(RootCerts::Specific(Arc::new(certs)))
}

/// An agent with `config`, trusting `ca` (pinned: [`crate::tls::pinned`])
/// when given, else the system store ([`system_roots`]).
/// `POST {prefix}/add-checkpoint` to a witness (C2SP tlog-witness) with `body`: the
/// status and the body, whatever the status (the caller reads 409's size from it).
/// Short timeouts: a log asks its witnesses while it answers a request.
pub fn witness_add_checkpoint(
    prefix: &str,
    ca: Option<&Path>,
    body: &str,
) -> Result<(u16, String), ClientError> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .https_only(true)
        .max_redirects(0)
        .user_agent(concat!("imgsrv/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(10)));
    let agent = https_agent(config, ca)?;
    let url = format!("{prefix}/add-checkpoint");
    let transport = |source| ClientError::Transport {
        method: "POST".into(),
        url: url.clone(),
        source,
    };
    let mut resp = agent
        .post(&url)
        .content_type("text/plain")
        .send(body.as_bytes())
        .map_err(transport)?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_string()
        .map_err(transport)?;
    Ok((status, text))
}

pub(crate) fn https_agent(
    config: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
    ca: Option<&Path>,
) -> Result<ureq::Agent, ClientError> {
    match ca {
        Some(p) => {
            load_ca(p)?;
            crate::tls::pinned::agent(config.build(), p).map_err(|e| ClientError::Ca {
                path: p.to_path_buf(),
                reason: format!("{e:#}"),
            })
        }
        None => {
            let roots = system_roots()?;
            crate::tls::pinned::agent_with_roots(
                config.build(),
                &roots,
                ureq::unversioned::resolver::DefaultResolver::default(),
            )
            .map_err(|e| ClientError::Ca {
                path: std::env::var_os("SSL_CERT_FILE")
                    .filter(|p| !p.is_empty())
                    .map_or_else(|| "(the system CA bundle)".into(), PathBuf::from),
                reason: format!("{e:#}"),
            })
        }
    }
}

/// The system trust store: `SSL_CERT_FILE`, else the first distribution CA
/// bundle found, else the bundled Mozilla roots.
pub(crate) fn system_roots() -> Result<RootCerts, ClientError> {
    if let Some(p) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        return load_ca(Path::new(&p));
    }
    for p in SYSTEM_CA_BUNDLES {
        let p = Path::new(p);
        if p.is_file() {
            if let Ok(roots) = load_ca(p) {
                return Ok(roots);
            }
        }
    }
    Ok(RootCerts::WebPki)
}

/// Counts bytes read, feeds them to a hasher and reports progress.
struct PartReader<'a, R> {
    inner: R,
    hasher: Hasher,
    progress: Option<&'a mut dyn FnMut(u64)>,
}

impl<R: Read> Read for PartReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if let Some(p) = self.progress.as_mut() {
            p(n as u64);
        }
        Ok(n)
    }
}

/// What [`ApiClient::upload_whole`] sent.
#[derive(Debug, Clone)]
pub struct WholeUploaded {
    pub digest: Digest,
    pub size: u64,
    /// The Incus fingerprint (hex) the server took, when metadata was named
    /// and stored whole on the server.
    pub fingerprint: Option<String>,
}

/// Hashes a file, advancing `progress` (if any) by the bytes read.
pub fn hash_file(
    path: &Path,
    progress: Option<&ProgressBar>,
) -> Result<(Digest, u64), ClientError> {
    let h = hash_file_state(path, progress)?;
    let len = h.len();
    Ok((h.finish(), len))
}

/// Like [`hash_file`], returning the hasher state (to be cloned and continued).
pub fn hash_file_state(path: &Path, progress: Option<&ProgressBar>) -> Result<Hasher, ClientError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Hasher::new();
    crate::digest::read_chunks(&mut f, |c| {
        h.update(c);
        if let Some(pb) = progress {
            pb.inc(c.len() as u64);
        }
    })
    .map_err(io_err(path))?;
    Ok(h)
}

/// How a file is cut into parts: `(offset, length)` per part, numbered from 1.
pub fn plan_parts(size: u64) -> Vec<(u64, u64)> {
    if size <= SINGLE_PART_MAX {
        return vec![(0, size)];
    }
    (0..size.div_ceil(PART_SIZE))
        .map(|i| {
            let off = i * PART_SIZE;
            (off, PART_SIZE.min(size - off))
        })
        .collect()
}

/// A blocking imgsrv API client.
pub struct ApiClient {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

enum Body<'a> {
    Empty,
    Json(Vec<u8>),
    /// A raw body: reader, length, content type.
    Stream(&'a mut dyn Read, u64, &'a str),
}

impl<'a> Body<'a> {
    /// The same body to send again; `None` for a stream, which is read once.
    fn again(&self) -> Option<Body<'a>> {
        match self {
            Body::Empty => Some(Body::Empty),
            Body::Json(v) => Some(Body::Json(v.clone())),
            Body::Stream(..) => None,
        }
    }
}

impl ApiClient {
    /// `server`: `https://host[:port]`; `ca`: PEM file of the root(s) to trust
    /// instead of the system store (e.g. the server's self-signed certificate).
    pub fn new(
        server: &str,
        ca: Option<&Path>,
        token: Option<String>,
    ) -> Result<ApiClient, ClientError> {
        let base = normalize_server_url(server)?;
        if let Some(t) = &token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ClientError::InvalidToken(
                    "it must be non-empty printable ASCII without spaces".into(),
                ));
            }
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(true)
            .max_redirects(0)
            .user_agent(concat!("imgsrv/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)));
        let agent = https_agent(config, ca)?;
        Ok(ApiClient { base, agent, token })
    }

    /// The normalized server URL.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// `/v1/` followed by the percent-encoded segments.
    fn path(segments: &[&str]) -> String {
        let mut p = String::from("/v1");
        for s in segments {
            p.push('/');
            p.extend(utf8_percent_encode(s, SEGMENT));
        }
        p
    }

    /// Sends a request; returns the status and body of a 2xx response whose
    /// status is in `ok` (any 2xx when `ok` is empty), else the matching error.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        ok: &[u16],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let (url, mut resp) = self.send(method, path, body, ok)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON_RESPONSE)
            .read_to_vec()
            .map_err(|source| ClientError::Transport {
                method: method.to_string(),
                url,
                source,
            })?;
        Ok((status, bytes))
    }

    /// Sends a request; returns the URL and the response (body unread) when
    /// its status is a 2xx in `ok` (any 2xx when `ok` is empty), else the
    /// matching error.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        ok: &[u16],
    ) -> Result<(String, http::Response<ureq::Body>), ClientError> {
        // A server whose catalog or blob store is briefly unreachable (a database
        // restart) answers 503 and changes nothing: a request that can be sent
        // again is, after its Retry-After (1 s when none, at most 10 s), for up to
        // a minute. A streamed body cannot be sent again: its 503 is the caller's.
        let deadline = Instant::now() + RETRY_503_FOR;
        let mut body = body;
        loop {
            let again = body.again();
            match (
                self.send_once(method, path, body, ok).map_err(|b| *b),
                again,
            ) {
                (Ok(r), _) => return Ok(r),
                (Err((_, Some(wait))), Some(next)) if Instant::now() + wait < deadline => {
                    eprintln!(
                        "{} answered 503 (unavailable) to {method} {path}: trying again in {} s",
                        self.base,
                        wait.as_secs()
                    );
                    std::thread::sleep(wait);
                    body = next;
                }
                (Err((e, _)), _) => return Err(e),
            }
        }
    }

    /// [`ApiClient::send`] once; with a 503, how long the server asked to wait.
    fn send_once(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        ok: &[u16],
    ) -> Result<(String, http::Response<ureq::Body>), Box<Refused>> {
        let url = format!("{}{}", self.base, path);
        let plain = |e| Box::new((e, None));
        let transport = |source| ClientError::Transport {
            method: method.to_string(),
            url: url.clone(),
            source,
        };
        let mut req = http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        fn built<B>(
            r: http::request::Builder,
            b: B,
            url: &str,
        ) -> Result<http::Request<B>, ClientError> {
            r.body(b).map_err(|e| ClientError::InvalidUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })
        }
        let resp = match body {
            Body::Empty => {
                // Some servers insist on a length for POST/PUT, even an empty one.
                if method == "POST" || method == "PUT" {
                    req = req.header("Content-Length", "0");
                }
                self.agent
                    .run(built(req, ureq::SendBody::none(), &url).map_err(plain)?)
            }
            Body::Json(v) => {
                let r = req
                    .header("Content-Type", "application/json")
                    .header("Content-Length", v.len());
                self.agent.run(
                    built(
                        r,
                        ureq::SendBody::from_owned_reader(io::Cursor::new(v)),
                        &url,
                    )
                    .map_err(plain)?,
                )
            }
            Body::Stream(reader, len, content_type) => {
                let r = req
                    .header("Content-Type", content_type)
                    .header("Content-Length", len);
                self.agent
                    .run(built(r, ureq::SendBody::from_reader(reader), &url).map_err(plain)?)
            }
        };
        let mut resp = resp.map_err(transport).map_err(plain)?;
        let status = resp.status();
        if status.is_success() && (ok.is_empty() || ok.contains(&status.as_u16())) {
            return Ok((url, resp));
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BODY)
            .read_to_vec()
            .unwrap_or_default();
        let error = ClientError::Api {
            method: method.to_string(),
            url,
            status: status.as_u16(),
            detail: problem_detail(status, &bytes),
        };
        let wait = (status.as_u16() == 503)
            .then(|| Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 10)));
        Err(Box::new((error, wait)))
    }

    fn json<T: for<'de> Deserialize<'de>>(
        &self,
        method: &str,
        path: &str,
        bytes: &[u8],
    ) -> Result<T, ClientError> {
        serde_json::from_slice(bytes)
            .map_err(|e| self.protocol(method, path, format!("invalid JSON: {e}")))
    }

    fn call_json<T: for<'de> Deserialize<'de>>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        ok: &[u16],
    ) -> Result<(u16, T), ClientError> {
        let body = match body {
            Some(b) => Body::Json(serde_json::to_vec(b).map_err(|e| {
                self.protocol(method, path, format!("cannot encode the request: {e}"))
            })?),
            None => Body::Empty,
        };
        let (status, bytes) = self.call(method, path, body, ok)?;
        Ok((status, self.json(method, path, &bytes)?))
    }

    /// `GET` of a JSON document (200 only).
    fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, ClientError> {
        Ok(self.call_json("GET", path, None::<&()>, &[200])?.1)
    }

    fn protocol(&self, method: &str, path: &str, reason: String) -> ClientError {
        ClientError::Protocol {
            method: method.to_string(),
            url: format!("{}{}", self.base, path),
            reason,
        }
    }

    // ---- Uploads ----

    /// `POST /v1/uploads`. Returns the session and whether the blob is
    /// already stored (200 `ready`: nothing to send).
    pub fn begin_upload(&self, req: &BeginUpload) -> Result<(UploadSession, bool), ClientError> {
        let path = Self::path(&["uploads"]);
        let (status, s): (u16, UploadSession) =
            self.call_json("POST", &path, Some(req), &[200, 201])?;
        if s.expected_digest != req.expected_digest
            || s.expected_size_bytes != req.expected_size_bytes
        {
            return Err(self.protocol(
                "POST",
                &path,
                format!(
                    "session {} is for {} ({} bytes), not the requested blob",
                    s.id, s.expected_digest, s.expected_size_bytes
                ),
            ));
        }
        let ready = status == 200;
        if ready && s.state != "ready" {
            return Err(self.protocol(
                "POST",
                &path,
                format!("200 with session state {:?}, expected ready", s.state),
            ));
        }
        Ok((s, ready))
    }

    /// `PUT /v1/uploads/{id}/parts/{n}`: streams `len` bytes of `file` from
    /// `offset` (never the whole file in memory). `progress` gets the number
    /// of bytes read at each step. The returned etag is checked against the
    /// bytes actually sent.
    pub fn put_part(
        &self,
        upload_id: &str,
        part_number: u32,
        file: &Path,
        offset: u64,
        len: u64,
        progress: Option<&mut dyn FnMut(u64)>,
    ) -> Result<UploadPart, ClientError> {
        let path = Self::path(&["uploads", upload_id, "parts", &part_number.to_string()]);
        let mut f = File::open(file).map_err(io_err(file))?;
        f.seek(SeekFrom::Start(offset)).map_err(io_err(file))?;
        let mut reader = PartReader {
            // ureq reads it in chunks of its output buffer (128 KiB): no buffer between
            inner: f.take(len),
            hasher: Hasher::new(),
            progress,
        };
        let (_, bytes) = self.call(
            "PUT",
            &path,
            Body::Stream(&mut reader, len, "application/octet-stream"),
            &[200],
        )?;
        if reader.hasher.len() != len {
            return Err(ClientError::FileChanged {
                path: file.to_path_buf(),
                reason: format!(
                    "part {part_number}: read {} bytes, expected {len}",
                    reader.hasher.len()
                ),
            });
        }
        let sent = reader.hasher.finish();
        let part: UploadPart = self.json("PUT", &path, &bytes)?;
        if part.etag.trim_matches('"') != sent.to_string() || part.size_bytes != len {
            return Err(self.protocol(
                "PUT",
                &path,
                format!(
                    "server stored part {part_number} as {} ({} bytes), the client sent {sent} ({len} bytes)",
                    part.etag, part.size_bytes
                ),
            ));
        }
        Ok(part)
    }

    /// `POST /v1/uploads/{id}/complete`; the session must come back `ready`.
    pub fn complete_upload(
        &self,
        upload_id: &str,
        parts: &[UploadPart],
    ) -> Result<UploadSession, ClientError> {
        #[derive(Serialize)]
        struct P<'a> {
            number: u32,
            etag: &'a str,
            size_bytes: u64,
        }
        #[derive(Serialize)]
        struct C<'a> {
            parts: Vec<P<'a>>,
        }
        let body = C {
            parts: parts
                .iter()
                .map(|p| P {
                    number: p.part_number,
                    etag: &p.etag,
                    size_bytes: p.size_bytes,
                })
                .collect(),
        };
        let path = Self::path(&["uploads", upload_id, "complete"]);
        let (_, s): (u16, UploadSession) = self.call_json("POST", &path, Some(&body), &[200])?;
        if s.state != "ready" {
            return Err(self.protocol(
                "POST",
                &path,
                format!("upload session is {:?}, expected ready", s.state),
            ));
        }
        Ok(s)
    }

    /// `POST /v1/uploads/{id}/abort`.
    pub fn abort_upload(&self, upload_id: &str) -> Result<UploadSession, ClientError> {
        let path = Self::path(&["uploads", upload_id, "abort"]);
        Ok(self.call_json("POST", &path, None::<&()>, &[200])?.1)
    }

    /// Uploads a file whose digest and size are known. Returns `false` when
    /// the server already had the blob (no bytes sent).
    pub fn upload_hashed(
        &self,
        file: &Path,
        media_type: &str,
        digest: Digest,
        size: u64,
        progress: Option<&ProgressBar>,
    ) -> Result<bool, ClientError> {
        self.upload_root(file, media_type, digest, size, progress, None)
    }

    /// [`ApiClient::upload_hashed`] of a root, naming the metadata tarball
    /// (uploaded before) it is published with: the server then takes its Incus
    /// fingerprint as it arrives rather than reading it again at publish.
    pub fn upload_root(
        &self,
        file: &Path,
        media_type: &str,
        digest: Digest,
        size: u64,
        progress: Option<&ProgressBar>,
        incus_metadata: Option<Digest>,
    ) -> Result<bool, ClientError> {
        let begin = BeginUpload {
            expected_digest: digest,
            expected_size_bytes: size,
            media_type_hint: Some(media_type.to_string()),
            filename_hint: file.file_name().and_then(|n| n.to_str()).map(String::from),
            incus_metadata,
        };
        let (session, ready) = self.begin_upload(&begin)?;
        if ready {
            if let Some(pb) = progress {
                pb.set_position(size);
            }
            return Ok(false);
        }
        let now = std::fs::metadata(file).map_err(io_err(file))?.len();
        if now != size {
            return Err(ClientError::FileChanged {
                path: file.to_path_buf(),
                reason: format!("size is now {now} bytes, was {size} when hashed"),
            });
        }
        let result = (|| {
            let mut parts = Vec::new();
            for (i, (off, len)) in plan_parts(size).into_iter().enumerate() {
                let mut cb = |n: u64| {
                    if let Some(pb) = progress {
                        pb.inc(n);
                    }
                };
                let part = self.put_part(&session.id, i as u32 + 1, file, off, len, Some(&mut cb));
                let part = match part {
                    Ok(p) => p,
                    Err(e) => {
                        if let Some(pb) = progress {
                            pb.set_position(off); // a retry would resend this part
                        }
                        return Err(e);
                    }
                };
                parts.push(part);
            }
            self.complete_upload(&session.id, &parts)
        })();
        match result {
            Ok(_) => Ok(true),
            Err(e) => {
                // Best effort: free the staged parts; the original error matters.
                let _ = self.abort_upload(&session.id);
                Err(e)
            }
        }
    }

    /// Sends `file` whole (`POST /v1/blobs`) without hashing it first: the file is
    /// read once, its sha256 taken as it is sent and compared with the digest the
    /// server stored it under (what the publisher signs is its own hash of its own
    /// file). With `incus_metadata` (the digest of the Incus metadata tarball it is
    /// published with, uploaded before) the server takes the Incus fingerprint
    /// `sha256(metadata || root)` in the same pass and returns it; the client does
    /// not hash it a second time (the publish record's fingerprint is checked
    /// against it, and Incus checks it at every download). `Ok(None)` when the
    /// server has no such route (an older imgsrv): nothing was stored.
    pub fn upload_whole(
        &self,
        file: &Path,
        media_type: &str,
        incus_metadata: Option<Digest>,
        progress: Option<&ProgressBar>,
    ) -> Result<Option<WholeUploaded>, ClientError> {
        const PATH: &str = "/v1/blobs";
        let f = File::open(file).map_err(io_err(file))?;
        let size = f.metadata().map_err(io_err(file))?.len();
        let mut query = Vec::new();
        if let Some(m) = incus_metadata {
            query.push(format!("incus_metadata={m}"));
        }
        if let Some(n) = file.file_name().and_then(|n| n.to_str()) {
            query.push(format!("filename={}", utf8_percent_encode(n, SEGMENT)));
        }
        let path = match query.is_empty() {
            true => PATH.to_string(),
            false => format!("{PATH}?{}", query.join("&")),
        };
        let mut cb = |n: u64| {
            if let Some(pb) = progress {
                pb.inc(n);
            }
        };
        let mut reader = PartReader {
            inner: f.take(size),
            hasher: Hasher::new(),
            progress: Some(&mut cb),
        };
        let sent = self.call(
            "POST",
            &path,
            Body::Stream(&mut reader, size, media_type),
            &[200, 201],
        );
        let bytes = match sent {
            Ok((_, bytes)) => bytes,
            Err(e) if matches!(e.status(), Some(404 | 405)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let hasher = reader.hasher;
        if hasher.len() != size {
            return Err(ClientError::FileChanged {
                path: file.to_path_buf(),
                reason: format!("read {} bytes, expected {size}", hasher.len()),
            });
        }
        let digest = hasher.finish();
        #[derive(Deserialize)]
        struct Out {
            #[serde(flatten)]
            session: UploadSession,
            #[serde(default)]
            incus_fingerprint: Option<String>,
        }
        let out: Out = self.json("POST", PATH, &bytes)?;
        let s = &out.session;
        if s.expected_digest != digest || s.expected_size_bytes != size || s.state != "ready" {
            return Err(self.protocol(
                "POST",
                PATH,
                format!(
                    "server stored {} ({} bytes, {}), the client sent {digest} ({size} bytes)",
                    s.expected_digest, s.expected_size_bytes, s.state
                ),
            ));
        }
        let fingerprint = out.incus_fingerprint.map(|fp| fp.to_ascii_lowercase());
        if let Some(fp) = &fingerprint {
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.protocol(
                    "POST",
                    PATH,
                    format!("invalid incus_fingerprint {fp:?}"),
                ));
            }
        }
        Ok(Some(WholeUploaded {
            digest,
            size,
            fingerprint,
        }))
    }

    /// Hashes `file`, then uploads it unless the server already has it.
    /// The progress bar (if any) goes through hashing, then sending.
    pub fn upload_file(
        &self,
        file: &Path,
        media_type: &str,
        progress: Option<&ProgressBar>,
    ) -> Result<(Digest, u64), ClientError> {
        if let Some(pb) = progress {
            let len = std::fs::metadata(file).map_err(io_err(file))?.len();
            pb.set_length(len);
            pb.set_position(0);
            pb.set_message("hashing");
        }
        let (digest, size) = hash_file(file, progress)?;
        if let Some(pb) = progress {
            pb.set_position(0);
            pb.set_message("uploading");
        }
        let sent = self.upload_hashed(file, media_type, digest, size, progress)?;
        if let Some(pb) = progress {
            pb.finish_with_message(if sent {
                "uploaded"
            } else {
                "already on the server"
            });
        }
        Ok((digest, size))
    }

    // ---- Images, versions, artifacts ----

    /// `POST /v1/images`. `Ok(None)` when the image already exists (409).
    pub fn create_image(
        &self,
        name: &str,
        display_name: Option<&str>,
        description: Option<&str>,
    ) -> Result<Option<Image>, ClientError> {
        #[derive(Serialize)]
        struct B<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            display_name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            description: Option<&'a str>,
        }
        let body = B {
            name,
            display_name,
            description,
        };
        match self.call_json("POST", &Self::path(&["images"]), Some(&body), &[201]) {
            Ok((_, img)) => Ok(Some(img)),
            Err(e) if e.status() == Some(409) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/images/{name}/visibility`: `public` or `private`.
    pub fn set_visibility(&self, image: &str, visibility: &str) -> Result<Image, ClientError> {
        #[derive(Serialize)]
        struct B<'a> {
            visibility: &'a str,
        }
        let path = Self::path(&["images", image, "visibility"]);
        Ok(self
            .call_json("PUT", &path, Some(&B { visibility }), &[200])?
            .1)
    }

    /// `POST /v1/images/{name}/versions`: a new draft (409 if it exists).
    pub fn create_version(
        &self,
        image: &str,
        version: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ImageVersion, ClientError> {
        #[derive(Serialize)]
        struct B<'a> {
            version: &'a str,
            metadata: &'a BTreeMap<String, String>,
        }
        let path = Self::path(&["images", image, "versions"]);
        Ok(self
            .call_json("POST", &path, Some(&B { version, metadata }), &[201])?
            .1)
    }

    /// `GET /v1/images/{name}/versions/{version}`: the version and its artifacts.
    pub fn get_version(&self, image: &str, version: &str) -> Result<VersionView, ClientError> {
        self.get_json(&Self::path(&["images", image, "versions", version]))
    }

    /// `DELETE /v1/images/{name}/versions/{version}/artifacts/{id}` (drafts only).
    pub fn delete_artifact(&self, image: &str, version: &str, id: &str) -> Result<(), ClientError> {
        let path = Self::path(&["images", image, "versions", version, "artifacts", id]);
        self.call("DELETE", &path, Body::Empty, &[])?;
        Ok(())
    }

    /// `POST /v1/images/{name}/versions/{version}/artifacts`.
    pub fn add_artifact(
        &self,
        image: &str,
        version: &str,
        a: &NewArtifact,
    ) -> Result<Artifact, ClientError> {
        let path = Self::path(&["images", image, "versions", version, "artifacts"]);
        Ok(self.call_json("POST", &path, Some(a), &[201])?.1)
    }

    /// `POST …/artifacts/{artifact_id}/attachments`.
    pub fn add_attachment(
        &self,
        image: &str,
        version: &str,
        artifact_id: &str,
        a: &NewAttachment,
    ) -> Result<Attachment, ClientError> {
        let path = Self::path(&[
            "images",
            image,
            "versions",
            version,
            "artifacts",
            artifact_id,
            "attachments",
        ]);
        Ok(self.call_json("POST", &path, Some(a), &[201])?.1)
    }

    /// `GET …/manifest`: the exact canonical bytes a publisher signs.
    pub fn get_manifest_bytes(&self, image: &str, version: &str) -> Result<Vec<u8>, ClientError> {
        let path = Self::path(&["images", image, "versions", version, "manifest"]);
        Ok(self.call("GET", &path, Body::Empty, &[200])?.1)
    }

    /// `GET …/manifest.minisig`: the signature accepted at publish, or
    /// `None` when the version was published unsigned (404).
    pub fn get_manifest_signature(
        &self,
        image: &str,
        version: &str,
    ) -> Result<Option<String>, ClientError> {
        let path = Self::path(&["images", image, "versions", version, "manifest.minisig"]);
        self.get_text_if_any(&path, "the signature")
    }

    /// A text document at `path`; `None` when the server has none (404).
    fn get_text_if_any(&self, path: &str, what: &str) -> Result<Option<String>, ClientError> {
        match self.call("GET", path, Body::Empty, &[200]) {
            Ok((_, bytes)) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| self.protocol("GET", path, format!("{what} is not UTF-8 text"))),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET .../manifest.tlog-proof`: the version's C2SP tlog-proof; `None` when the
    /// server has none (404).
    pub fn get_tlog_proof(
        &self,
        image: &str,
        version: &str,
    ) -> Result<Option<String>, ClientError> {
        let path = Self::path(&["images", image, "versions", version, "manifest.tlog-proof"]);
        self.get_text_if_any(&path, "the tlog-proof")
    }

    /// `GET /log/checkpoint`: the log's newest signed checkpoint; `None` when the
    /// server has no log (404).
    pub fn get_log_checkpoint(&self) -> Result<Option<String>, ClientError> {
        self.get_text_if_any("/log/checkpoint", "the checkpoint")
    }

    /// `GET /log/{path}` (`tile/0/x001/234`): a tile's bytes.
    pub fn get_log_tile(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .call("GET", &format!("/log/{path}"), Body::Empty, &[200])?
            .1)
    }

    /// `GET /log/consistency/{old}/{new}`: the consistency proof between two sizes.
    pub fn get_log_consistency(
        &self,
        old: u64,
        new: u64,
    ) -> Result<Vec<crate::tlog::tree::Hash>, ClientError> {
        use base64::Engine as _;
        let path = format!("/log/consistency/{old}/{new}");
        let (_, bytes) = self.call("GET", &path, Body::Empty, &[200])?;
        let text = String::from_utf8(bytes)
            .map_err(|_| self.protocol("GET", &path, "the proof is not UTF-8 text".into()))?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                base64::engine::general_purpose::STANDARD
                    .decode(l)
                    .ok()
                    .and_then(|h| <[u8; 32]>::try_from(h).ok())
                    .ok_or_else(|| self.protocol("GET", &path, format!("{l:?} is not a hash")))
            })
            .collect()
    }

    /// `GET /v1/images/{name}/refs/{ref}`: a published version, else an alias.
    pub fn get_ref(&self, image: &str, reference: &str) -> Result<VersionView, ClientError> {
        self.get_json(&Self::path(&["images", image, "refs", reference]))
    }

    /// Streams a published artifact's primary blob (`attachment` `None`) or
    /// one of its attachments into `out`, never more than `max_bytes` bytes
    /// (pass the expected size + 1 to notice a longer body). Returns the
    /// number of bytes written.
    pub fn download_to(
        &self,
        image: &str,
        version: &str,
        artifact_id: &str,
        attachment_id: Option<&str>,
        out: &mut dyn Write,
        max_bytes: u64,
    ) -> Result<u64, ClientError> {
        let mut segs = vec![
            "images",
            image,
            "versions",
            version,
            "artifacts",
            artifact_id,
        ];
        if let Some(att) = attachment_id {
            segs.extend(["attachments", att]);
        }
        segs.push("download");
        let path = Self::path(&segs);
        let (url, mut resp) = self.send("GET", &path, Body::Empty, &[200])?;
        let mut reader = resp.body_mut().as_reader().take(max_bytes);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ClientError::Transport {
                        method: "GET".into(),
                        url,
                        source: ureq::Error::Io(e),
                    })
                }
            };
            out.write_all(&buf[..n])
                .map_err(|source| ClientError::Sink {
                    method: "GET".into(),
                    url: url.clone(),
                    source,
                })?;
            total += n as u64;
        }
    }

    /// `POST …/publish` with the whole `.minisig` text.
    pub fn publish(
        &self,
        image: &str,
        version: &str,
        signature: Option<&str>,
    ) -> Result<PublishRecord, ClientError> {
        #[derive(Serialize)]
        struct B<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            signature: Option<&'a str>,
        }
        let path = Self::path(&["images", image, "versions", version, "publish"]);
        Ok(self
            .call_json("POST", &path, Some(&B { signature }), &[200])?
            .1)
    }

    // ---- Aliases ----

    /// `PUT /v1/images/{name}/aliases/{alias}` (create or move).
    pub fn put_alias(&self, image: &str, alias: &str, version: &str) -> Result<Alias, ClientError> {
        #[derive(Serialize)]
        struct B<'a> {
            version: &'a str,
        }
        let path = Self::path(&["images", image, "aliases", alias]);
        Ok(self
            .call_json("PUT", &path, Some(&B { version }), &[200])?
            .1)
    }

    /// `DELETE /v1/images/{name}/versions/{version}` (drafts only).
    pub fn delete_version(&self, image: &str, version: &str) -> Result<(), ClientError> {
        let path = Self::path(&["images", image, "versions", version]);
        self.call("DELETE", &path, Body::Empty, &[])?;
        Ok(())
    }

    /// `POST /v1/images/{name}/versions/{version}/retire`.
    pub fn retire_version(
        &self,
        image: &str,
        version: &str,
        reason: &str,
    ) -> Result<crate::catalog::Retirement, ClientError> {
        #[derive(Serialize)]
        struct B<'a> {
            reason: &'a str,
        }
        let path = Self::path(&["images", image, "versions", version, "retire"]);
        Ok(self
            .call_json("POST", &path, Some(&B { reason }), &[200])?
            .1)
    }

    /// `DELETE /v1/images/{name}/aliases/{alias}`.
    pub fn delete_alias(&self, image: &str, alias: &str) -> Result<(), ClientError> {
        let path = Self::path(&["images", image, "aliases", alias]);
        self.call("DELETE", &path, Body::Empty, &[])?;
        Ok(())
    }

    // ---- Listings ----

    /// GET of a list document `{"<field>": [...]}`, the shape every list
    /// route answers.
    fn list<T: for<'de> Deserialize<'de>>(
        &self,
        segs: &[&str],
        field: &str,
    ) -> Result<Vec<T>, ClientError> {
        let path = Self::path(segs);
        let mut doc: serde_json::Value = self.get_json(&path)?;
        serde_json::from_value(doc[field].take())
            .map_err(|e| self.protocol("GET", &path, format!("unexpected {field:?} list: {e}")))
    }

    /// `GET /v1/images`.
    pub fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        self.list(&["images"], "images")
    }

    /// `GET /v1/images/{name}/versions` (newest first).
    pub fn list_versions(&self, image: &str) -> Result<Vec<ImageVersion>, ClientError> {
        self.list(&["images", image, "versions"], "versions")
    }

    /// `GET /v1/keys`: the publisher keys the server trusts, with their states.
    pub fn get_keys(&self) -> Result<Vec<KeyInfo>, ClientError> {
        self.list(&["keys"], "keys")
    }

    /// `GET /v1/images/{name}/aliases`.
    pub fn list_aliases(&self, image: &str) -> Result<Vec<Alias>, ClientError> {
        self.list(&["images", image, "aliases"], "aliases")
    }

    // ---- Replication and bundles ----

    /// `GET /v1/images/{name}`: the image's visibility (`public` or
    /// `private`; `public` when the server does not say).
    pub fn image_visibility(&self, image: &str) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct V {
            #[serde(default)]
            visibility: Option<String>,
        }
        let v: V = self.get_json(&Self::path(&["images", image]))?;
        Ok(v.visibility.unwrap_or_else(|| "public".into()))
    }

    /// `HEAD /v1/blobs/{digest}`: the stored size, or `None` when the server
    /// does not have the blob (404; unreferenced blobs are shown only to
    /// content writers).
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ClientError> {
        let path = Self::path(&["blobs", &digest.to_string()]);
        match self.send("HEAD", &path, Body::Empty, &[200]) {
            Ok((_, resp)) => {
                let len = resp
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        self.protocol("HEAD", &path, "no Content-Length for a blob".into())
                    })?;
                Ok(Some(len))
            }
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/blobs/{digest}`: a reader over the blob's bytes. The caller
    /// checks the digest and size of what it reads.
    pub fn open_blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, ClientError> {
        let path = Self::path(&["blobs", &digest.to_string()]);
        let (_, resp) = self.send("GET", &path, Body::Empty, &[200])?;
        Ok(Box::new(resp.into_body().into_reader()))
    }
}

/// The `detail` of a problem+json body, else its `title`, else the status text.
fn problem_detail(status: StatusCode, body: &[u8]) -> String {
    if let Ok(p) = serde_json::from_slice::<Problem>(body) {
        if let Some(d) = p.detail.filter(|d| !d.trim().is_empty()) {
            return d;
        }
        if let Some(t) = p.title.filter(|t| !t.trim().is_empty()) {
            return t;
        }
    }
    status.canonical_reason().unwrap_or("error").to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// One request as the mock server received it.
    #[derive(Debug, Clone)]
    pub(crate) struct Recorded {
        pub method: String,
        pub path: String,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Recorded {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    pub(crate) type Reply = (u16, &'static str, Vec<u8>);

    /// A minimal HTTPS/1.1 server (rustls, self-signed certificate for
    /// `localhost` and `127.0.0.1`) answering with `handler`.
    pub(crate) struct Mock {
        pub port: u16,
        pub ca: PathBuf,
        pub log: Arc<Mutex<Vec<Recorded>>>,
        _dir: tempfile::TempDir,
    }

    impl Mock {
        pub fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Mock {
            let ck = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("server.pem");
            std::fs::write(&ca, ck.cert.pem()).unwrap();
            let cfg = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(
                    vec![ck.cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
                )
                .unwrap();
            let cfg = Arc::new(cfg);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let log = Arc::new(Mutex::new(Vec::new()));
            let handler = Arc::new(handler);
            let log2 = log.clone();
            std::thread::spawn(move || {
                for tcp in listener.incoming().flatten() {
                    let (cfg, log, handler) = (cfg.clone(), log2.clone(), handler.clone());
                    std::thread::spawn(move || {
                        let conn = rustls::ServerConnection::new(cfg).unwrap();
                        let mut s = io::BufReader::new(rustls::StreamOwned::new(conn, tcp));
                        // Serve requests until the client closes (or TLS fails).
                        while let Some(req) = read_request(&mut s) {
                            log.lock().unwrap().push(req.clone());
                            let (status, ctype, body) = handler(&req);
                            let head = format!(
                                "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            );
                            let w = s.get_mut();
                            if w.write_all(head.as_bytes())
                                .and_then(|_| w.write_all(&body))
                                .and_then(|_| w.flush())
                                .is_err()
                            {
                                break;
                            }
                        }
                    });
                }
            });
            Mock {
                port,
                ca,
                log,
                _dir: dir,
            }
        }

        pub fn url(&self) -> String {
            format!("https://127.0.0.1:{}", self.port)
        }

        pub fn requests(&self) -> Vec<Recorded> {
            self.log.lock().unwrap().clone()
        }
    }

    fn read_request(s: &mut impl BufRead) -> Option<Recorded> {
        let mut line = String::new();
        s.read_line(&mut line).ok().filter(|&n| n > 0)?;
        let mut parts = line.split_whitespace();
        let method = parts.next()?.to_string();
        let path = parts.next()?.to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            s.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut req = Recorded {
            method,
            path,
            headers,
            body: Vec::new(),
        };
        // The API requires Content-Length; chunked bodies are not read.
        let len: u64 = req
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        s.take(len).read_to_end(&mut req.body).ok()?;
        Some(req)
    }

    pub(crate) fn json(status: u16, v: serde_json::Value) -> Reply {
        (status, "application/json", serde_json::to_vec(&v).unwrap())
    }

    pub(crate) fn problem(status: u16, detail: &str) -> Reply {
        let v =
            serde_json::json!({"type":"about:blank","title":"T","status":status,"detail":detail});
        (
            status,
            "application/problem+json",
            serde_json::to_vec(&v).unwrap(),
        )
    }

    #[test]
    fn server_url_must_be_https() {
        assert!(matches!(
            normalize_server_url("http://example.org"),
            Err(ClientError::NotHttps(_))
        ));
        assert!(matches!(
            normalize_server_url("HTTP://example.org:80/"),
            Err(ClientError::NotHttps(_))
        ));
        let e = ApiClient::new("http://127.0.0.1:8443", None, None).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        for bad in [
            "example.org",
            "ftp://example.org",
            "https://",
            "https://u:p@h",
            "https://h/?q=1",
        ] {
            assert!(
                matches!(
                    normalize_server_url(bad),
                    Err(ClientError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            normalize_server_url("https://h:8443/").unwrap(),
            "https://h:8443"
        );
        assert_eq!(
            normalize_server_url("HTTPS://h/imgsrv/").unwrap(),
            "https://h/imgsrv"
        );
        assert!(ApiClient::new("https://h", None, Some("bad token".into())).is_err());
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(
            ApiClient::path(&["images", "debian", "versions", "1.0+b1:2", "manifest"]),
            "/v1/images/debian/versions/1.0%2Bb1%3A2/manifest"
        );
        assert_eq!(
            ApiClient::path(&["images", "a/../b"]),
            "/v1/images/a%2F..%2Fb"
        );
    }

    #[test]
    fn parts_plan() {
        assert_eq!(plan_parts(0), [(0, 0)]);
        assert_eq!(plan_parts(SINGLE_PART_MAX), [(0, SINGLE_PART_MAX)]);
        let p = plan_parts(SINGLE_PART_MAX + 1);
        assert_eq!(p.len(), 5);
        assert_eq!(p[4], (4 * PART_SIZE, 1));
        assert!(p.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
    }

    #[test]
    fn problem_details() {
        let b =
            br#"{"type":"about:blank","title":"Conflict","status":409,"detail":"image exists"}"#;
        assert_eq!(problem_detail(StatusCode::CONFLICT, b), "image exists");
        assert_eq!(
            problem_detail(StatusCode::CONFLICT, br#"{"title":"Conflict"}"#),
            "Conflict"
        );
        assert_eq!(
            problem_detail(StatusCode::BAD_GATEWAY, b"<html>"),
            "Bad Gateway"
        );
    }

    #[test]
    fn a_503_is_sent_again_unless_its_body_was_streamed() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = n.clone();
        let mock = Mock::start(move |r| {
            let i = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match (r.method.as_str(), i) {
                ("POST", 0) if r.path == "/v1/images" => {
                    problem(503, "catalog database cannot be reached")
                }
                ("POST", 1) if r.path == "/v1/images" => json(
                    201,
                    serde_json::json!({"id": 1, "name": "debian", "created_at": "t", "updated_at": "t"}),
                ),
                _ => problem(503, "still down"),
            }
        });
        let c = ApiClient::new(&mock.url(), Some(&mock.ca), Some("t".into())).unwrap();
        let made = c.create_image("debian", None, None).unwrap();
        assert_eq!(made.map(|i| i.name), Some("debian".to_string()));
        let reqs = mock.requests();
        assert_eq!(reqs.len(), 2, "sent again once");
        assert_eq!(reqs[0].body, reqs[1].body, "the same body");
        // a streamed body is not sent again: its 503 is the caller's
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("root");
        std::fs::write(&f, b"ROOT").unwrap();
        let e = c
            .upload_whole(&f, "application/octet-stream", None, None)
            .unwrap_err();
        assert_eq!(e.status(), Some(503), "{e}");
        assert_eq!(mock.requests().len(), 3);
    }

    #[test]
    fn tls_with_ca_for_localhost_and_ip_and_api_errors() {
        let mock = Mock::start(|r| match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/v1/images") => json(
                200,
                serde_json::json!({"images":[{"id":7,"name":"debian","created_at":"t","updated_at":"t","future":1}]}),
            ),
            ("GET", "/v1/images/nope/versions") => problem(404, "image nope not found"),
            ("POST", "/v1/images") => problem(409, "exists"),
            ("DELETE", "/v1/images/debian/aliases/stable") => (204, "text/plain", vec![]),
            _ => (500, "text/plain", b"boom".to_vec()),
        });
        for host in ["127.0.0.1", "localhost"] {
            let url = format!("https://{host}:{}", mock.port);
            let c = ApiClient::new(&url, Some(&mock.ca), Some("imgsrv_id_secret".into())).unwrap();
            let images = c.list_images().unwrap();
            assert_eq!(images.len(), 1);
            assert_eq!(
                (images[0].id.as_str(), images[0].name.as_str()),
                ("7", "debian")
            );
        }
        let reqs = mock.requests();
        assert_eq!(
            reqs[0].header("authorization"),
            Some("Bearer imgsrv_id_secret")
        );

        let c = ApiClient::new(&mock.url(), Some(&mock.ca), Some("t".into())).unwrap();
        match c.list_versions("nope") {
            Err(ClientError::Api { status, detail, .. }) => {
                assert_eq!((status, detail.as_str()), (404, "image nope not found"))
            }
            r => panic!("{r:?}"),
        }
        assert!(
            c.create_image("debian", None, None).unwrap().is_none(),
            "409 must mean exists"
        );
        c.delete_alias("debian", "stable").unwrap();
        match c.list_aliases("x") {
            Err(e @ ClientError::Api { .. }) => {
                assert_eq!(e.status(), Some(500));
                assert!(e.to_string().contains("Internal Server Error"), "{e}");
                assert!(e.to_string().contains("/v1/images/x/aliases"), "{e}");
            }
            r => panic!("{r:?}"),
        }

        // Without --ca the self-signed certificate is not trusted.
        let anon = ApiClient::new(&mock.url(), None, None).unwrap();
        let e = anon.list_images().unwrap_err();
        assert!(matches!(e, ClientError::Transport { .. }), "{e}");
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
        // A CA file without certificates is refused up front.
        let e = ApiClient::new(&mock.url(), Some(Path::new("/dev/null")), None).unwrap_err();
        assert!(e.to_string().contains("/dev/null"), "{e}");
    }

    /// Answers the upload routes like docs/api.md; `stored` digests are `ready`.
    pub(crate) fn upload_routes(
        r: &Recorded,
        stored: &Mutex<BTreeMap<String, Vec<u8>>>,
        staged: &Mutex<BTreeMap<String, Vec<u8>>>,
    ) -> Option<Reply> {
        let session = |id: &str, digest: &str, size: u64, state: &str| {
            serde_json::json!({"id":id,"expected_digest":digest,"expected_size_bytes":size,"state":state,
                "expires_at":"t","created_at":"t","updated_at":"t"})
        };
        let segs: Vec<&str> = r
            .path
            .trim_start_matches("/v1/uploads")
            .split('/')
            .collect();
        if !r.path.starts_with("/v1/uploads") {
            return None;
        }
        Some(match (r.method.as_str(), segs.as_slice()) {
            ("POST", [""]) => {
                let b: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                let d = b["expected_digest"].as_str().unwrap().to_string();
                let size = b["expected_size_bytes"].as_u64().unwrap();
                let id = format!("{}-{size}", &d[7..]);
                if stored.lock().unwrap().contains_key(&d) {
                    json(200, session(&id, &d, size, "ready"))
                } else {
                    json(201, session(&id, &d, size, "created"))
                }
            }
            ("PUT", ["", id, "parts", "1"]) => {
                assert!(
                    r.header("content-length").is_some(),
                    "part without Content-Length"
                );
                staged
                    .lock()
                    .unwrap()
                    .insert(id.to_string(), r.body.clone());
                json(
                    200,
                    serde_json::json!({"upload_id":id,"part_number":1,
                    "etag":format!("\"{}\"", Digest::of(&r.body)),"size_bytes":r.body.len()}),
                )
            }
            ("POST", ["", id, "complete"]) => {
                let (hex, size) = id.split_once('-').unwrap();
                let data = staged.lock().unwrap().remove(*id).unwrap();
                let d = format!("sha256:{hex}");
                if Digest::of(&data).to_string() != d {
                    return Some(problem(412, "digest mismatch"));
                }
                stored.lock().unwrap().insert(d.clone(), data);
                json(200, session(id, &d, size.parse().unwrap(), "ready"))
            }
            ("POST", ["", _, "abort"]) => problem(404, "no"),
            _ => problem(400, "unexpected upload route"),
        })
    }

    #[test]
    fn upload_file_streams_once_and_skips_known_blobs() {
        let stored = Arc::new(Mutex::new(BTreeMap::new()));
        let staged = Arc::new(Mutex::new(BTreeMap::new()));
        let (s2, st2) = (stored.clone(), staged.clone());
        let mock =
            Mock::start(move |r| upload_routes(r, &s2, &st2).unwrap_or_else(|| problem(404, "?")));
        let c = ApiClient::new(&mock.url(), Some(&mock.ca), Some("tok".into())).unwrap();

        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("blob.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&f, &data).unwrap();

        let pb = ProgressBar::hidden();
        let (d, n) = c
            .upload_file(&f, "application/octet-stream", Some(&pb))
            .unwrap();
        assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
        assert_eq!(pb.position(), n);
        assert_eq!(stored.lock().unwrap()[&d.to_string()], data);
        let puts = mock.requests().iter().filter(|r| r.method == "PUT").count();
        assert_eq!(puts, 1);

        // Second time: the server answers 200 ready and no bytes are sent.
        assert_eq!(
            c.upload_file(&f, "application/octet-stream", None).unwrap(),
            (d, n)
        );
        let puts = mock.requests().iter().filter(|r| r.method == "PUT").count();
        assert_eq!(puts, 1, "a known blob was uploaded again");
        let begin = mock
            .requests()
            .into_iter()
            .find(|r| r.method == "POST")
            .unwrap();
        let b: serde_json::Value = serde_json::from_slice(&begin.body).unwrap();
        assert_eq!(b["filename_hint"], "blob.bin");
        assert_eq!(b["media_type_hint"], "application/octet-stream");

        // The file changing between hashing and sending is detected.
        let g = t.path().join("g.bin");
        std::fs::write(&g, b"abc").unwrap();
        let e = c
            .upload_hashed(&g, "x/y", Digest::of(b"abd"), 3, None)
            .unwrap_err();
        assert!(e.to_string().contains("412"), "{e}");
    }
}
