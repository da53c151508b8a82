//! What the Incus REST API shows: its images and aliases, derived from the Simple
//! Streams projection's products ([`crate::simplestreams::Product`]), so that what is
//! visible, withheld, deduplicated or newest is decided once, there.
//!
//! One Incus image per projected root (a container or a VM of one version, os,
//! architecture and variant), with the root's Incus fingerprint.
//!
//! Aliases. A Simple Streams alias names one product per architecture and instance
//! type, and the client picks; an Incus alias names exactly one image. For every alias
//! `A` the projection gives (`{image}`, `{image}/{version}`, `{image}/{movable alias}`,
//! `{os}/{release}/{variant}`, `{os}/{release}`, an upstream's aliases), with the newest
//! image carrying it per architecture and type:
//!
//! 1. `A`: for the preferred architecture, its container, or its VM if it has none;
//! 2. `A/{arch}` (the architecture as published, as Simple Streams names it): that
//!    architecture's container, or its VM if it has none;
//! 3. `A/vm`: the VM of the preferred architecture among those with a VM, and
//!    `A/{arch}/vm`: that architecture's VM.
//!
//! The preferred architecture is the client's (its `User-Agent` names it: an Incus
//! daemon pulls for its own), if `A` has it; else `x86_64`; else the first by name. A
//! name is given once: an earlier step wins over a later one (a projected alias over a
//! derived name), and within a step the alias first by name.

use crate::catalog::ProjectionEntry;
use crate::simplestreams::Product;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

pub const CONTAINER: &str = "container";
pub const VM: &str = "virtual-machine";

/// One Incus image: one projected root.
pub struct Image {
    pub entry: ProjectionEntry,
    /// Lowercase hex.
    pub fingerprint: String,
    /// [`CONTAINER`] or [`VM`].
    pub kind: &'static str,
    /// The Incus name of the architecture (`x86_64`, `aarch64`, ...).
    pub architecture: &'static str,
    /// The product's serial (its Simple Streams version name).
    pub serial: String,
}

impl Image {
    /// Metadata tarball and root together.
    pub fn size(&self) -> u64 {
        self.entry.metadata.blob_size_bytes + self.entry.artifact.primary_blob_size_bytes
    }
}

/// The newest container and VM carrying an alias, for one architecture.
#[derive(Default, Clone, Copy)]
struct Pair {
    container: Option<usize>,
    vm: Option<usize>,
}

/// The alias table for one preferred architecture.
pub struct Names {
    /// Alias name → index in [`Model::images`].
    pub by_name: BTreeMap<String, usize>,
    /// Per image (same index), the names pointing at it, sorted.
    pub of_image: Vec<Vec<String>>,
}

pub struct Model {
    /// Newest product first, its roots in the projection's order.
    pub images: Vec<Image>,
    /// Fingerprint → index (each appears once: the projection lists it once).
    by_fingerprint: BTreeMap<String, usize>,
    /// Projected alias → architecture (as published) → newest container and VM.
    groups: BTreeMap<String, BTreeMap<String, Pair>>,
    /// Alias tables by preferred architecture, built when first asked for.
    names: Mutex<HashMap<Option<&'static str>, Arc<Names>>>,
}

/// Prefix lookups: what `GET /1.0/images/{fingerprint}` does with a short one.
pub enum Found {
    One(usize),
    None,
    Several,
}

impl Model {
    pub fn new(products: &[Product]) -> Model {
        let mut images = Vec::new();
        let mut groups: BTreeMap<String, BTreeMap<String, Pair>> = BTreeMap::new();
        for p in products {
            for e in &p.roots {
                let Some(architecture) = canonical_arch(&e.artifact.architecture) else {
                    log::warn!(
                        "incus api: {}@{} artifact {} has architecture {:?}, which Incus does not know: not listed",
                        e.image.name,
                        e.version.version,
                        e.artifact.id,
                        e.artifact.architecture
                    );
                    continue;
                };
                let kind = if e.ftype == "disk-kvm.img" {
                    VM
                } else {
                    CONTAINER
                };
                let i = images.len();
                images.push(Image {
                    entry: e.clone(),
                    fingerprint: e.combined_sha256.hex(),
                    kind,
                    architecture,
                    serial: p.serial.clone(),
                });
                for a in &p.aliases {
                    let pair = groups
                        .entry(a.clone())
                        .or_default()
                        .entry(e.artifact.architecture.clone())
                        .or_default();
                    let slot = if kind == VM {
                        &mut pair.vm
                    } else {
                        &mut pair.container
                    };
                    // products come newest first: the first to carry it keeps it
                    slot.get_or_insert(i);
                }
            }
        }
        let by_fingerprint = images
            .iter()
            .enumerate()
            .map(|(i, img)| (img.fingerprint.clone(), i))
            .collect();
        Model {
            images,
            by_fingerprint,
            groups,
            names: Mutex::new(HashMap::new()),
        }
    }

    /// The image whose fingerprint starts with `prefix`.
    pub fn find(&self, prefix: &str) -> Found {
        if prefix.is_empty() {
            return Found::None;
        }
        let mut hits = self
            .by_fingerprint
            .range(prefix.to_string()..)
            .take_while(|(fp, _)| fp.starts_with(prefix))
            .map(|(_, i)| *i);
        match (hits.next(), hits.next()) {
            (None, _) => Found::None,
            (Some(i), None) => Found::One(i),
            (Some(_), Some(_)) => Found::Several,
        }
    }

    /// The alias table for a client whose architecture is `preferred` (an Incus name).
    pub fn names(&self, preferred: Option<&'static str>) -> Arc<Names> {
        let mut cache = self.names.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(preferred)
            .or_insert_with(|| Arc::new(self.build_names(preferred)))
            .clone()
    }

    fn build_names(&self, preferred: Option<&'static str>) -> Names {
        let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
        let mut claim = |name: String, i: usize| {
            by_name.entry(name).or_insert(i);
        };
        for (a, arches) in &self.groups {
            if let Some(p) = pick(arches, preferred, |p| p.container.or(p.vm).is_some()) {
                claim(a.clone(), p.container.or(p.vm).expect("picked for it"));
            }
        }
        for (a, arches) in &self.groups {
            for (arch, p) in arches {
                if let Some(i) = p.container.or(p.vm) {
                    claim(format!("{a}/{arch}"), i);
                }
            }
        }
        for (a, arches) in &self.groups {
            if let Some(p) = pick(arches, preferred, |p| p.vm.is_some()) {
                claim(format!("{a}/vm"), p.vm.expect("picked for it"));
            }
            for (arch, p) in arches {
                if let Some(i) = p.vm {
                    claim(format!("{a}/{arch}/vm"), i);
                }
            }
        }
        let mut of_image = vec![Vec::new(); self.images.len()];
        for (name, i) in &by_name {
            of_image[*i].push(name.clone());
        }
        Names { by_name, of_image }
    }
}

/// The pair of the preferred architecture among those `usable`: `preferred`, else
/// `x86_64`, else the first by name.
fn pick(
    arches: &BTreeMap<String, Pair>,
    preferred: Option<&str>,
    usable: impl Fn(&Pair) -> bool,
) -> Option<Pair> {
    let usable: Vec<(&String, &Pair)> = arches.iter().filter(|(_, p)| usable(p)).collect();
    let is = |want: &str| {
        usable
            .iter()
            .find(|(a, _)| canonical_arch(a) == Some(want))
            .map(|(_, p)| **p)
    };
    preferred
        .and_then(is)
        .or_else(|| is("x86_64"))
        .or_else(|| usable.first().map(|(_, p)| **p))
}

/// The Incus name of an architecture name or alias (as Incus's `osarch` package
/// knows them), `None` for one it does not know.
pub fn canonical_arch(name: &str) -> Option<&'static str> {
    Some(match name {
        "i686" | "i386" | "i586" | "386" | "x86" | "generic_32" => "i686",
        "x86_64" | "amd64" | "generic_64" => "x86_64",
        "armv6l" | "armel" | "arm" => "armv6l",
        "armv7l" | "armhf" | "armhfp" | "armv7a_hardfp" | "armv7" | "armv7a_vfpv3_hardfp" => {
            "armv7l"
        }
        "armv8l" => "armv8l",
        "aarch64" | "arm64" | "arm64_generic" => "aarch64",
        "ppc" | "powerpc" => "ppc",
        "ppc64" | "powerpc64" => "ppc64",
        "ppc64le" | "ppc64el" => "ppc64le",
        "s390x" => "s390x",
        "mips" | "mipsel" | "mipsle" => "mips",
        "mips64" | "mips64el" | "mips64le" => "mips64",
        "riscv32" => "riscv32",
        "riscv64" => "riscv64",
        "loongarch64" | "loong64" => "loongarch64",
        _ => return None,
    })
}

/// The client's architecture from its `User-Agent`: Incus (and LXD) send
/// `Incus 6.0.4 (Linux; x86_64; 6.1.0; Debian; 12)`, the daemon with more after it.
pub fn client_arch(user_agent: Option<&str>) -> Option<&'static str> {
    let ua = user_agent?;
    let inside = ua.split_once('(')?.1.split(')').next()?;
    canonical_arch(inside.split(';').nth(1)?.trim())
}

/// The model of the projection `products` belong to, built once per projection (the
/// documents are rebuilt when the catalog changes, and so is this).
pub fn cached(streams: &Arc<crate::simplestreams::Streams>) -> Arc<Model> {
    type Slot = Option<(Weak<crate::simplestreams::Streams>, Arc<Model>)>;
    static LAST: Mutex<Slot> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((w, m)) = last.as_ref() {
        if w.upgrade().is_some_and(|s| Arc::ptr_eq(&s, streams)) {
            return m.clone();
        }
    }
    let m = Arc::new(Model::new(&streams.products));
    *last = Some((Arc::downgrade(streams), m.clone()));
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Alias;
    use crate::digest::Digest;
    use crate::simplestreams::tests::entry;

    /// `e` for architecture `arch`, with a fingerprint of its own.
    fn on(arch: &str, mut e: ProjectionEntry) -> ProjectionEntry {
        e.artifact.architecture = arch.into();
        e.artifact.id = format!("{}-{arch}", e.artifact.id);
        e.combined_sha256 = Digest::of(format!("{}{arch}", e.combined_sha256).as_bytes());
        e
    }

    fn movable(image: &str, alias: &str, version: &str) -> (String, Alias) {
        let t = "2026-01-01T00:00:00Z".to_string();
        (
            image.to_string(),
            Alias {
                id: alias.into(),
                image_id: image.into(),
                alias: alias.into(),
                version_id: format!("{image}@{version}"),
                version: version.into(),
                created_at: t.clone(),
                updated_at: t,
            },
        )
    }

    #[test]
    fn one_alias_names_one_image_per_architecture_and_type() {
        let m = |e: ProjectionEntry| on("amd64", e);
        let a = |e: ProjectionEntry| on("arm64", e);
        let entries = vec![
            // v1: amd64 container and VM; v2: amd64 container only, arm64 both
            m(entry("deb", "20260101_0000", 1, "squashfs", &[])),
            m(entry("deb", "20260101_0000", 1, "disk-kvm.img", &[])),
            m(entry("deb", "20260102_0000", 2, "squashfs", &[])),
            a(entry("deb", "20260102_0000", 2, "squashfs", &[])),
            a(entry("deb", "20260102_0000", 2, "disk-kvm.img", &[])),
        ];
        let fp = |e: &ProjectionEntry| e.combined_sha256.hex();
        let (v1_ct, v1_vm, v2_ct, arm_ct, arm_vm) = (
            fp(&entries[0]),
            fp(&entries[1]),
            fp(&entries[2]),
            fp(&entries[3]),
            fp(&entries[4]),
        );
        // a movable alias named like a derived name: the projected one wins
        let aliases = [movable("deb", "vm", "20260101_0000")];
        let model = Model::new(&crate::simplestreams::project(&entries, &aliases));
        assert_eq!(model.images.len(), 5);
        let target = |names: &Names, name: &str| {
            names
                .by_name
                .get(name)
                .map(|i| model.images[*i].fingerprint.clone())
                .unwrap_or_else(|| panic!("no alias {name}: {:?}", names.by_name.keys()))
        };
        let any = model.names(None);
        assert_eq!(target(&any, "deb"), v2_ct, "x86_64 first, container first");
        assert_eq!(target(&any, "deb/amd64"), v2_ct);
        assert_eq!(target(&any, "deb/amd64/vm"), v1_vm, "the newest amd64 VM");
        assert_eq!(target(&any, "deb/arm64"), arm_ct);
        assert_eq!(target(&any, "deb/arm64/vm"), arm_vm);
        assert_eq!(target(&any, "deb/20260101_0000"), v1_ct);
        assert_eq!(target(&any, "deb/20260101_0000/vm"), v1_vm);
        assert!(!any.by_name.contains_key("deb/20260101_0000/arm64"));
        assert_eq!(
            target(&any, "deb/vm"),
            v1_ct,
            "the movable alias deb/vm (on v1) is not replaced by the derived name"
        );
        // a client on arm64 gets arm64 for the short names it has there
        let arm = model.names(Some("aarch64"));
        assert_eq!(target(&arm, "deb"), arm_ct);
        assert_eq!(
            target(&arm, "deb/20260101_0000"),
            v1_ct,
            "only amd64 has v1"
        );
        assert_eq!(target(&arm, "deb/amd64"), v2_ct);
        // every name once; the per-image lists agree with the table
        for (name, i) in &any.by_name {
            assert!(any.of_image[*i].contains(name));
        }
        let total: usize = any.of_image.iter().map(Vec::len).sum();
        assert_eq!(total, any.by_name.len());
        assert!(Arc::ptr_eq(&any, &model.names(None)), "built once");
    }

    #[test]
    fn fingerprints_match_by_prefix() {
        let mut a = entry("x", "20260101_0000", 1, "squashfs", &[]);
        let mut b = entry("y", "20260101_0000", 1, "squashfs", &[]);
        a.combined_sha256 = Digest::from_hex(&format!("aa0{}", "1".repeat(61))).unwrap();
        b.combined_sha256 = Digest::from_hex(&format!("aa1{}", "2".repeat(61))).unwrap();
        let model = Model::new(&crate::simplestreams::project(&[a, b], &[]));
        assert!(matches!(model.find("aa"), Found::Several));
        let Found::One(i) = model.find("aa1") else {
            panic!("aa1 names one image")
        };
        assert_eq!(model.images[i].entry.image.name, "y");
        assert!(matches!(model.find("ab"), Found::None));
        assert!(matches!(model.find(""), Found::None));
        let full = model.images[i].fingerprint.clone();
        assert!(matches!(model.find(&full), Found::One(j) if j == i));
    }

    #[test]
    fn architectures_and_user_agents() {
        assert_eq!(canonical_arch("amd64"), Some("x86_64"));
        assert_eq!(canonical_arch("arm64"), Some("aarch64"));
        assert_eq!(canonical_arch("armhf"), Some("armv7l"));
        assert_eq!(canonical_arch("sparc"), None);
        assert_eq!(
            client_arch(Some("Incus 6.0.4 (Linux; aarch64; 6.1.0; Debian; 12)")),
            Some("aarch64")
        );
        assert_eq!(
            client_arch(Some(
                "Incus 6.0.4 (Linux; x86_64; 6.1.0; Debian; 12) (dir) (cluster)"
            )),
            Some("x86_64")
        );
        assert_eq!(client_arch(Some("curl/7.88.1")), None);
        assert_eq!(client_arch(None), None);
    }
}
