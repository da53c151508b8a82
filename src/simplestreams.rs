//! The Incus Simple Streams projection (`/streams/v1/index.json`,
//! `/streams/v1/images.json`); the rules are in docs/simplestreams.md.
//!
//! The documents are built from the catalog only when its generation counter
//! moves (a publish, an alias change) or the set of revoked signing keys
//! changes, never per request, and swapped in atomically; requests share the
//! cached bytes (plain and gzip). A counter that cannot be trusted means
//! "rebuild" (see [`StreamsCache`]).
//!
//! Versions whose publication was signed by a key the operator has since
//! revoked are withdrawn from the projection: the Incus client does not check
//! minisign signatures, so for it a compromised key's images must simply
//! disappear. They stay in the catalog (published is immutable), readable
//! through the native API, where `imgsrv verify` refuses them.

use crate::catalog::{Alias, ContentCatalog, ProjectionEntry};
use crate::digest::Digest;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A ready-to-serve JSON document.
pub struct Doc {
    pub bytes: Arc<[u8]>,
    pub gzip: Arc<[u8]>,
    pub etag: String,
}

impl Doc {
    fn new(bytes: Vec<u8>) -> Doc {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&bytes).expect("writing to a Vec cannot fail");
        let gzip = enc.finish().expect("writing to a Vec cannot fail");
        let etag = format!("\"{}\"", &Digest::of(&bytes).hex()[..32]);
        Doc {
            bytes: bytes.into(),
            gzip: gzip.into(),
            etag,
        }
    }
}

pub struct Streams {
    /// The catalog generation these documents were built from; `None` when
    /// the counter could not be trusted (they were built for one request).
    pub generation: Option<i64>,
    pub index: Doc,
    pub images: Doc,
    /// The products the documents were rendered from, newest first (what the
    /// Incus REST API serves, `crate::http::incus_api`).
    pub products: Vec<Product>,
}

/// Documents of one catalog generation, by (visibility set, revoked signers).
type Generation = (i64, HashMap<(Vec<String>, Vec<String>), Arc<Streams>>);

/// Cache of the projection: one document pair per visibility set (the
/// private images a caller may read; empty for anonymous callers) and set of
/// revoked signer key ids, all dropped when the catalog generation moves.
/// Callers with the same sets share one build; no request builds JSON unless
/// something changed.
///
/// The counter lives in a table the sqlite3 shell can reach. Its guards
/// (migration 2) keep it moving forward only, so a generation equal to the
/// cached one means nothing changed. A counter that cannot be trusted anyway
/// (unreadable, or below one this cache has seen: set back by someone who
/// got around the guards) is never cached on: the catalog is asked for a
/// new value, above anything seen, and the documents are rebuilt; if even
/// that fails, they are rebuilt for every request. Stale documents are never
/// served for a broken counter, and a broken counter never fails a request.
#[derive(Default)]
pub struct StreamsCache {
    current: RwLock<Generation>,
    rebuild: Mutex<()>,
    /// The highest generation read so far.
    highest: AtomicI64,
}

/// Distinct visibility sets kept before the cache starts over.
const MAX_VISIBILITY_SETS: usize = 256;

impl StreamsCache {
    /// The documents for a caller who may read the public images plus the
    /// private images in `readable_private`, without the versions signed by
    /// a key in `revoked_signers` (key ids).
    pub fn get(
        &self,
        cat: &dyn ContentCatalog,
        readable_private: &[String],
        revoked_signers: &[String],
    ) -> crate::catalog::Result<Arc<Streams>> {
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        };
        let key = (sorted(readable_private), sorted(revoked_signers));
        let cached = |c: &Generation, generation: Option<i64>| {
            (Some(c.0) == generation)
                .then(|| c.1.get(&key).cloned())
                .flatten()
        };
        let lookup = |generation: Option<i64>| {
            self.current
                .read()
                .ok()
                .and_then(|c| cached(&c, generation))
        };
        let generation = self.trusted_generation(cat);
        if let Some(s) = lookup(generation) {
            return Ok(s);
        }
        // one rebuild at a time; others wait and then reuse its result
        let _guard = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.trusted_generation(cat);
        if let Some(s) = lookup(generation) {
            return Ok(s);
        }
        let visible: HashSet<&str> = key.0.iter().map(String::as_str).collect();
        let revoked: HashSet<&str> = key.1.iter().map(String::as_str).collect();
        let all = cat.projection_entries()?;
        let total = all.len();
        let entries: Vec<ProjectionEntry> = all
            .into_iter()
            .filter(|e| !e.image.is_private() || visible.contains(e.image.name.as_str()))
            .filter(|e| {
                e.signer_key_id
                    .as_deref()
                    .is_none_or(|k| !revoked.contains(k))
            })
            .collect();
        let aliases = cat.all_aliases()?;
        let products = project(&entries, &aliases);
        let (index, images) = render(&products);
        let s = Arc::new(Streams {
            generation,
            index: Doc::new(index),
            images: Doc::new(images),
            products,
        });
        if let (Some(g), Ok(mut c)) = (generation, self.current.write()) {
            if c.0 != g || c.1.len() >= MAX_VISIBILITY_SETS {
                *c = (g, HashMap::new());
            }
            c.1.insert(key.clone(), s.clone());
        }
        log::info!(
            "simplestreams projection rebuilt (generation {}, {} of {total} artifacts, {} private images visible, {} revoked key(s))",
            generation.map_or("unknown".to_string(), |g| g.to_string()),
            entries.len(),
            key.0.len(),
            key.1.len()
        );
        Ok(s)
    }

    /// The catalog's generation if documents may be cached on it: readable
    /// and not behind the highest one seen. Otherwise the catalog is asked
    /// for a new one above it; `None` if that fails too.
    fn trusted_generation(&self, cat: &dyn ContentCatalog) -> Option<i64> {
        let seen = self.highest.load(Ordering::SeqCst);
        let found = match cat.generation() {
            Ok(Some(g)) if g >= seen => {
                self.highest.fetch_max(g, Ordering::SeqCst);
                return Some(g);
            }
            Ok(Some(g)) => format!("{g}, behind {seen} seen before"),
            Ok(None) => "missing or unreadable".to_string(),
            Err(e) => format!("unreadable ({e})"),
        };
        match cat.renew_generation(seen) {
            Ok(g) => {
                log::warn!(
                    "simplestreams: the catalog's generation counter was {found}; set to {g}, projection rebuilt"
                );
                self.highest.fetch_max(g, Ordering::SeqCst);
                Some(g)
            }
            Err(e) => {
                log::error!(
                    "simplestreams: the catalog's generation counter is {found} and cannot be set ({e}); \
                     the projection is rebuilt for every request until it can"
                );
                None
            }
        }
    }
}

/// Incus root item names by ftype.
fn root_item_key(ftype: &str) -> &'static str {
    match ftype {
        "squashfs" => "root.squashfs",
        "disk-kvm.img" => "disk.qcow2",
        _ => "root.tar.xz",
    }
}

/// `combined_*` field(s) on the metadata item for a root ftype.
fn combined_fields(ftype: &str) -> &'static [&'static str] {
    match ftype {
        "squashfs" => &["combined_squashfs_sha256"],
        "disk-kvm.img" => &["combined_disk-kvm-img_sha256"],
        _ => &["combined_rootxz_sha256", "combined_sha256"],
    }
}

fn kind(ftype: &str) -> &'static str {
    if ftype == "disk-kvm.img" {
        "virtual-machine"
    } else {
        "container"
    }
}

/// Serial (the Simple Streams version name): the version itself when it
/// starts with a valid YYYYMMDD date, else the publication time.
pub fn serial(version: &str, published_at: &str) -> String {
    if version.len() >= 8 && chrono::NaiveDate::parse_from_str(&version[..8], "%Y%m%d").is_ok() {
        return version.to_string();
    }
    match chrono::DateTime::parse_from_rfc3339(published_at) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y%m%d_%H%M%S")
            .to_string(),
        Err(_) => format!("19700101_{version}"),
    }
}

/// Path of an artifact download as listed in the stream. The last segment is
/// a file name only: Incus names exported files after it, so the metadata
/// and the root must not share one. The route ignores it.
pub fn download_path(image: &str, version: &str, artifact_id: &str, ftype: &str) -> String {
    let ext = match ftype {
        "squashfs" => "squashfs",
        "disk-kvm.img" => "qcow2",
        _ => "rootfs.tar.xz",
    };
    format!("v1/images/{image}/versions/{version}/artifacts/{artifact_id}/download/{image}-{version}.{ext}")
}

/// Path of an attachment download (the metadata tarball) in the stream.
pub fn attachment_path(
    image: &str,
    version: &str,
    artifact_id: &str,
    attachment_id: &str,
    name: &str,
) -> String {
    format!(
        "v1/images/{image}/versions/{version}/artifacts/{artifact_id}/attachments/{attachment_id}/download/{image}-{version}.{name}"
    )
}

/// One Simple Streams product: one version of one image for one os, architecture
/// and variant, with its roots (a container and/or a VM) and its aliases. The Simple
/// Streams documents are rendered from these, and the Incus REST API
/// (`crate::http::incus_api`) derives its images and aliases from the same list, so
/// the rules (what is visible, withheld, deduplicated, which version is newest) are
/// applied once.
#[derive(Debug, Clone)]
pub struct Product {
    /// `{image}:{version}:{os}:{arch}:{variant}`
    pub key: String,
    pub serial: String,
    pub published_at: String,
    /// Never empty: the roots whose fingerprint no newer product already lists.
    /// Every root shares the product's image, version, os, architecture and variant.
    pub roots: Vec<ProjectionEntry>,
    pub aliases: BTreeSet<String>,
}

fn lc(s: &str) -> String {
    s.to_lowercase()
        .replace(|c: char| c.is_whitespace() || c == ',' || c == '/', "-")
}

fn meta<'a>(e: &'a ProjectionEntry, key: &str) -> Option<&'a str> {
    e.version
        .metadata
        .get(key)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// The product's `os`: the version metadata's, else the artifact's operating system.
pub(crate) fn os_of(e: &ProjectionEntry) -> &str {
    meta(e, "os").unwrap_or(&e.artifact.operating_system)
}

/// The product's `release`: the version metadata's, else the version name.
pub(crate) fn release_of(e: &ProjectionEntry) -> &str {
    meta(e, "release").unwrap_or(&e.version.version)
}

/// Version metadata key holding the aliases an upstream Simple Streams
/// product had (comma-separated), kept by `imgsrv mirror`.
pub const UPSTREAM_ALIASES: &str = "simplestreams.aliases";

/// The usable upstream aliases of a version: no spaces or commas, and none
/// the client would take for something else.
fn upstream_aliases(e: &ProjectionEntry) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for a in meta(e, UPSTREAM_ALIASES).unwrap_or_default().split(',') {
        let ok = !a.is_empty()
            && a.len() <= 255
            && !a.starts_with('/')
            && !a.ends_with('/')
            && !a.chars().any(|c| c.is_whitespace() || c.is_control());
        if ok && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Builds `(index.json, images.json)`.
pub fn build(entries: &[ProjectionEntry], aliases: &[(String, Alias)]) -> (Vec<u8>, Vec<u8>) {
    render(&project(entries, aliases))
}

/// The products of `entries` (already filtered to what the caller may see), newest
/// first, each fingerprint in one product only, with their aliases.
pub fn project(entries: &[ProjectionEntry], aliases: &[(String, Alias)]) -> Vec<Product> {
    // group artifacts into products: one per (image, version, os, arch, variant)
    let mut products: BTreeMap<(String, String, String, String, String), Product> = BTreeMap::new();
    for e in entries {
        let k = (
            e.image.name.clone(),
            e.version.version.clone(),
            e.artifact.operating_system.clone(),
            e.artifact.architecture.clone(),
            e.artifact.variant.clone(),
        );
        let p = products.entry(k).or_insert_with(|| Product {
            key: format!(
                "{}:{}:{}:{}:{}",
                e.image.name,
                e.version.version,
                lc(&e.artifact.operating_system),
                e.artifact.architecture,
                e.artifact.variant
            ),
            serial: serial(&e.version.version, &e.published_at),
            published_at: e.published_at.clone(),
            roots: Vec::new(),
            aliases: BTreeSet::new(),
        });
        p.roots.push(e.clone());
    }
    let mut products: Vec<Product> = products.into_values().collect();
    // newest first: what Incus would prefer, and the order in which
    // duplicate fingerprints are resolved (the newest keeps it)
    products.sort_by(|a, b| {
        (&b.serial, &b.published_at, &a.key).cmp(&(&a.serial, &a.published_at, &b.key))
    });

    // every fingerprint appears once in the whole stream
    let mut seen: HashSet<Digest> = HashSet::new();
    for p in &mut products {
        p.roots.retain(|e| {
            let fresh = seen.insert(e.combined_sha256);
            if !fresh {
                log::warn!(
                    "simplestreams: {}@{} artifact {} repeats fingerprint {} of a newer version; not listed twice",
                    e.image.name,
                    e.version.version,
                    e.artifact.id,
                    e.combined_sha256.hex()
                );
            }
            fresh
        });
    }
    products.retain(|p| !p.roots.is_empty());

    // movable aliases by version id
    let mut by_version: HashMap<&str, Vec<&str>> = HashMap::new();
    for (_, a) in aliases {
        by_version
            .entry(a.version_id.as_str())
            .or_default()
            .push(a.alias.as_str());
    }
    // newest product per (image, variant, arch, kind) and per distro key
    let mut newest_image: HashSet<(String, String, String, &str)> = HashSet::new();
    let mut newest_distro: HashSet<(String, String, String, String, &str)> = HashSet::new();
    // every alias given so far, per (alias, arch, kind), with its image: an
    // upstream alias kept by `imgsrv mirror` goes only where no newer product
    // of another image has it (for one image, Incus itself prefers the newest)
    let mut claimed: HashMap<(String, String, &str), String> = HashMap::new();
    for p in &mut products {
        let e = &p.roots[0];
        let image = &e.image.name;
        p.aliases.insert(format!("{image}/{}", e.version.version));
        for a in by_version.get(e.version.id.as_str()).into_iter().flatten() {
            p.aliases.insert(format!("{image}/{a}"));
        }
        let (os, release, variant, arch) = (
            lc(os_of(e)),
            lc(release_of(e)),
            e.artifact.variant.clone(),
            e.artifact.architecture.clone(),
        );
        let mut newest_kinds: Vec<&str> = Vec::new();
        for r in &p.roots {
            let k = kind(&r.ftype);
            if newest_image.insert((image.clone(), variant.clone(), arch.clone(), k)) {
                p.aliases.insert(image.clone());
                newest_kinds.push(k);
            }
            if newest_distro.insert((
                os.clone(),
                release.clone(),
                variant.clone(),
                arch.clone(),
                k,
            )) {
                p.aliases.insert(format!("{os}/{release}/{variant}"));
                if variant == "default" {
                    p.aliases.insert(format!("{os}/{release}"));
                }
            }
        }
        let kinds: BTreeSet<&str> = p.roots.iter().map(|r| kind(&r.ftype)).collect();
        for a in &p.aliases {
            for k in &kinds {
                claimed
                    .entry((a.clone(), arch.clone(), k))
                    .or_insert_with(|| image.clone());
            }
        }
        // the upstream's aliases, on the newest version like `{image}`
        if newest_kinds.is_empty() {
            continue;
        }
        for a in upstream_aliases(e) {
            let taken = kinds.iter().any(|k| {
                claimed
                    .get(&(a.to_string(), arch.clone(), *k))
                    .is_some_and(|owner| owner != image)
            });
            if taken {
                continue;
            }
            for k in &kinds {
                claimed
                    .entry((a.to_string(), arch.clone(), k))
                    .or_insert_with(|| image.clone());
            }
            p.aliases.insert(a.to_string());
        }
    }
    products
}

/// Renders `(index.json, images.json)` from the products.
fn render(products: &[Product]) -> (Vec<u8>, Vec<u8>) {
    let mut out_products = Map::new();
    for p in products {
        let e = &p.roots[0];
        let mut items = Map::new();
        // one metadata item per distinct metadata tarball, for Incus and LXD
        let mut metas: BTreeMap<Digest, (&ProjectionEntry, Map<String, Value>)> = BTreeMap::new();
        for r in &p.roots {
            let m = metas
                .entry(r.metadata.blob_digest)
                .or_insert_with(|| (r, Map::new()));
            for f in combined_fields(&r.ftype) {
                m.1.insert((*f).to_string(), Value::String(r.combined_sha256.hex()));
            }
            items.insert(
                root_item_key(&r.ftype).to_string(),
                json!({
                    "ftype": r.ftype,
                    "path": download_path(&r.image.name, &r.version.version, &r.artifact.id, &r.ftype),
                    "size": r.artifact.primary_blob_size_bytes,
                    "sha256": r.artifact.primary_blob_digest.hex(),
                }),
            );
        }
        for (i, (_, (owner, combined))) in metas.iter().enumerate() {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!(".{}", i + 1)
            };
            for ftype in ["incus.tar.xz", "lxd.tar.xz"] {
                let mut item = Map::new();
                item.insert("ftype".into(), json!(ftype));
                item.insert(
                    "path".into(),
                    json!(attachment_path(
                        &owner.image.name,
                        &owner.version.version,
                        &owner.artifact.id,
                        &owner.metadata.id,
                        &owner.metadata.name
                    )),
                );
                item.insert("size".into(), json!(owner.metadata.blob_size_bytes));
                item.insert("sha256".into(), json!(owner.metadata.blob_digest.hex()));
                item.extend(combined.clone());
                items.insert(format!("{ftype}{suffix}"), Value::Object(item));
            }
        }
        let requirements: Map<String, Value> = e
            .version
            .metadata
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("requirements.")
                    .map(|r| (r.to_string(), Value::String(v.clone())))
            })
            .collect();
        let os = os_of(e);
        let release = release_of(e);
        let mut product = Map::new();
        product.insert(
            "aliases".into(),
            json!(p.aliases.iter().cloned().collect::<Vec<_>>().join(",")),
        );
        product.insert("arch".into(), json!(e.artifact.architecture));
        product.insert("os".into(), json!(os));
        product.insert("release".into(), json!(release));
        product.insert(
            "release_title".into(),
            json!(meta(e, "release_title").unwrap_or(release)),
        );
        if let Some(c) = meta(e, "release_codename") {
            product.insert("release_codename".into(), json!(c));
        }
        product.insert("variant".into(), json!(e.artifact.variant));
        product.insert("requirements".into(), Value::Object(requirements.clone()));
        product.insert("lxd_requirements".into(), Value::Object(requirements));
        let mut version = Map::new();
        version.insert("items".into(), Value::Object(items));
        if let Some(l) = meta(e, "label") {
            version.insert("label".into(), json!(l));
        }
        product.insert(
            "versions".into(),
            json!({ p.serial.clone(): Value::Object(version) }),
        );
        out_products.insert(p.key.clone(), Value::Object(product));
    }

    let updated = products
        .iter()
        .map(|p| p.published_at.as_str())
        .max()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.to_rfc2822())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".to_string());
    let product_keys: Vec<&String> = out_products.keys().collect();
    let index = json!({
        "format": "index:1.0",
        "updated": updated,
        "index": {
            "images": {
                "datatype": "image-downloads",
                "path": "streams/v1/images.json",
                "format": "products:1.0",
                "updated": updated,
                "products": product_keys,
            }
        }
    });
    let images = json!({
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "updated": updated,
        "products": out_products,
    });
    (
        serde_json::to_vec(&index).expect("JSON value serializes"),
        serde_json::to_vec(&images).expect("JSON value serializes"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::{Artifact, Attachment, Image, ImageVersion, VersionState};

    /// A published artifact of `image`@`version` (published at `day`) whose
    /// root is `ftype`, with version metadata `meta`.
    pub(crate) fn entry(
        image: &str,
        version: &str,
        day: u32,
        ftype: &str,
        meta: &[(&str, &str)],
    ) -> ProjectionEntry {
        let id = format!("{image}@{version}");
        let d = |s: &str| Digest::of(format!("{id}{s}").as_bytes());
        let t = format!("2026-01-{day:02}T00:00:00Z");
        ProjectionEntry {
            image: Image {
                id: image.into(),
                name: image.into(),
                display_name: None,
                description: None,
                visibility: "public".into(),
                created_at: t.clone(),
                updated_at: t.clone(),
            },
            version: ImageVersion {
                id: id.clone(),
                image_id: image.into(),
                image_name: image.into(),
                version: version.into(),
                state: VersionState::Published,
                metadata: meta
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                published_at: Some(t.clone()),
                created_at: t.clone(),
                updated_at: t.clone(),
            },
            published_at: t.clone(),
            artifact: Artifact {
                id: format!("{id}{ftype}"),
                version_id: id.clone(),
                variant: "default".into(),
                operating_system: "debian".into(),
                architecture: "amd64".into(),
                format: ftype.into(),
                primary_blob_digest: d(ftype),
                primary_blob_size_bytes: 4,
                primary_media_type: "application/octet-stream".into(),
                created_at: t.clone(),
                updated_at: t.clone(),
            },
            metadata: Attachment {
                id: format!("{id}m"),
                artifact_id: format!("{id}{ftype}"),
                name: "incus.tar.xz".into(),
                media_type: "application/x-xz".into(),
                blob_digest: d("meta"),
                blob_size_bytes: 4,
                created_at: t.clone(),
                updated_at: t,
            },
            ftype: ftype.into(),
            combined_sha256: d(&format!("fp{ftype}")),
            signer_key_id: None,
        }
    }

    /// Product key → its aliases, from images.json.
    fn aliases_of(images: &[u8]) -> BTreeMap<String, BTreeSet<String>> {
        let v: Value = serde_json::from_slice(images).unwrap();
        v["products"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, p)| {
                let a = p["aliases"].as_str().unwrap();
                (k.clone(), a.split(',').map(str::to_string).collect())
            })
            .collect()
    }

    #[test]
    fn upstream_aliases_go_to_the_newest_version_once_per_type_and_arch() {
        let up = [
            ("os", "Debian"),
            ("release", "bookworm"),
            (
                UPSTREAM_ALIASES,
                "debian/12,Debian/bookworm/default,bad alias,,debian/12",
            ),
        ];
        let entries = vec![
            // two versions of the mirrored image, container and VM each
            entry("debian-bookworm", "20260101_0000", 1, "squashfs", &up),
            entry("debian-bookworm", "20260101_0000", 1, "disk-kvm.img", &up),
            entry("debian-bookworm", "20260102_0000", 2, "squashfs", &up),
            entry("debian-bookworm", "20260102_0000", 2, "disk-kvm.img", &up),
            // a newer image (container only) claiming debian/12 first
            entry(
                "other",
                "20260103_0000",
                3,
                "squashfs",
                &[
                    ("os", "Other"),
                    ("release", "1"),
                    (UPSTREAM_ALIASES, "debian/12"),
                ],
            ),
        ];
        let (_, images) = build(&entries, &[]);
        let a = aliases_of(&images);
        let old = &a["debian-bookworm:20260101_0000:debian:amd64:default"];
        let new = &a["debian-bookworm:20260102_0000:debian:amd64:default"];
        let other = &a["other:20260103_0000:debian:amd64:default"];
        assert!(other.contains("debian/12"), "{other:?}");
        assert!(
            new.contains("Debian/bookworm/default"),
            "the upstream alias is kept: {new:?}"
        );
        // the newer `other` container claimed debian/12: not given again,
        // not even for the VM (aliases are per product)
        assert!(!new.contains("debian/12"), "{new:?}");
        assert!(new.contains("debian-bookworm") && new.contains("debian/bookworm"));
        assert!(!old.contains("debian/12") && !old.contains("Debian/bookworm/default"));
        assert!(old.contains("debian-bookworm/20260101_0000"));
        assert!(
            a.values()
                .all(|s| !s.contains("bad alias") && !s.contains("")),
            "{a:?}"
        );
        // a container-only newer version takes the aliases for containers;
        // the newest VM of the same image keeps them too (Incus prefers the
        // newer serial within one image)
        let entries2 = vec![
            entry("debian-bookworm", "20260101_0000", 1, "squashfs", &up),
            entry("debian-bookworm", "20260101_0000", 1, "disk-kvm.img", &up),
            entry("debian-bookworm", "20260102_0000", 2, "squashfs", &up),
        ];
        let a = aliases_of(&build(&entries2, &[]).1);
        let old = &a["debian-bookworm:20260101_0000:debian:amd64:default"];
        let new = &a["debian-bookworm:20260102_0000:debian:amd64:default"];
        assert!(new.contains("debian/12") && old.contains("debian/12"));
        // without the metadata key: only the generated aliases
        let plain = vec![entry("x", "20260101_0000", 1, "squashfs", &[])];
        let a = aliases_of(&build(&plain, &[]).1);
        let want: BTreeSet<String> = [
            "x",
            "x/20260101_0000",
            "debian/20260101_0000",
            "debian/20260101_0000/default",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(a["x:20260101_0000:debian:amd64:default"], want);
    }

    #[test]
    fn documents_are_built_once_per_generation_and_visibility_set() {
        use crate::catalog::{ContentCatalog, SqliteCatalog};
        let d = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&d.path().join("c.db")).unwrap();
        cat.create_image("secret", None, None, "private").unwrap();
        let cache = StreamsCache::default();
        let a = cache.get(&cat, &[], &[]).unwrap();
        let b = cache.get(&cat, &[], &[]).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "no rebuild without a catalog change");
        let p = cache.get(&cat, &["secret".to_string()], &[]).unwrap();
        assert!(
            !Arc::ptr_eq(&a, &p),
            "another visibility set has its own documents"
        );
        assert!(Arc::ptr_eq(
            &p,
            &cache.get(&cat, &["secret".to_string()], &[]).unwrap()
        ));
        // so has another set of revoked keys (order does not matter)
        let revoked = ["B".to_string(), "A".to_string()];
        let r = cache.get(&cat, &[], &revoked).unwrap();
        assert!(!Arc::ptr_eq(&a, &r));
        let reordered = ["A".to_string(), "B".to_string()];
        assert!(Arc::ptr_eq(&r, &cache.get(&cat, &[], &reordered).unwrap()));
        // any change the generation trigger sees (here: visibility) rebuilds
        cat.set_visibility("secret", "public").unwrap();
        let c = cache.get(&cat, &[], &[]).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(c.generation > a.generation && a.generation.is_some());
    }
}
