//! Reading an upstream Simple Streams tree: the HTTP(S) agent, safe joining
//! of the tree's relative paths, and the index and products documents with
//! Simple Streams inheritance applied (top → product → version → item: a
//! string field not set at a lower level is inherited from the level above,
//! as the Python reference's readers do; Incus does none, so condensed trees
//! only work through a reader like this one).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{Map, Value};

/// The index every Simple Streams tree has, relative to its base.
pub const INDEX_PATH: &str = "streams/v1/index.json";
/// Index and products documents larger than this are refused.
const MAX_JSON: u64 = 256 << 20;

/// What is percent-encoded in a path taken from the tree: controls, space
/// and the characters that would end or change the meaning of a URL path.
/// `:` stays raw, as the Incus client sends it (`20240209_13:00`).
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'^')
    .add(b'|')
    .add(b'\\');

/// An upstream tree: its base URL and the agent that reads it.
pub struct Upstream {
    base: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish()
    }
}

/// Checks and normalizes an upstream base URL: `http(s)://host[:port][/path]`
/// without a trailing slash, query, fragment or credentials.
pub fn normalize_base(url: &str) -> Result<String> {
    let s = url.trim();
    let lower = s.to_ascii_lowercase();
    if !lower.starts_with("https://") && !lower.starts_with("http://") {
        bail!("upstream URL {url:?}: expected https://host[:port][/path] (or http://)");
    }
    let uri: ureq::http::Uri = s
        .parse()
        .map_err(|e| anyhow!("upstream URL {url:?}: {e}"))?;
    if uri.host().unwrap_or_default().is_empty() {
        bail!("upstream URL {url:?}: no host");
    }
    if uri.query().is_some() || s.contains('#') {
        bail!("upstream URL {url:?}: a query or fragment is not allowed");
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if authority.contains('@') {
        bail!("upstream URL {url:?}: credentials in the URL are not supported");
    }
    let scheme = if lower.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    Ok(format!(
        "{scheme}://{authority}{}",
        uri.path().trim_end_matches('/')
    ))
}

/// Refuses what the Python reference refuses (`assert_safe_path`) and what
/// would leave the tree: absolute URLs, absolute paths, `..` segments,
/// backslashes, queries and fragments.
pub fn check_relative_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.starts_with('/') {
        return Err(format!("absolute path {p:?} refused"));
    }
    let before_slash = p.split('/').next().unwrap_or_default();
    if before_slash.contains("://")
        || p.contains("://")
        || before_slash
            .split_once(':')
            .is_some_and(|(scheme, _)| is_scheme(scheme))
    {
        return Err(format!(
            "absolute URL {p:?} refused: paths must be relative"
        ));
    }
    if p.contains('\\') || p.contains('?') || p.contains('#') {
        return Err(format!("path {p:?} refused (\\, ? and # are not allowed)"));
    }
    if p.split('/').any(|seg| seg == "..") {
        return Err(format!("path {p:?} refused: it contains '..'"));
    }
    if p.chars().any(char::is_control) {
        return Err(format!("path {p:?} refused: control characters"));
    }
    Ok(())
}

/// `http`, `https`, `file`, `ftp`, ...: what a URL scheme looks like.
/// (`20240209_13:00` starts with a digit, so it is not one.)
fn is_scheme(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// Why a request failed, and whether trying again may help.
#[derive(Debug)]
pub struct FetchError {
    pub message: String,
    /// Network errors and 5xx answers.
    pub retryable: bool,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FetchError {}

impl Upstream {
    /// `url`: the tree's base; `ca`: PEM roots to trust instead of the system
    /// store for https.
    pub fn new(url: &str, ca: Option<&Path>) -> Result<Upstream> {
        let base = normalize_base(url)?;
        // an https upstream stays https (a redirect to http:// fails)
        let https = base.starts_with("https://");
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(https)
            .max_redirects(5)
            .user_agent(concat!("imgsrv-mirror/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)));
        // the same trust rules as the API client (a --upstream-ca is pinned)
        let agent = crate::client::https_agent(config, ca)?;
        Ok(Upstream { base, agent })
    }

    /// The normalized base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Plain `http://`: the JSON, and so every sha256 in it, can be changed
    /// on the way.
    pub fn insecure(&self) -> bool {
        self.base.starts_with("http://")
    }

    /// The URL of a path in the tree (checked with [`check_relative_path`]).
    pub fn url(&self, rel: &str) -> Result<String, String> {
        check_relative_path(rel)?;
        Ok(format!("{}/{}", self.base, utf8_percent_encode(rel, PATH)))
    }

    /// GET a path; `from > 0` asks for the bytes from there on (`Range`).
    /// Returns the response whatever its status; transport errors are
    /// retryable.
    pub fn get(
        &self,
        rel: &str,
        from: u64,
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let url = self.url(rel).map_err(|m| FetchError {
            message: m,
            retryable: false,
        })?;
        let mut req = self.agent.get(&url).header("Accept-Encoding", "identity");
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        req.call().map_err(|e| FetchError {
            message: format!("GET {url}: {e}"),
            retryable: true,
        })
    }

    /// GET and parse a JSON document (gzip accepted).
    pub fn get_json(&self, rel: &str) -> Result<Value> {
        let url = self.url(rel).map_err(|m| anyhow!(m))?;
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        if status != 200 {
            bail!("GET {url}: HTTP {status}");
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_vec()
            .with_context(|| format!("GET {url}: reading the body"))?;
        serde_json::from_slice(&bytes).with_context(|| format!("GET {url}: not valid JSON"))
    }
}

/// Turns a read error of a response body into a retryable fetch error.
pub fn body_error(url: &str, e: io::Error) -> FetchError {
    FetchError {
        message: format!("{url}: reading the body: {e}"),
        retryable: true,
    }
}

// ------------------------------------------------------------ documents

/// String fields of one level (numbers and booleans as text: the Python
/// reference inherits every scalar). Objects and arrays are not inherited.
fn scalars(obj: &Map<String, Value>) -> BTreeMap<String, String> {
    obj.iter()
        .filter_map(|(k, v)| {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((k.clone(), s))
        })
        .collect()
}

/// `parent` overlaid with the scalars of `obj`.
fn inherit(
    parent: &BTreeMap<String, String>,
    obj: &Map<String, Value>,
) -> BTreeMap<String, String> {
    let mut out = parent.clone();
    out.extend(scalars(obj));
    out
}

/// The products files an index points at (entries with `datatype:
/// image-downloads`, the datatype inherited from the top level), in index
/// order, without repeats.
pub fn index_paths(index: &Value) -> Result<Vec<String>> {
    let top = index
        .as_object()
        .context("the index is not a JSON object")?;
    let entries = top
        .get("index")
        .and_then(Value::as_object)
        .context("the index has no \"index\" object")?;
    let top_fields = scalars(top);
    let mut out: Vec<String> = Vec::new();
    for (key, entry) in entries {
        let Some(entry) = entry.as_object() else {
            continue;
        };
        let fields = inherit(&top_fields, entry);
        if fields.get("datatype").map(String::as_str) != Some("image-downloads") {
            continue;
        }
        let path = entry
            .get("path")
            .and_then(Value::as_str)
            .with_context(|| format!("index entry {key:?} has no path"))?;
        check_relative_path(path).map_err(|e| anyhow!("index entry {key:?}: {e}"))?;
        if !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    Ok(out)
}

/// A field's value, `None` when absent or empty.
fn non_empty<'a>(fields: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    fields.get(k).map(String::as_str).filter(|s| !s.is_empty())
}

/// One item of a version, with inherited fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub fields: BTreeMap<String, String>,
    /// `size` (an integer on the item itself; never inherited).
    pub size: Option<u64>,
}

impl Item {
    pub fn get(&self, k: &str) -> Option<&str> {
        non_empty(&self.fields, k)
    }
}

/// One version of a product, with inherited fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub name: String,
    pub fields: BTreeMap<String, String>,
    pub items: Vec<Item>,
}

/// One product, with the top level's fields inherited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub key: String,
    /// The products file it came from.
    pub file: String,
    pub fields: BTreeMap<String, String>,
    /// `requirements` (values as text).
    pub requirements: BTreeMap<String, String>,
    pub versions: Vec<Version>,
}

impl Product {
    pub fn get(&self, k: &str) -> Option<&str> {
        non_empty(&self.fields, k)
    }
}

/// Parses a products document (`products:1.0`) into products with every
/// level's inherited fields filled in.
pub fn parse_products(doc: &Value, file: &str) -> Result<Vec<Product>> {
    let top = doc
        .as_object()
        .with_context(|| format!("{file}: not a JSON object"))?;
    let products = top
        .get("products")
        .and_then(Value::as_object)
        .with_context(|| format!("{file}: no \"products\" object"))?;
    let top_fields = scalars(top);
    let mut out = Vec::new();
    for (pkey, p) in products {
        let p = p
            .as_object()
            .with_context(|| format!("{file}: product {pkey:?} is not an object"))?;
        let fields = inherit(&top_fields, p);
        let requirements = p
            .get("requirements")
            .and_then(Value::as_object)
            .map(scalars)
            .unwrap_or_default();
        let mut versions = Vec::new();
        for (vname, v) in p
            .get("versions")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let Some(v) = v.as_object() else { continue };
            let vfields = inherit(&fields, v);
            let mut items = Vec::new();
            for (ikey, it) in v
                .get("items")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let Some(it) = it.as_object() else { continue };
                items.push(Item {
                    key: ikey.clone(),
                    fields: inherit(&vfields, it),
                    size: it.get("size").and_then(Value::as_u64),
                });
            }
            versions.push(Version {
                name: vname.clone(),
                fields: vfields,
                items,
            });
        }
        out.push(Product {
            key: pkey.clone(),
            file: file.to_string(),
            fields,
            requirements,
            versions,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn relative_paths_only() {
        for ok in [
            "images/a.squashfs",
            "images/debian/bookworm/amd64/default/20240209_13:00/incus.tar.xz",
            "v1/images/x/versions/20260101_0000/artifacts/1/download/x.squashfs",
            "streams/v1/images.json",
            "a/./b",
        ] {
            assert!(check_relative_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "https://evil.example/x",
            "http:/x",
            "file:x",
            "//evil.example/x",
            "../x",
            "images/../../x",
            "images/..",
            "a\\b",
            "a?b=1",
            "a#b",
            "a\nb",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn base_urls_are_normalized_and_checked() {
        assert_eq!(
            normalize_base("https://Images.example.org/").unwrap(),
            "https://Images.example.org"
        );
        assert_eq!(
            normalize_base("http://127.0.0.1:8080/mirror/").unwrap(),
            "http://127.0.0.1:8080/mirror"
        );
        for bad in [
            "ftp://x",
            "images.example.org",
            "https://u:p@x/",
            "https://x/?a=1",
            "https://x/#f",
        ] {
            assert!(normalize_base(bad).is_err(), "{bad} accepted");
        }
        let u = Upstream::new("http://127.0.0.1:1/base/", None).unwrap();
        assert!(u.insecure());
        assert_eq!(
            u.url("images/a b:c.tar.xz").unwrap(),
            "http://127.0.0.1:1/base/images/a%20b:c.tar.xz"
        );
        assert!(u.url("../x").is_err());
    }

    #[test]
    fn index_lists_image_download_entries_once() {
        let idx = json!({"format":"index:1.0","datatype":"image-downloads","index":{
            "a":{"path":"streams/v1/images.json","products":["x"]},
            "b":{"datatype":"content-download","path":"streams/v1/other.json"},
            "c":{"datatype":"image-downloads","path":"streams/v1/images.json"},
            "d":{"datatype":"image-downloads","path":"streams/v1/more.json"}}});
        assert_eq!(
            index_paths(&idx).unwrap(),
            ["streams/v1/images.json", "streams/v1/more.json"]
        );
        let evil =
            json!({"index":{"a":{"datatype":"image-downloads","path":"https://evil/x.json"}}});
        assert!(index_paths(&evil).is_err());
    }

    #[test]
    fn condensed_trees_are_expanded_by_inheritance() {
        // as the Python reference condenses: shared fields moved up
        let doc = json!({
            "format": "products:1.0",
            "arch": "amd64",
            "products": {
                "p": {
                    "os": "debian", "release": "bookworm",
                    "requirements": {"secureboot": false},
                    "versions": {
                        "20240101": {
                            "ftype": "squashfs",
                            "items": {
                                "root": {"path": "a.squashfs", "sha256": "aa", "size": 4},
                                "meta": {"ftype": "incus.tar.xz", "path": "m", "sha256": "bb", "size": 2, "release": "12"}
                            }
                        }
                    }
                }
            }
        });
        let ps = parse_products(&doc, "streams/v1/images.json").unwrap();
        assert_eq!(ps.len(), 1);
        let p = &ps[0];
        assert_eq!(p.get("arch"), Some("amd64"), "top level inherited");
        assert_eq!(p.requirements["secureboot"], "false");
        let v = &p.versions[0];
        let root = v.items.iter().find(|i| i.key == "root").unwrap();
        assert_eq!(
            root.get("ftype"),
            Some("squashfs"),
            "version level inherited"
        );
        assert_eq!(root.get("arch"), Some("amd64"));
        assert_eq!(root.get("os"), Some("debian"));
        assert_eq!(root.size, Some(4));
        let meta = v.items.iter().find(|i| i.key == "meta").unwrap();
        assert_eq!(meta.get("ftype"), Some("incus.tar.xz"), "lower level wins");
        assert_eq!(meta.get("release"), Some("12"));
        assert_eq!(root.get("release"), Some("bookworm"));
    }
}
