//! The S3 wire of [`super::S3Store`]: every request is signed by rusty-s3
//! (AWS Signature V4, presigned: the signature travels in the query string
//! and the payload is `UNSIGNED-PAYLOAD`; the store checks every byte with
//! its own SHA-256 instead) and sent with the ureq already in the tree.
//!
//! An answer that is not 2xx becomes a [`CasError`] naming the object
//! (`s3://bucket/key`), never the signed URL: that carries the access key id
//! and a signature. The secret key is only ever an input of the signature.

use super::S3Options;
use crate::cas::{CasError, Result};
use crate::digest::Digest;
use instant_xml::FromXml;
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2, ListParts};
use rusty_s3::{Bucket, Credentials, Method, S3Action, UrlStyle};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a signed request is valid. It is sent at once; the check is made
/// when it arrives (a long download that started in time goes on).
const SIGN_FOR: Duration = Duration::from_secs(15 * 60);
/// The longest a read or write of a transfer may wait for the server.
const IDLE_MAX: Duration = Duration::from_secs(60);
/// The most of an error answer read (its XML names the S3 error code).
const ERROR_BODY_MAX: u64 = 64 << 10;
/// The most of an XML answer read (a listing page of 1,000 keys is ~300 KiB).
const XML_BODY_MAX: u64 = 16 << 20;
const XML_NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

pub(super) type Response = ureq::http::Response<ureq::Body>;

/// An object as HEAD or a listing describes it.
#[derive(Debug, Clone)]
pub(super) struct Object {
    pub key: String,
    pub size: u64,
    /// RFC 3339 (listing) or RFC 7231 (HEAD), as the server wrote it.
    pub last_modified: Option<String>,
    /// Its [`STAMP`] (HEAD only; a listing does not show it).
    pub stamp: Option<String>,
}

/// The user metadata the store puts on every blob it writes: the hex sha256 the
/// bytes were checked against before the object became visible (see "A blob
/// carries its digest" in [`super`]).
pub(super) const STAMP: &str = "x-amz-meta-sha256";

/// An unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Multipart {
    pub key: String,
    pub upload_id: String,
}

pub(super) struct Client {
    agent: ureq::Agent,
    bucket: Bucket,
    creds: Credentials,
}

/// Answers `*.localhost` itself with the loopback address (RFC 6761 §6.3, as
/// curl does): a virtual-host bucket name under a local endpoint
/// (`imgsrv.localhost:3900`) then needs no DNS entry. Everything else goes to
/// ureq's resolver.
#[derive(Debug, Default)]
struct LocalhostResolver(DefaultResolver);

impl Resolver for LocalhostResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        if host.ends_with(".localhost") {
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let mut addrs = self.empty();
            addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
            return Ok(addrs);
        }
        self.0.resolve(uri, config, timeout)
    }
}

fn invalid(msg: String) -> CasError {
    CasError::Invalid(msg)
}

/// `<Tag>value</Tag>` of a small XML document (an S3 error answer).
fn xml_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}

#[derive(FromXml)]
#[xml(rename = "ListMultipartUploadsResult", ns(XML_NS))]
struct ListUploadsPage {
    upload: Vec<UploadItem>,
    #[xml(rename = "IsTruncated")]
    is_truncated: Option<bool>,
    #[xml(rename = "NextKeyMarker")]
    next_key_marker: Option<String>,
    #[xml(rename = "NextUploadIdMarker")]
    next_upload_id_marker: Option<String>,
}

#[derive(FromXml)]
#[xml(rename = "Upload", ns(XML_NS))]
struct UploadItem {
    #[xml(rename = "Key")]
    key: String,
    #[xml(rename = "UploadId")]
    upload_id: String,
}

impl Client {
    pub(super) fn new(opts: &S3Options) -> Result<Client> {
        let endpoint: url::Url = opts.endpoint.parse().map_err(|e| {
            invalid(format!(
                "S3 endpoint {:?}: {e} (expected e.g. http://127.0.0.1:3900)",
                opts.endpoint
            ))
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "S3 endpoint {:?}: the scheme must be http or https",
                opts.endpoint
            )));
        }
        if opts.ca_file.is_some() && endpoint.scheme() != "https" {
            return Err(invalid(format!(
                "S3 ca_file is set but the endpoint {:?} is not https: use an https endpoint or drop ca_file",
                opts.endpoint
            )));
        }
        for (what, v) in [
            ("bucket", &opts.bucket),
            ("region", &opts.region),
            ("access_key_id", &opts.access_key_id),
            ("secret_access_key", &opts.secret_access_key),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(format!("S3 {what} is empty: set it")));
            }
        }
        let style = if opts.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, opts.bucket.clone(), opts.region.clone())
            .map_err(|e| {
                invalid(format!(
                    "S3 bucket {:?} at {:?}: {e}{}",
                    opts.bucket,
                    opts.endpoint,
                    if opts.path_style {
                        ""
                    } else {
                        " (virtual-host addressing needs a host name, not an IP address, \
                         and a bucket name valid in one: or set path_style = true)"
                    }
                ))
            })?;
        let creds = Credentials::new(opts.access_key_id.clone(), opts.secret_access_key.clone());
        Ok(Client {
            agent: agent(opts)?,
            bucket,
            creds,
        })
    }

    pub(super) fn bucket_name(&self) -> &str {
        self.bucket.name()
    }

    /// Where an operator finds `key`: `s3://bucket/key`.
    pub(super) fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket.name())
    }

    /// The error for a failure of `op` on `key`.
    pub(super) fn err(
        &self,
        op: &'static str,
        key: &str,
        kind: io::ErrorKind,
        msg: String,
    ) -> CasError {
        CasError::Io {
            op,
            path: self.location(key),
            source: io::Error::new(kind, msg),
        }
    }

    fn transport_err(&self, op: &'static str, key: &str, e: ureq::Error) -> CasError {
        if unreachable(&e) {
            return CasError::Unavailable {
                path: self.location(key),
                reason: format!("{op}: S3 request failed: {e}"),
            };
        }
        let kind = match &e {
            ureq::Error::Io(io) => io.kind(),
            ureq::Error::Timeout(_) => io::ErrorKind::TimedOut,
            ureq::Error::ConnectionFailed => io::ErrorKind::ConnectionRefused,
            ureq::Error::HostNotFound => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        // (a bad URI's message would quote the signed URL)
        let msg = match e {
            ureq::Error::BadUri(_) => "bad request URI".to_string(),
            other => format!("S3 request failed: {other}"),
        };
        self.err(op, key, kind, msg)
    }

    /// The error for a non-2xx answer: the S3 error code and message; a
    /// refusal for a bucket quota (Garage: 403 "... quota is reached") is
    /// [`CasError::Full`].
    pub(super) fn status_err(&self, op: &'static str, key: &str, mut resp: Response) -> CasError {
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(ERROR_BODY_MAX)
            .read_to_string()
            .unwrap_or_default();
        let code = xml_tag(&body, "Code").unwrap_or("");
        let message = xml_tag(&body, "Message").unwrap_or("");
        let text = format!("HTTP {status} {code}: {message}");
        if status == 507
            || code == "QuotaExceeded"
            || (status == 403 && message.to_ascii_lowercase().contains("quota"))
        {
            return CasError::Full {
                path: self.location(key),
                reason: format!("{op}: {text}"),
            };
        }
        if matches!(status, 500 | 502 | 503 | 504) {
            // (S3's "retry later" answers: InternalError, SlowDown, a proxy's)
            return CasError::Unavailable {
                path: self.location(key),
                reason: format!("{op}: {text}"),
            };
        }
        let kind = match status {
            403 | 401 => io::ErrorKind::PermissionDenied,
            404 => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        self.err(op, key, kind, text)
    }

    /// Sends a request made by `go`; once more after a transport error when
    /// `retry` (a pooled connection the server closed meanwhile), for the
    /// requests that can be repeated as they are.
    fn send(
        &self,
        op: &'static str,
        key: &str,
        retry: bool,
        mut go: impl FnMut() -> Result<Response, ureq::Error>,
    ) -> Result<Response> {
        match go() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Io(_)) if retry => {
                std::thread::sleep(Duration::from_millis(100));
                go().map_err(|e| self.transport_err(op, key, e))
            }
            Err(e) => Err(self.transport_err(op, key, e)),
        }
    }

    fn ok(&self, op: &'static str, key: &str, resp: Response) -> Result<Response> {
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.status_err(op, key, resp))
        }
    }

    fn read_xml(&self, op: &'static str, key: &str, mut resp: Response) -> Result<String> {
        resp.body_mut()
            .with_config()
            .limit(XML_BODY_MAX)
            .read_to_string()
            .map_err(|e| self.transport_err(op, key, e))
    }

    fn bad_xml(&self, op: &'static str, key: &str, e: impl std::fmt::Display) -> CasError {
        self.err(
            op,
            key,
            io::ErrorKind::InvalidData,
            format!("unexpected S3 answer: {e}"),
        )
    }

    /// Signs a request rusty-s3 has no action for.
    fn sign_raw(
        &self,
        method: Method,
        url: url::Url,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> url::Url {
        let mut query = query.to_vec();
        query.sort();
        let mut headers = headers.to_vec();
        headers.sort();
        rusty_s3::signing::sign(
            &jiff::Timestamp::now(),
            method,
            url,
            self.creds.key(),
            self.creds.secret(),
            self.creds.token(),
            self.bucket.region(),
            SIGN_FOR.as_secs(),
            query.iter().copied(),
            headers.iter().copied(),
        )
    }

    /// HEAD: the object's size, `None` if there is none.
    pub(super) fn head(&self, key: &str) -> Result<Option<Object>> {
        let url = self
            .bucket
            .head_object(Some(&self.creds), key)
            .sign(SIGN_FOR);
        let resp = self.send("head", key, true, || self.agent.head(url.as_str()).call())?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let resp = self.ok("head", key, resp)?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| self.bad_xml("head", key, "no Content-Length"))?;
        Ok(Some(Object {
            key: key.to_string(),
            size,
            last_modified: header("last-modified"),
            stamp: header(STAMP),
        }))
    }

    /// GET, of `range` (offset, length > 0) when given: the answer, whose
    /// body is still to be read; `None` if there is no such object.
    pub(super) fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Option<Response>> {
        let url = self
            .bucket
            .get_object(Some(&self.creds), key)
            .sign(SIGN_FOR);
        let range = range.map(|(off, len)| format!("bytes={off}-{}", off + len - 1));
        let resp = self.send("get", key, true, || {
            let mut r = self
                .agent
                .get(url.as_str())
                // byte ranges of the stored bytes, never of a compressed form
                .header("accept-encoding", "identity");
            if let Some(v) = &range {
                r = r.header("range", v);
            }
            r.call()
        })?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        self.ok("get", key, resp).map(Some)
    }

    /// GET of a small object (a quarantine note) into memory.
    pub(super) fn get_small(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(mut resp) = self.get(key, None)? else {
            return Ok(None);
        };
        resp.body_mut()
            .with_config()
            .limit(ERROR_BODY_MAX)
            .read_to_vec()
            .map(Some)
            .map_err(|e| self.transport_err("get", key, e))
    }

    /// PUT of `body`; with `sha256` the server checks it too
    /// (`x-amz-checksum-sha256`, which Garage verifies); with `stamp` the object
    /// carries it as its [`STAMP`].
    pub(super) fn put(
        &self,
        key: &str,
        body: &[u8],
        sha256: Option<&[u8; 32]>,
        stamp: Option<&Digest>,
    ) -> Result<()> {
        use base64::Engine as _;
        let mut headers = Vec::new();
        if let Some(d) = sha256 {
            let c = base64::engine::general_purpose::STANDARD.encode(d);
            headers.push(("x-amz-checksum-sha256", c));
        }
        if let Some(d) = stamp {
            headers.push((STAMP, d.hex().to_string()));
        }
        let mut action = self.bucket.put_object(Some(&self.creds), key);
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        let url = action.sign(SIGN_FOR);
        let resp = self.send("put", key, true, || {
            let mut r = self.agent.put(url.as_str());
            for (k, v) in &headers {
                r = r.header(*k, v);
            }
            r.send(body)
        })?;
        self.ok("put", key, resp).map(drop)
    }

    /// DELETE (absent is fine: S3 answers 204 either way).
    pub(super) fn delete(&self, key: &str) -> Result<()> {
        let url = self
            .bucket
            .delete_object(Some(&self.creds), key)
            .sign(SIGN_FOR);
        let resp = self.send("delete", key, true, || {
            self.agent.delete(url.as_str()).call()
        })?;
        if resp.status().as_u16() == 404 {
            return Ok(());
        }
        self.ok("delete", key, resp).map(drop)
    }

    /// `x-amz-copy-source` of `key` in this bucket.
    fn copy_source(&self, key: &str) -> String {
        use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
        const KEEP: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'/')
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        format!(
            "/{}/{}",
            utf8_percent_encode(self.bucket.name(), KEEP),
            utf8_percent_encode(key, KEEP)
        )
    }

    /// Server-side copy (CopyObject, a PUT with `x-amz-copy-source`): `false`
    /// if `src` is not there. S3 copies up to 5 GiB this way. The copy keeps
    /// the source's metadata, or with `stamp` carries that as its [`STAMP`]
    /// instead (also onto itself: `src` == `dst`).
    pub(super) fn copy(&self, src: &str, dst: &str, stamp: Option<&Digest>) -> Result<bool> {
        let mut headers = vec![("x-amz-copy-source", self.copy_source(src))];
        if let Some(d) = stamp {
            headers.push(("x-amz-metadata-directive", "REPLACE".to_string()));
            headers.push((STAMP, d.hex().to_string()));
        }
        let mut action = self.bucket.put_object(Some(&self.creds), dst);
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        let url = action.sign(SIGN_FOR);
        let resp = self.send("copy", dst, false, || {
            let mut r = self.agent.put(url.as_str());
            for (k, v) in &headers {
                r = r.header(*k, v);
            }
            r.send_empty()
        })?;
        if resp.status().as_u16() == 404 {
            return Ok(false);
        }
        let resp = self.ok("copy", dst, resp)?;
        // S3 may answer 200 and report the failure in the body
        let body = self.read_xml("copy", dst, resp)?;
        if body.contains("<Error>") {
            let code = xml_tag(&body, "Code").unwrap_or("");
            if code == "NoSuchKey" {
                return Ok(false);
            }
            let message = xml_tag(&body, "Message").unwrap_or("");
            return Err(self.err(
                "copy",
                dst,
                io::ErrorKind::Other,
                format!("copy from {src}: {code}: {message}"),
            ));
        }
        Ok(true)
    }

    /// Every object under `prefix`, page by page (ListObjectsV2), to `each`
    /// (which returns `false` to stop).
    pub(super) fn list(&self, prefix: &str, each: &mut dyn FnMut(Object) -> bool) -> Result<()> {
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.creds));
            action.with_prefix(prefix);
            action.with_max_keys(1000);
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(SIGN_FOR);
            let resp = self.send("list", prefix, true, || self.agent.get(url.as_str()).call())?;
            let resp = self.ok("list", prefix, resp)?;
            let xml = self.read_xml("list", prefix, resp)?;
            let page =
                ListObjectsV2::parse_response(&xml).map_err(|e| self.bad_xml("list", prefix, e))?;
            for c in page.contents {
                let o = Object {
                    size: c.size.unwrap_or(0),
                    key: c.key,
                    last_modified: c.last_modified,
                    stamp: None,
                };
                if !each(o) {
                    return Ok(());
                }
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }

    /// CreateMultipartUpload: the upload id. With `stamp`, the object carries it
    /// as its [`STAMP`] once completed.
    pub(super) fn create_multipart(&self, key: &str, stamp: Option<&Digest>) -> Result<String> {
        let stamp = stamp.map(|d| d.hex().to_string());
        let mut action = self.bucket.create_multipart_upload(Some(&self.creds), key);
        if let Some(v) = &stamp {
            action.headers_mut().insert(STAMP, v.clone());
        }
        let url = action.sign(SIGN_FOR);
        let resp = self.send("create multipart upload", key, true, || {
            let mut r = self.agent.post(url.as_str());
            if let Some(v) = &stamp {
                r = r.header(STAMP, v);
            }
            r.send_empty()
        })?;
        let resp = self.ok("create multipart upload", key, resp)?;
        let xml = self.read_xml("create multipart upload", key, resp)?;
        let parsed = CreateMultipartUpload::parse_response(&xml)
            .map_err(|e| self.bad_xml("create multipart upload", key, e))?;
        Ok(parsed.upload_id().to_string())
    }

    /// UploadPart `n` (1-based): its ETag.
    pub(super) fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        n: u16,
        body: &[u8],
    ) -> Result<String> {
        let url = self
            .bucket
            .upload_part(Some(&self.creds), key, n, upload_id)
            .sign(SIGN_FOR);
        let resp = self.send("upload part", key, true, || {
            self.agent.put(url.as_str()).send(body)
        })?;
        let resp = self.ok("upload part", key, resp)?;
        resp.headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| self.bad_xml("upload part", key, "no ETag"))
    }

    /// CompleteMultipartUpload: the object becomes visible.
    pub(super) fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<()> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.creds),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGN_FOR);
        let body = action.body();
        let resp = self.send("complete multipart upload", key, false, || {
            self.agent
                .post(url.as_str())
                .header("content-type", "application/xml")
                .send(body.as_bytes())
        })?;
        let resp = self.ok("complete multipart upload", key, resp)?;
        // S3 may answer 200 and report the failure in the body
        let xml = self.read_xml("complete multipart upload", key, resp)?;
        if xml.contains("<Error>") {
            return Err(self.err(
                "complete multipart upload",
                key,
                io::ErrorKind::Other,
                format!(
                    "{}: {}",
                    xml_tag(&xml, "Code").unwrap_or(""),
                    xml_tag(&xml, "Message").unwrap_or("")
                ),
            ));
        }
        Ok(())
    }

    /// AbortMultipartUpload: its parts are gone (an unknown upload is fine).
    pub(super) fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.creds), key, upload_id)
            .sign(SIGN_FOR);
        let resp = self.send("abort multipart upload", key, true, || {
            self.agent.delete(url.as_str()).call()
        })?;
        if resp.status().as_u16() == 404 {
            return Ok(());
        }
        self.ok("abort multipart upload", key, resp).map(drop)
    }

    /// The bytes uploaded so far to an unfinished multipart upload (ListParts).
    pub(super) fn multipart_bytes(&self, key: &str, upload_id: &str) -> Result<u64> {
        let mut total = 0;
        let mut marker: Option<u16> = None;
        loop {
            let mut action = self.bucket.list_parts(Some(&self.creds), key, upload_id);
            if let Some(m) = marker {
                action.set_part_number_marker(m);
            }
            let url = action.sign(SIGN_FOR);
            let resp = self.send("list parts", key, true, || {
                self.agent.get(url.as_str()).call()
            })?;
            if resp.status().as_u16() == 404 {
                return Ok(total);
            }
            let resp = self.ok("list parts", key, resp)?;
            let xml = self.read_xml("list parts", key, resp)?;
            let page =
                ListParts::parse_response(&xml).map_err(|e| self.bad_xml("list parts", key, e))?;
            total += page.parts.iter().map(|p| p.size).sum::<u64>();
            match page.next_part_number_marker {
                Some(m) => marker = Some(m),
                None => return Ok(total),
            }
        }
    }

    /// Every unfinished multipart upload of a key under `prefix`
    /// (ListMultipartUploads).
    pub(super) fn list_multipart(&self, prefix: &str) -> Result<Vec<Multipart>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        loop {
            let mut query = vec![("uploads", "1"), ("prefix", prefix)];
            if !key_marker.is_empty() {
                query.push(("key-marker", &key_marker));
                if !id_marker.is_empty() {
                    query.push(("upload-id-marker", &id_marker));
                }
            }
            let url = self.sign_raw(Method::Get, self.bucket.base_url().clone(), &query, &[]);
            let resp = self.send("list multipart uploads", prefix, true, || {
                self.agent.get(url.as_str()).call()
            })?;
            let resp = self.ok("list multipart uploads", prefix, resp)?;
            let xml = self.read_xml("list multipart uploads", prefix, resp)?;
            let page: ListUploadsPage = instant_xml::from_str(&xml)
                .map_err(|e| self.bad_xml("list multipart uploads", prefix, e))?;
            out.extend(page.upload.into_iter().map(|u| Multipart {
                key: u.key,
                upload_id: u.upload_id,
            }));
            let next_key = page.next_key_marker.unwrap_or_default();
            if page.is_truncated != Some(true) || next_key.is_empty() {
                return Ok(out);
            }
            if next_key == key_marker && page.next_upload_id_marker.as_deref() == Some(&id_marker) {
                return Err(self.bad_xml(
                    "list multipart uploads",
                    prefix,
                    "a truncated page that does not move on",
                ));
            }
            key_marker = next_key;
            id_marker = page.next_upload_id_marker.unwrap_or_default();
        }
    }
}

/// True when `e` says the server could not be reached or went away (refused,
/// reset or timed-out connections): the same request may succeed later.
fn unreachable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::TimedOut
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// The agent: the system trust store, or `ca_file` trusted as the project's
/// `--ca` is ([`crate::tls::pinned`]); HTTP status codes are answers here,
/// not errors; `*.localhost` resolves to loopback.
fn agent(opts: &S3Options) -> Result<ureq::Agent> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        // CompleteMultipartUpload and CopyObject of a large object take a while
        .timeout_recv_response(Some(Duration::from_secs(300)))
        // a server that stops sending (or taking) bytes midway fails the
        // request rather than holding a download or an upload forever; a
        // long transfer that keeps moving is never cut
        .timeout_per_read(Some(IDLE_MAX))
        .timeout_per_write(Some(IDLE_MAX))
        .max_idle_connections_per_host(16)
        // a download is relayed from here: larger reads from the socket
        .input_buffer_size(1 << 20)
        .user_agent(concat!("imgsrv/", env!("CARGO_PKG_VERSION")));
    match &opts.ca_file {
        Some(ca) => crate::tls::pinned::agent_with_resolver(
            config.build(),
            ca,
            LocalhostResolver::default(),
        )
        .map_err(|e| invalid(format!("S3 ca_file {}: {e:#}", ca.display()))),
        None => {
            let roots = crate::client::system_roots()
                .map_err(|e| invalid(format!("the system trust store: {e}")))?;
            crate::tls::pinned::agent_with_roots(
                config.build(),
                &roots,
                LocalhostResolver::default(),
            )
            .map_err(|e| invalid(format!("the system trust store: {e:#}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_tags_are_read_from_an_s3_error_answer() {
        let xml =
            "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        assert_eq!(xml_tag(xml, "Code"), Some("NoSuchKey"));
        assert_eq!(xml_tag(xml, "Message"), Some("gone"));
        assert_eq!(xml_tag(xml, "Resource"), None);
    }

    #[test]
    fn a_multipart_listing_page_parses() {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult xmlns=\"{XML_NS}\">\
             <Bucket>imgsrv</Bucket><Prefix>uploads/</Prefix><MaxUploads>1000</MaxUploads>\
             <IsTruncated>true</IsTruncated><NextKeyMarker>uploads/a/1.part</NextKeyMarker>\
             <NextUploadIdMarker>ff</NextUploadIdMarker>\
             <Upload><Key>uploads/a/1.part</Key><UploadId>ff</UploadId><Initiated>2026-01-01T00:00:00Z</Initiated></Upload>\
             </ListMultipartUploadsResult>"
        );
        let page: ListUploadsPage = instant_xml::from_str(&xml).unwrap();
        assert_eq!(page.upload.len(), 1);
        assert_eq!(page.upload[0].key, "uploads/a/1.part");
        assert_eq!(page.upload[0].upload_id, "ff");
        assert_eq!(page.is_truncated, Some(true));
        assert_eq!(page.next_key_marker.as_deref(), Some("uploads/a/1.part"));
    }
}
