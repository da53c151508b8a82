//! From upstream products to imgsrv versions: naming, Incus pairing of
//! metadata and root items, filters, and the version metadata that keeps the
//! upstream's provenance and aliases.
//!
//! Pairing follows the Incus client: in each version, every metadata item
//! (`incus.tar.xz`, also `lxd.tar.xz`) pairs with every root item
//! (`squashfs` → container, `disk-kvm.img` → virtual machine, `root.tar.xz`
//! → container), and the pair's fingerprint is the metadata item's
//! `combined_*` field for that root (a pair without one is dropped, as Incus
//! drops it). Deltas and unified images are not mirrored.

use std::collections::{BTreeMap, BTreeSet};

use super::streams::{Item, Product};
use super::ImageType;
use crate::digest::Digest;

/// The server's limits on version metadata.
const MAX_METADATA_ENTRIES: usize = 256;
const MAX_METADATA_KEY: usize = 128;
const MAX_METADATA_VALUE: usize = 4096;

/// What the filters select (all case-insensitive; `None` selects all).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub os: Option<String>,
    pub release: Option<String>,
    pub variant: Option<String>,
    pub arch: Option<String>,
    pub kind: Option<ImageType>,
    pub image: Option<String>,
    pub latest: Option<usize>,
}

/// One upstream file: where it is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub item_key: String,
    pub path: String,
    pub sha256: Digest,
    pub size: u64,
}

/// A root and the metadata tarball it pairs with: one imgsrv artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub product: String,
    pub kind: ImageType,
    /// imgsrv artifact format: `squashfs`, `qcow2` or `tar.xz`.
    pub format: &'static str,
    pub media_type: &'static str,
    pub variant: String,
    pub os: String,
    /// The product's `arch`, as the upstream spells it.
    pub arch: String,
    pub meta: FileRef,
    pub root: FileRef,
    /// The upstream's `combined_*` hash: the Incus fingerprint.
    pub fingerprint: Digest,
}

/// One imgsrv version to create: every selected pair of the upstream
/// products (one per architecture) that map to this image and version.
#[derive(Debug, Clone)]
pub struct VersionPlan {
    pub image: String,
    pub version: String,
    pub products: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub pairs: Vec<Pair>,
    /// imgsrv aliases to point at this version once it is published: the
    /// upstream's `{image}/{alias}` aliases (an imgsrv upstream's movable
    /// aliases).
    pub aliases: Vec<String>,
}

impl VersionPlan {
    pub fn label(&self) -> String {
        format!("{} {}", self.image, self.version)
    }

    /// Every distinct file, metadata first.
    pub fn files(&self) -> Vec<&FileRef> {
        let mut out: Vec<&FileRef> = Vec::new();
        for f in self
            .pairs
            .iter()
            .map(|p| &p.meta)
            .chain(self.pairs.iter().map(|p| &p.root))
        {
            if !out.iter().any(|g| g.sha256 == f.sha256) {
                out.push(f);
            }
        }
        out
    }
}

/// What could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlanFailure {
    /// `{image} {version}` when known, else the upstream product (and version).
    pub what: String,
    pub error: String,
}

/// The result of planning.
#[derive(Debug, Default)]
pub struct Plan {
    pub versions: Vec<VersionPlan>,
    /// Upstream (product, version)s the filters (including `--latest`) left out.
    pub filtered: usize,
    /// Upstream (product, version)s with nothing imgsrv can hold (only
    /// deltas, unified images or unknown items).
    pub unsupported: usize,
    pub failures: Vec<PlanFailure>,
    /// Items of selected versions that are not mirrored.
    pub ignored_deltas: usize,
    pub ignored_unified: usize,
    pub ignored_other: usize,
}

/// `{os}-{release}[-{variant}]` lower-cased, characters outside
/// `[a-z0-9._-]` replaced by `-`.
pub fn image_name(os: &str, release: &str, variant: &str) -> String {
    let mut s = format!("{os}-{release}");
    if !variant.eq_ignore_ascii_case("default") {
        s.push('-');
        s.push_str(variant);
    }
    sanitize(&s, false)
}

/// Lower-cased, characters outside `[a-z0-9._-]` (and `+` when `plus`)
/// replaced by `-`.
fn sanitize(s: &str, plus: bool) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            '+' if plus => c,
            _ => '-',
        })
        .collect()
}

/// `amd64` ≡ `x86_64`, `arm64` ≡ `aarch64`.
pub fn same_arch(a: &str, b: &str) -> bool {
    crate::verify::normalize_arch(a) == crate::verify::normalize_arch(b)
}

/// Root ftypes imgsrv can hold: (kind, artifact format, media type,
/// `combined_*` fields in order of preference).
fn root_kind(
    ftype: &str,
) -> Option<(
    ImageType,
    &'static str,
    &'static str,
    &'static [&'static str],
)> {
    match ftype {
        "squashfs" => Some((
            ImageType::Container,
            "squashfs",
            "application/vnd.squashfs",
            &["combined_squashfs_sha256"],
        )),
        "disk-kvm.img" => Some((
            ImageType::Vm,
            "qcow2",
            "application/x-qemu-disk",
            &["combined_disk-kvm-img_sha256"],
        )),
        "root.tar.xz" => Some((
            ImageType::Container,
            "tar.xz",
            "application/x-xz",
            &["combined_rootxz_sha256", "combined_sha256"],
        )),
        _ => None,
    }
}

fn is_metadata(ftype: &str) -> bool {
    matches!(ftype, "incus.tar.xz" | "lxd.tar.xz")
}

fn file_ref(it: &Item) -> Result<FileRef, String> {
    let path = it
        .get("path")
        .ok_or_else(|| format!("item {} has no path", it.key))?;
    super::streams::check_relative_path(path).map_err(|e| format!("item {}: {e}", it.key))?;
    let sha = it
        .get("sha256")
        .ok_or_else(|| format!("item {} has no sha256", it.key))?;
    let sha256 = Digest::from_hex(&sha.to_ascii_lowercase())
        .map_err(|_| format!("item {}: sha256 {sha:?} is not 64 hex digits", it.key))?;
    let size = it
        .size
        .ok_or_else(|| format!("item {} has no integer size", it.key))?;
    Ok(FileRef {
        item_key: it.key.clone(),
        path: path.to_string(),
        sha256,
        size,
    })
}

fn matches_ci(filter: &Option<String>, value: &str) -> bool {
    filter
        .as_deref()
        .is_none_or(|f| f.eq_ignore_ascii_case(value))
}

/// The pairs of one upstream version (before the type filter), and what
/// was ignored.
struct Paired {
    pairs: Vec<Pair>,
    deltas: usize,
    unified: usize,
    other: usize,
}

fn pair_version(
    p: &Product,
    items: &[Item],
    os: &str,
    variant: &str,
    arch: &str,
) -> Result<Paired, String> {
    let mut out = Paired {
        pairs: Vec::new(),
        deltas: 0,
        unified: 0,
        other: 0,
    };
    // metadata items, incus.tar.xz before lxd.tar.xz, then by key
    let mut metas: Vec<&Item> = items
        .iter()
        .filter(|i| i.get("ftype").is_some_and(is_metadata))
        .collect();
    metas.sort_by_key(|i| (i.get("ftype") != Some("incus.tar.xz"), i.key.clone()));
    for it in items {
        let ftype = it.get("ftype").unwrap_or_default();
        if is_metadata(ftype) {
            continue;
        }
        if ftype.ends_with(".vcdiff") || it.fields.contains_key("delta_base") {
            out.deltas += 1;
            continue;
        }
        if matches!(ftype, "incus_combined.tar.gz" | "lxd_combined.tar.gz") {
            out.unified += 1;
            continue;
        }
        let Some((kind, format, media_type, combined)) = root_kind(ftype) else {
            if matches!(ftype, "disk1.img" | "uefi1.img") {
                out.other += 1;
            }
            continue;
        };
        // the first metadata item that names a fingerprint for this root
        let found = metas.iter().find_map(|m| {
            combined
                .iter()
                .find_map(|f| m.get(f))
                .map(|fp| (*m, fp.to_string()))
        });
        let Some((meta, fp)) = found else {
            continue; // Incus drops such a pair too
        };
        let fingerprint = Digest::from_hex(&fp.to_ascii_lowercase())
            .map_err(|_| format!("item {}: fingerprint {fp:?} is not 64 hex digits", meta.key))?;
        out.pairs.push(Pair {
            product: p.key.clone(),
            kind,
            format,
            media_type,
            variant: variant.to_string(),
            os: os.to_string(),
            arch: arch.to_string(),
            meta: file_ref(meta)?,
            root: file_ref(it)?,
            fingerprint,
        });
    }
    Ok(out)
}

/// Version metadata of one upstream (product, version).
fn version_metadata(
    p: &Product,
    version: &str,
    vfields: &BTreeMap<String, String>,
    pairs: &[Pair],
    upstream: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let get = |k: &str| p.get(k).map(str::to_string);
    for (key, value) in [
        ("os", get("os")),
        ("release", get("release")),
        ("release_title", get("release_title")),
        ("release_codename", get("release_codename")),
        (
            "variant",
            Some(get("variant").unwrap_or_else(|| "default".into())),
        ),
        ("architecture", get("arch")),
        ("serial", Some(version.to_string())),
        ("description", get("description")),
        (
            "label",
            vfields.get("label").cloned().filter(|s| !s.is_empty()),
        ),
        ("simplestreams.aliases", get("aliases")),
        ("upstream.url", Some(upstream.to_string())),
        ("upstream.product", Some(p.key.clone())),
        ("upstream.version", Some(version.to_string())),
    ] {
        if let Some(v) = value {
            m.insert(key.to_string(), v);
        }
    }
    for (k, v) in &p.requirements {
        m.insert(format!("requirements.{k}"), v.clone());
    }
    for pair in pairs {
        for f in [&pair.meta, &pair.root] {
            m.insert(format!("upstream.sha256.{}", f.item_key), f.sha256.hex());
        }
    }
    m
}

/// Merges the metadata of several products (architectures) of one version:
/// `architecture` and `upstream.product` list every value, the aliases are
/// united, file hashes are keyed by product, anything else must agree.
fn merge_metadata(parts: &[BTreeMap<String, String>]) -> Result<BTreeMap<String, String>, String> {
    if parts.len() == 1 {
        return Ok(parts[0].clone());
    }
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut lists: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for m in parts {
        let product = m.get("upstream.product").cloned().unwrap_or_default();
        for (k, v) in m {
            match k.as_str() {
                "architecture" | "upstream.product" => {
                    lists.entry(k.as_str()).or_default().push(v.clone())
                }
                "simplestreams.aliases" => lists
                    .entry("simplestreams.aliases")
                    .or_default()
                    .extend(v.split(',').map(str::to_string)),
                _ if k.starts_with("upstream.sha256.") => {
                    let item = &k["upstream.sha256.".len()..];
                    out.insert(format!("upstream.sha256.{product}/{item}"), v.clone());
                }
                _ => match out.get(k) {
                    Some(prev) if prev != v => {
                        return Err(format!(
                            "the products of this version disagree on {k}: {prev:?} and {v:?}"
                        ))
                    }
                    _ => {
                        out.insert(k.clone(), v.clone());
                    }
                },
            }
        }
    }
    for (k, mut vs) in lists {
        let mut seen = BTreeSet::new();
        vs.retain(|v| !v.is_empty() && seen.insert(v.clone()));
        if k != "simplestreams.aliases" {
            vs.sort();
        }
        out.insert(k.to_string(), vs.join(","));
    }
    Ok(out)
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), String> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(format!(
            "{} metadata entries, the server takes at most {MAX_METADATA_ENTRIES}",
            m.len()
        ));
    }
    for (k, v) in m {
        if k.is_empty()
            || k.len() > MAX_METADATA_KEY
            || v.len() > MAX_METADATA_VALUE
            || k.chars().any(char::is_control)
        {
            return Err(format!(
                "metadata entry {k:?} is not accepted by the server"
            ));
        }
    }
    Ok(())
}

/// One selected upstream (product, version) before grouping.
struct Selected {
    image: String,
    version: String,
    product: String,
    metadata: BTreeMap<String, String>,
    pairs: Vec<Pair>,
    aliases: Vec<String>,
}

/// Plans the mirror of `products` from the upstream at `upstream` (its
/// normalized base URL, recorded in the version metadata).
pub fn plan(products: &[Product], f: &Filters, upstream: &str) -> Plan {
    let mut out = Plan::default();
    let mut selected: Vec<Selected> = Vec::new();
    for p in products {
        let what = format!("product {}", p.key);
        let nversions = p.versions.len();
        let (Some(os), Some(release), Some(arch)) = (p.get("os"), p.get("release"), p.get("arch"))
        else {
            // without them it is no image product Incus would list either
            if f.os.is_some() || f.release.is_some() || f.arch.is_some() {
                out.filtered += nversions;
            } else {
                out.failures.push(PlanFailure {
                    what,
                    error: "no os, release or arch: not an image product".into(),
                });
            }
            continue;
        };
        let variant = p.get("variant").unwrap_or("default");
        let image = image_name(os, release, variant);
        let selected_by_fields = matches_ci(&f.os, os)
            && matches_ci(&f.release, release)
            && matches_ci(&f.variant, variant)
            && f.arch.as_deref().is_none_or(|a| same_arch(a, arch))
            && f.image
                .as_deref()
                .is_none_or(|g| crate::names::scope_matches(g, &image));
        if !selected_by_fields {
            out.filtered += nversions;
            continue;
        }
        let os_token = sanitize(os, true);
        if !crate::names::image_name(&image) {
            out.failures.push(PlanFailure {
                what,
                error: format!(
                    "the image name {image:?} derived from os/release/variant is not valid"
                ),
            });
            continue;
        }
        if let Some((what_tok, v)) = [
            ("os", &os_token),
            ("variant", &variant.to_string()),
            ("arch", &arch.to_string()),
        ]
        .into_iter()
        .find(|(_, v)| !crate::names::token(v))
        {
            out.failures.push(PlanFailure {
                what,
                error: format!("{what_tok} {v:?} is not accepted by imgsrv (expected ^[A-Za-z0-9][A-Za-z0-9._+-]{{0,63}}$)"),
            });
            continue;
        }

        // versions with something to mirror after the type filter, newest first
        let mut candidates: Vec<(String, Selected)> = Vec::new();
        for v in &p.versions {
            let vwhat = format!("product {} version {}", p.key, v.name);
            let paired = match pair_version(p, &v.items, &os_token, variant, arch) {
                Ok(x) => x,
                Err(e) => {
                    out.failures.push(PlanFailure {
                        what: vwhat,
                        error: e,
                    });
                    continue;
                }
            };
            if paired.pairs.is_empty() {
                out.unsupported += 1;
                out.ignored_deltas += paired.deltas;
                out.ignored_unified += paired.unified;
                out.ignored_other += paired.other;
                continue;
            }
            let pairs: Vec<Pair> = paired
                .pairs
                .into_iter()
                .filter(|x| f.kind.is_none_or(|k| k == x.kind))
                .collect();
            if pairs.is_empty() {
                out.filtered += 1;
                continue;
            }
            out.ignored_deltas += paired.deltas;
            out.ignored_unified += paired.unified;
            out.ignored_other += paired.other;
            if !crate::names::version(&v.name) {
                out.failures.push(PlanFailure {
                    what: vwhat,
                    error: format!("version name {:?} is not a valid imgsrv version", v.name),
                });
                continue;
            }
            let metadata = version_metadata(p, &v.name, &v.fields, &pairs, upstream);
            let aliases = p
                .get("aliases")
                .unwrap_or_default()
                .split(',')
                .filter_map(|a| a.strip_prefix(&format!("{image}/")))
                .filter(|a| *a != v.name && crate::names::alias(a))
                .map(str::to_string)
                .collect();
            candidates.push((
                v.name.clone(),
                Selected {
                    image: image.clone(),
                    version: v.name.clone(),
                    product: p.key.clone(),
                    metadata,
                    pairs,
                    aliases,
                },
            ));
        }
        // --latest N: the newest N by lexical order of version names, like Incus
        candidates.sort_by(|a, b| b.0.cmp(&a.0));
        if let Some(n) = f.latest {
            if candidates.len() > n {
                out.filtered += candidates.len() - n;
                candidates.truncate(n);
            }
        }
        selected.extend(candidates.into_iter().map(|(_, s)| s));
    }

    // one imgsrv version per (image, version): the products of the
    // architectures of one release share it
    let mut groups: BTreeMap<(String, String), Vec<Selected>> = BTreeMap::new();
    for s in selected {
        groups
            .entry((s.image.clone(), s.version.clone()))
            .or_default()
            .push(s);
    }
    for ((image, version), mut members) in groups {
        members.sort_by(|a, b| a.product.cmp(&b.product));
        let what = format!("{image} {version}");
        let mut pairs: Vec<Pair> = Vec::new();
        let mut clash = None;
        for m in &members {
            for x in &m.pairs {
                if let Some(y) = pairs.iter().find(|y| {
                    (y.variant.as_str(), y.os.as_str(), y.format)
                        == (x.variant.as_str(), x.os.as_str(), x.format)
                        && same_arch(&y.arch, &x.arch)
                }) {
                    clash = Some(format!(
                        "products {} and {} both give a {} {} image",
                        y.product, x.product, x.arch, x.format
                    ));
                }
                pairs.push(x.clone());
            }
        }
        if let Some(error) = clash {
            out.failures.push(PlanFailure { what, error });
            continue;
        }
        let parts: Vec<BTreeMap<String, String>> =
            members.iter().map(|m| m.metadata.clone()).collect();
        let metadata = match merge_metadata(&parts).and_then(|m| check_metadata(&m).map(|_| m)) {
            Ok(m) => m,
            Err(error) => {
                out.failures.push(PlanFailure { what, error });
                continue;
            }
        };
        let mut aliases: Vec<String> = Vec::new();
        for a in members.iter().flat_map(|m| m.aliases.iter()) {
            if !aliases.contains(a) {
                aliases.push(a.clone());
            }
        }
        out.versions.push(VersionPlan {
            image,
            version,
            products: members.iter().map(|m| m.product.clone()).collect(),
            metadata,
            pairs,
            aliases,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::streams::parse_products;
    use serde_json::json;

    fn h(s: &str) -> String {
        Digest::of(s.as_bytes()).hex()
    }

    fn item(ftype: &str, name: &str) -> serde_json::Value {
        json!({"ftype": ftype, "path": format!("images/{name}"), "sha256": h(name), "size": name.len()})
    }

    /// A product with the given versions, each with a metadata item (incus
    /// and lxd, same file), a squashfs, a qcow2, a delta and a unified item.
    fn product(
        os: &str,
        release: &str,
        arch: &str,
        variant: &str,
        versions: &[&str],
    ) -> serde_json::Value {
        let mut vs = serde_json::Map::new();
        for v in versions {
            let meta = format!("{os}{release}{arch}{v}meta");
            let sq = format!("{os}{release}{arch}{v}sq");
            let qc = format!("{os}{release}{arch}{v}qc");
            let mut m = item("incus.tar.xz", &meta);
            m["combined_squashfs_sha256"] = json!(h(&format!("{meta}{sq}")));
            m["combined_disk-kvm-img_sha256"] = json!(h(&format!("{meta}{qc}")));
            let mut lxd = m.clone();
            lxd["ftype"] = json!("lxd.tar.xz");
            let mut delta = item("squashfs.vcdiff", &format!("{sq}d"));
            delta["delta_base"] = json!("x");
            vs.insert(
                v.to_string(),
                json!({"items": {
                    "incus.tar.xz": m, "lxd.tar.xz": lxd,
                    "root.squashfs": item("squashfs", &sq),
                    "disk.qcow2": item("disk-kvm.img", &qc),
                    "delta": delta,
                    "unified": item("incus_combined.tar.gz", &format!("{sq}u")),
                }}),
            );
        }
        json!({
            "os": os, "release": release, "arch": arch, "variant": variant,
            "release_title": release,
            "aliases": format!("{}/{}/{variant},{}-{}/stable", os.to_lowercase(), release, os.to_lowercase(), release),
            "requirements": {"secureboot": "false"},
            "versions": vs,
        })
    }

    fn products(ps: &[(&str, serde_json::Value)]) -> Vec<Product> {
        let mut m = serde_json::Map::new();
        for (k, v) in ps {
            m.insert(k.to_string(), v.clone());
        }
        parse_products(&json!({"products": m}), "streams/v1/images.json").unwrap()
    }

    #[test]
    fn names_follow_os_release_variant() {
        assert_eq!(
            image_name("Debian", "bookworm", "default"),
            "debian-bookworm"
        );
        assert_eq!(image_name("Alpine", "3.19", "cloud"), "alpine-3.19-cloud");
        assert_eq!(image_name("Foo Linux", "1/2", "Default"), "foo-linux-1-2");
        assert!(same_arch("amd64", "x86_64") && same_arch("ARM64", "aarch64"));
        assert!(!same_arch("amd64", "arm64"));
    }

    #[test]
    fn pairs_metadata_and_roots_with_upstream_fingerprints() {
        let ps = products(&[(
            "debian:bookworm:amd64:default",
            product(
                "Debian",
                "bookworm",
                "amd64",
                "default",
                &["20240101_00:00"],
            ),
        )]);
        let plan = plan(&ps, &Filters::default(), "https://up");
        assert!(plan.failures.is_empty(), "{:?}", plan.failures);
        assert_eq!(plan.versions.len(), 1);
        let v = &plan.versions[0];
        assert_eq!(
            (v.image.as_str(), v.version.as_str()),
            ("debian-bookworm", "20240101_00:00")
        );
        assert_eq!(v.pairs.len(), 2, "a container and a VM");
        let sq = v.pairs.iter().find(|p| p.format == "squashfs").unwrap();
        assert_eq!(sq.kind, ImageType::Container);
        assert_eq!(
            sq.meta.item_key, "incus.tar.xz",
            "incus item preferred over lxd"
        );
        assert_eq!(
            sq.fingerprint.hex(),
            h("Debianbookwormamd6420240101_00:00metaDebianbookwormamd6420240101_00:00sq")
        );
        assert_eq!((sq.os.as_str(), sq.arch.as_str()), ("debian", "amd64"));
        let qc = v.pairs.iter().find(|p| p.format == "qcow2").unwrap();
        assert_eq!(qc.kind, ImageType::Vm);
        assert_eq!(v.files().len(), 3, "one metadata file for both");
        assert_eq!((plan.ignored_deltas, plan.ignored_unified), (1, 1));
        let m = &v.metadata;
        assert_eq!(m["os"], "Debian");
        assert_eq!(m["architecture"], "amd64");
        assert_eq!(m["serial"], "20240101_00:00");
        assert_eq!(m["upstream.url"], "https://up");
        assert_eq!(m["upstream.product"], "debian:bookworm:amd64:default");
        assert_eq!(m["upstream.version"], "20240101_00:00");
        assert_eq!(m["requirements.secureboot"], "false");
        assert_eq!(
            m["simplestreams.aliases"],
            "debian/bookworm/default,debian-bookworm/stable"
        );
        assert_eq!(m["upstream.sha256.root.squashfs"], sq.root.sha256.hex());
        assert_eq!(m["upstream.sha256.incus.tar.xz"], sq.meta.sha256.hex());
        assert!(!m.contains_key("upstream.sha256.delta"), "only files taken");
        assert_eq!(
            v.aliases,
            ["stable"],
            "{{image}}/{{alias}} becomes an imgsrv alias"
        );
    }

    #[test]
    fn filters_select_case_insensitively_and_latest_keeps_the_newest() {
        let ps = products(&[
            (
                "d",
                product(
                    "Debian",
                    "bookworm",
                    "amd64",
                    "default",
                    &["20240101_00:00", "20240103_00:00", "20240102_00:00"],
                ),
            ),
            (
                "a",
                product("Alpine", "3.19", "x86_64", "default", &["20240101_00:00"]),
            ),
            (
                "c",
                product("Debian", "bookworm", "arm64", "cloud", &["20240101_00:00"]),
            ),
        ]);
        let f = Filters {
            os: Some("debian".into()),
            arch: Some("x86_64".into()),
            kind: Some(ImageType::Vm),
            latest: Some(2),
            ..Default::default()
        };
        let plan = plan(&ps, &f, "u");
        let got: Vec<(&str, &str)> = plan
            .versions
            .iter()
            .map(|v| (v.image.as_str(), v.version.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("debian-bookworm", "20240102_00:00"),
                ("debian-bookworm", "20240103_00:00")
            ]
        );
        assert!(plan
            .versions
            .iter()
            .all(|v| v.pairs.iter().all(|p| p.kind == ImageType::Vm)));
        assert_eq!(
            plan.filtered,
            1 + 1 + 1,
            "alpine, the arm64 cloud variant, one old version"
        );

        let glob = Filters {
            image: Some("*-cloud".into()),
            ..Default::default()
        };
        let plan2 = super::plan(&ps, &glob, "u");
        assert_eq!(plan2.versions.len(), 1);
        assert_eq!(plan2.versions[0].image, "debian-bookworm-cloud");
        let bad = Filters {
            release: Some("trixie".into()),
            ..Default::default()
        };
        assert!(super::plan(&ps, &bad, "u").versions.is_empty());
    }

    #[test]
    fn architectures_of_one_release_share_a_version() {
        let ps = products(&[
            (
                "debian:bookworm:amd64:default",
                product(
                    "Debian",
                    "bookworm",
                    "amd64",
                    "default",
                    &["20240101_00:00"],
                ),
            ),
            (
                "debian:bookworm:arm64:default",
                product(
                    "Debian",
                    "bookworm",
                    "arm64",
                    "default",
                    &["20240101_00:00"],
                ),
            ),
        ]);
        let plan = plan(&ps, &Filters::default(), "u");
        assert!(plan.failures.is_empty(), "{:?}", plan.failures);
        assert_eq!(plan.versions.len(), 1);
        let v = &plan.versions[0];
        assert_eq!(v.pairs.len(), 4);
        assert_eq!(v.metadata["architecture"], "amd64,arm64");
        assert_eq!(
            v.metadata["upstream.product"],
            "debian:bookworm:amd64:default,debian:bookworm:arm64:default"
        );
        assert_eq!(
            v.metadata["simplestreams.aliases"],
            "debian/bookworm/default,debian-bookworm/stable"
        );
        assert!(v
            .metadata
            .contains_key("upstream.sha256.debian:bookworm:arm64:default/root.squashfs"));
        // the same arch twice cannot be one version
        let ps = products(&[
            (
                "x",
                product(
                    "Debian",
                    "bookworm",
                    "amd64",
                    "default",
                    &["20240101_00:00"],
                ),
            ),
            (
                "y",
                product(
                    "Debian",
                    "bookworm",
                    "x86_64",
                    "default",
                    &["20240101_00:00"],
                ),
            ),
        ]);
        let plan = super::plan(&ps, &Filters::default(), "u");
        assert!(plan.versions.is_empty());
        assert!(
            plan.failures[0].error.contains("both give"),
            "{:?}",
            plan.failures
        );
    }

    #[test]
    fn bad_items_fail_their_version_only() {
        let mut bad = product(
            "Debian",
            "bookworm",
            "amd64",
            "default",
            &["20240101_00:00", "20240102_00:00"],
        );
        bad["versions"]["20240101_00:00"]["items"]["root.squashfs"]["path"] =
            json!("https://evil/x");
        bad["versions"]["20240102_00:00"]["items"]["disk.qcow2"]["path"] = json!("../../x");
        let ps = products(&[
            ("d", bad),
            (
                "a",
                product("Alpine", "3.19", "amd64", "default", &["20240101_00:00"]),
            ),
        ]);
        let plan = plan(&ps, &Filters::default(), "u");
        assert_eq!(plan.versions.len(), 1);
        assert_eq!(plan.versions[0].image, "alpine-3.19");
        assert_eq!(plan.failures.len(), 2, "{:?}", plan.failures);
        assert!(plan
            .failures
            .iter()
            .any(|f| f.error.contains("absolute URL")));
        assert!(plan.failures.iter().any(|f| f.error.contains("'..'")));
    }
}
