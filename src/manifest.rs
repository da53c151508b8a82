//! The canonical manifest: the exact bytes a publisher signs.
//!
//! Compact JSON with sorted object keys and no whitespace, naming the image,
//! the version, its metadata, and every artifact and attachment by digest and
//! size. Because every byte a consumer downloads is named here by sha256, a
//! signature over the manifest covers the whole version. The image and version
//! names are inside the signed bytes, so a valid signature cannot be replayed
//! under another name.

use crate::catalog::{ArtifactWithAttachments, VersionView};
use crate::digest::Digest;
use serde_json::{json, Map, Value};

pub const SCHEMA: &str = "imgsrv.manifest.v1";

/// Canonical bytes of a version's manifest.
pub fn canonical(view: &VersionView) -> Vec<u8> {
    fn key(x: &ArtifactWithAttachments) -> (&str, &str, &str, &str) {
        let a = &x.artifact;
        (&a.variant, &a.operating_system, &a.architecture, &a.format)
    }
    let mut artifacts: Vec<&ArtifactWithAttachments> = view.artifacts.iter().collect();
    artifacts.sort_by(|a, b| key(a).cmp(&key(b)));
    let artifacts: Vec<Value> = artifacts
        .into_iter()
        .map(|a| {
            let mut atts: Vec<&crate::catalog::Attachment> = a.attachments.iter().collect();
            atts.sort_by(|x, y| x.name.cmp(&y.name));
            let atts: Vec<Value> = atts
                .into_iter()
                .map(|t| {
                    json!({
                        "name": t.name,
                        "media_type": t.media_type,
                        "digest": t.blob_digest.to_string(),
                        "size": t.blob_size_bytes,
                    })
                })
                .collect();
            json!({
                "variant": a.artifact.variant,
                "operating_system": a.artifact.operating_system,
                "architecture": a.artifact.architecture,
                "format": a.artifact.format,
                "digest": a.artifact.primary_blob_digest.to_string(),
                "size": a.artifact.primary_blob_size_bytes,
                "media_type": a.artifact.primary_media_type,
                "attachments": atts,
            })
        })
        .collect();
    let metadata: Map<String, Value> = view
        .version
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let doc = json!({
        "schema": SCHEMA,
        "image": view.image.name,
        "version": view.version.version,
        "metadata": metadata,
        "artifacts": artifacts,
    });
    // serde_json's Map is a BTreeMap (no preserve_order feature): keys come out sorted.
    serde_json::to_vec(&doc).expect("serializing a JSON value cannot fail")
}

/// A canonical manifest as a consumer reads it back (`imgsrv verify`):
/// every field required, unknown fields refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: String,
    pub image: String,
    pub version: String,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub artifacts: Vec<ManifestArtifact>,
}

/// One artifact of a [`Manifest`]: its primary blob and attachments.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestArtifact {
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub attachments: Vec<ManifestAttachment>,
}

/// One attachment of a [`ManifestArtifact`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestAttachment {
    pub name: String,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// Parses manifest bytes; refuses anything but an `imgsrv.manifest.v1`
/// document with every field present.
pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if m.schema != SCHEMA {
        return Err(format!("schema {:?}, expected {SCHEMA:?}", m.schema));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::*;
    use std::collections::BTreeMap;

    fn view() -> VersionView {
        let d = |s: &[u8]| Digest::of(s);
        let art = |id: &str, fmt: &str, data: &[u8]| ArtifactWithAttachments {
            artifact: Artifact {
                id: id.into(),
                version_id: "v".into(),
                variant: "default".into(),
                operating_system: "Debian".into(),
                architecture: "x86_64".into(),
                format: fmt.into(),
                primary_blob_digest: d(data),
                primary_blob_size_bytes: data.len() as u64,
                primary_media_type: "application/octet-stream".into(),
                created_at: "t1".into(),
                updated_at: "t1".into(),
            },
            attachments: vec![Attachment {
                id: format!("{id}-m"),
                artifact_id: id.into(),
                name: "incus.tar.xz".into(),
                media_type: "application/x-xz".into(),
                blob_digest: d(b"META"),
                blob_size_bytes: 4,
                created_at: "t1".into(),
                updated_at: "t1".into(),
            }],
        };
        let mut metadata = BTreeMap::new();
        metadata.insert("release".to_string(), "12".to_string());
        metadata.insert("os".to_string(), "Debian".to_string());
        VersionView {
            image: Image {
                id: "i".into(),
                name: "debian-12".into(),
                display_name: None,
                description: None,
                visibility: "public".into(),
                created_at: "t0".into(),
                updated_at: "t0".into(),
            },
            version: ImageVersion {
                id: "v".into(),
                image_id: "i".into(),
                image_name: "debian-12".into(),
                version: "20250101_0000".into(),
                state: VersionState::Draft,
                metadata,
                published_at: None,
                created_at: "t0".into(),
                updated_at: "t0".into(),
            },
            artifacts: vec![art("b", "squashfs", b"ROOT"), art("a", "qcow2", b"DISK")],
        }
    }

    #[test]
    fn manifest_is_sorted_compact_and_independent_of_ids_and_times() {
        let v = view();
        let bytes = canonical(&v);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains(' ') && !text.contains('\n'));
        assert!(text.starts_with(
            r#"{"artifacts":[{"architecture":"x86_64","attachments":[{"digest":"sha256:2d1e"#
        ));
        // qcow2 sorts before squashfs
        assert!(text.find("qcow2").unwrap() < text.find("squashfs").unwrap());
        assert!(text.contains(r#""metadata":{"os":"Debian","release":"12"}"#));
        assert!(text.ends_with(r#""schema":"imgsrv.manifest.v1","version":"20250101_0000"}"#));

        let mut w = v.clone();
        w.artifacts.reverse();
        w.artifacts[0].artifact.id = "other".into();
        w.version.created_at = "later".into();
        w.version.state = VersionState::Published;
        assert_eq!(
            canonical(&w),
            bytes,
            "ids, times, state and order must not change the bytes"
        );

        let mut x = v.clone();
        x.artifacts[0].artifact.primary_blob_size_bytes += 1;
        assert_ne!(canonical(&x), bytes);
        let mut y = v;
        y.version.version = "20250101_0001".into();
        assert_ne!(canonical(&y), bytes);
    }

    #[test]
    fn parse_reads_back_what_canonical_writes_and_nothing_else() {
        let v = view();
        let m = parse(&canonical(&v)).unwrap();
        assert_eq!(
            (m.image.as_str(), m.version.as_str()),
            ("debian-12", "20250101_0000")
        );
        assert_eq!(m.artifacts.len(), 2);
        let sq = m.artifacts.iter().find(|a| a.format == "squashfs").unwrap();
        assert_eq!((sq.digest, sq.size), (Digest::of(b"ROOT"), 4));
        assert_eq!(sq.attachments[0].name, "incus.tar.xz");
        assert_eq!(sq.attachments[0].digest, Digest::of(b"META"));

        let text = String::from_utf8(canonical(&v)).unwrap();
        let other = text.replace(SCHEMA, "imgsrv.manifest.v2");
        assert!(parse(other.as_bytes()).unwrap_err().contains("schema"));
        let extra = text.replacen("{", "{\"extra\":1,", 1);
        assert!(parse(extra.as_bytes()).is_err(), "unknown field accepted");
        let dup = text.replacen("{", "{\"image\":\"evil\",", 1);
        assert!(parse(dup.as_bytes()).is_err(), "duplicate field accepted");
        assert!(parse(b"not json").is_err());
    }
}
