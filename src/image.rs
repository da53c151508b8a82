//! Inspection of the Incus image files `imgsrv publish` uploads: the metadata
//! tarball (`metadata.yaml` inside a tar, xz/gzip/uncompressed) and the root
//! filesystem or disk (squashfs or qcow2), all recognized by magic bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// `metadata.yaml` larger than this is refused (Incus ones are a few KiB).
const MAX_METADATA_YAML: u64 = 4 << 20;

/// Why an image file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a metadata tarball: {reason}")]
    NotTar { path: PathBuf, reason: String },
    #[error("{path}: {compression} compression is not supported for the metadata tarball (use xz, gzip or no compression)")]
    UnsupportedCompression {
        path: PathBuf,
        compression: &'static str,
    },
    #[error("{path}: the tarball has no metadata.yaml")]
    NoMetadata { path: PathBuf },
    #[error("{path}: metadata.yaml: {reason}")]
    BadMetadata { path: PathBuf, reason: String },
    #[error("{path}: not a squashfs image or qcow2 disk (unrecognized magic bytes)")]
    UnknownRootFormat { path: PathBuf },
}

mod files;
pub use files::{classify, sort_files, ImageFile};

/// Compression of a metadata tarball, by magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Gzip,
    None,
}

impl Compression {
    /// Media type of the whole tarball.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Xz => "application/x-xz",
            Compression::Gzip => "application/gzip",
            Compression::None => "application/x-tar",
        }
    }
}

/// The parts of an Incus `metadata.yaml` imgsrv uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMetadata {
    pub architecture: String,
    /// Unix seconds.
    pub creation_date: i64,
    /// Scalars converted to strings.
    pub properties: BTreeMap<String, String>,
    /// How the tarball was compressed.
    pub compression: Compression,
}

impl ImageMetadata {
    fn prop(&self, k: &str) -> Option<&str> {
        self.properties
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
    pub fn os(&self) -> Option<&str> {
        self.prop("os")
    }
    pub fn release(&self) -> Option<&str> {
        self.prop("release")
    }
    /// `properties.variant`, else `default`.
    pub fn variant(&self) -> &str {
        self.prop("variant").unwrap_or("default")
    }
    pub fn serial(&self) -> Option<&str> {
        self.prop("serial")
    }
}

fn read_magic(path: &Path, n: usize) -> Result<Vec<u8>, ImageError> {
    let io_err = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io_err)?;
    let mut buf = Vec::with_capacity(n);
    f.by_ref()
        .take(n as u64)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    Ok(buf)
}

/// Detects the compression of a (metadata) tarball by its magic bytes.
pub fn detect_compression(path: &Path) -> Result<Compression, ImageError> {
    let m = read_magic(path, 6)?;
    let unsupported = |compression| ImageError::UnsupportedCompression {
        path: path.to_path_buf(),
        compression,
    };
    Ok(match m.as_slice() {
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => Compression::Xz,
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => return Err(unsupported("zstd")),
        [b'B', b'Z', b'h', ..] => return Err(unsupported("bzip2")),
        [0x5d, 0x00, 0x00, ..] => return Err(unsupported("lzma")),
        _ => Compression::None,
    })
}

/// Reads `metadata.yaml` (or `./metadata.yaml`) from an Incus metadata tarball.
pub fn read_metadata(tarball: &Path) -> Result<ImageMetadata, ImageError> {
    let compression = detect_compression(tarball)?;
    let file = File::open(tarball).map_err(|source| ImageError::Io {
        path: tarball.to_path_buf(),
        source,
    })?;
    let file = BufReader::new(file);
    let reader: Box<dyn Read> = match compression {
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(file)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::None => Box::new(file),
    };
    let what = match compression {
        Compression::Xz => "xz-compressed ",
        Compression::Gzip => "gzip-compressed ",
        Compression::None => "",
    };
    let not_tar = |e: io::Error| ImageError::NotTar {
        path: tarball.to_path_buf(),
        reason: format!("reading the {what}tar failed: {e}"),
    };
    let mut archive = tar::Archive::new(reader);
    let mut yaml = None;
    let mut seen_entries = false;
    for entry in archive.entries().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        seen_entries = true;
        let path = entry.path().map_err(not_tar)?;
        let name = path.to_string_lossy();
        if name.trim_start_matches("./") != "metadata.yaml" {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(ImageError::BadMetadata {
                path: tarball.to_path_buf(),
                reason: "is not a regular file".into(),
            });
        }
        if entry.size() > MAX_METADATA_YAML {
            return Err(ImageError::BadMetadata {
                path: tarball.to_path_buf(),
                reason: format!("larger than {MAX_METADATA_YAML} bytes"),
            });
        }
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .map_err(|e| ImageError::BadMetadata {
                path: tarball.to_path_buf(),
                reason: format!("cannot read it as UTF-8 text: {e}"),
            })?;
        yaml = Some(text);
        break;
    }
    let Some(yaml) = yaml else {
        if !seen_entries {
            return Err(ImageError::NotTar {
                path: tarball.to_path_buf(),
                reason: format!("the {what}file holds no tar entries"),
            });
        }
        return Err(ImageError::NoMetadata {
            path: tarball.to_path_buf(),
        });
    };
    parse_metadata_yaml(&yaml, compression).map_err(|reason| ImageError::BadMetadata {
        path: tarball.to_path_buf(),
        reason,
    })
}

fn scalar_to_string(v: &serde_yaml_ng::Value) -> Option<String> {
    use serde_yaml_ng::Value;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        Value::Tagged(t) => scalar_to_string(&t.value),
        Value::Sequence(_) | Value::Mapping(_) => None,
    }
}

fn parse_metadata_yaml(yaml: &str, compression: Compression) -> Result<ImageMetadata, String> {
    use serde_yaml_ng::Value;
    let doc: Value = serde_yaml_ng::from_str(yaml).map_err(|e| format!("invalid YAML: {e}"))?;
    let Value::Mapping(map) = doc else {
        return Err("the document is not a mapping".into());
    };
    let architecture = match map.get("architecture") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(_) => return Err("architecture must be a non-empty string".into()),
        None => return Err("missing architecture".into()),
    };
    let creation_date = match map.get("creation_date") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or("creation_date must be an integer (unix seconds)")?,
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| "creation_date must be an integer (unix seconds)")?,
        Some(_) => return Err("creation_date must be an integer (unix seconds)".into()),
        None => return Err("missing creation_date".into()),
    };
    let mut properties = BTreeMap::new();
    match map.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(props)) => {
            for (k, v) in props {
                let key = scalar_to_string(k)
                    .filter(|k| !k.is_empty())
                    .ok_or("properties keys must be non-empty scalars")?;
                let value = scalar_to_string(v).ok_or_else(|| {
                    format!("properties.{key} must be a scalar, not a list or map")
                })?;
                properties.insert(key, value);
            }
        }
        Some(_) => return Err("properties must be a mapping".into()),
    }
    Ok(ImageMetadata {
        architecture,
        creation_date,
        properties,
        compression,
    })
}

/// Format of a root filesystem / disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RootFormat {
    /// Container root filesystem.
    Squashfs,
    /// Virtual-machine disk.
    Qcow2,
}

impl RootFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            RootFormat::Squashfs => "application/vnd.squashfs",
            RootFormat::Qcow2 => "application/x-qemu-disk",
        }
    }
    /// The `format` value of the API.
    pub fn format_str(self) -> &'static str {
        match self {
            RootFormat::Squashfs => "squashfs",
            RootFormat::Qcow2 => "qcow2",
        }
    }
}

/// Detects squashfs (little-endian superblock magic `hsqs`) or qcow2 (`QFI\xfb`).
pub fn detect_root_format(path: &Path) -> Result<RootFormat, ImageError> {
    match read_magic(path, 4)?.as_slice() {
        b"hsqs" => Ok(RootFormat::Squashfs),
        b"QFI\xfb" => Ok(RootFormat::Qcow2),
        _ => Err(ImageError::UnknownRootFormat {
            path: path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;
    use std::process::Command;

    pub(crate) const SAMPLE_YAML: &str = "architecture: x86_64\n\
        creation_date: 1795391000\n\
        properties:\n  \
          description: Debian bookworm amd64 (20261122_2343)\n  \
          os: Debian\n  \
          release: bookworm\n  \
          serial: \"20261122_2343\"\n  \
          variant: cloud\n  \
          build: 42\n  \
          stable: true\n\
        templates:\n  /etc/hostname:\n    when: [create]\n    template: hostname.tpl\n";

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("spawn");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Builds a metadata tarball with `tar` (flag: `-cJf`, `-czf`, `-cf`).
    /// `dot` stores `./metadata.yaml` instead of `metadata.yaml`.
    pub(crate) fn make_tarball(
        dir: &Path,
        name: &str,
        flag: &str,
        yaml: Option<&str>,
        dot: bool,
    ) -> PathBuf {
        let src = dir.join(format!("{name}.src"));
        fs::create_dir_all(src.join("templates")).unwrap();
        fs::write(src.join("templates/hostname.tpl"), "{{ container.name }}\n").unwrap();
        if let Some(y) = yaml {
            fs::write(src.join("metadata.yaml"), y).unwrap();
        }
        let out = dir.join(name);
        let mut cmd = Command::new("tar");
        cmd.arg("-C").arg(&src).arg(flag).arg(&out);
        if dot {
            cmd.arg(".");
        } else {
            cmd.arg("templates");
            if yaml.is_some() {
                cmd.arg("metadata.yaml");
            }
        }
        run(&mut cmd);
        out
    }

    pub(crate) fn make_squashfs(dir: &Path, name: &str) -> PathBuf {
        let src = dir.join(format!("{name}.root"));
        fs::create_dir_all(src.join("etc")).unwrap();
        fs::write(src.join("etc/os-release"), "ID=debian\n").unwrap();
        let out = dir.join(name);
        run(Command::new("mksquashfs")
            .arg(&src)
            .arg(&out)
            .args(["-noappend", "-quiet"]));
        out
    }

    pub(crate) fn make_qcow2(dir: &Path, name: &str) -> PathBuf {
        let out = dir.join(name);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&out)
            .arg("16M"));
        out
    }

    #[test]
    fn reads_metadata_from_xz_gzip_and_plain_tar() {
        let t = tempfile::tempdir().unwrap();
        for (flag, dot, comp) in [
            ("-cJf", false, Compression::Xz),
            ("-czf", true, Compression::Gzip),
            ("-cf", true, Compression::None),
        ] {
            // Names deliberately lie about the compression.
            let p = make_tarball(
                t.path(),
                &format!("m{flag}.bin"),
                flag,
                Some(SAMPLE_YAML),
                dot,
            );
            let m = read_metadata(&p).unwrap();
            assert_eq!(m.compression, comp);
            assert_eq!(m.architecture, "x86_64");
            assert_eq!(m.creation_date, 1795391000);
            assert_eq!(m.os(), Some("Debian"));
            assert_eq!(m.release(), Some("bookworm"));
            assert_eq!(m.variant(), "cloud");
            assert_eq!(m.serial(), Some("20261122_2343"));
            assert_eq!(m.properties["build"], "42");
            assert_eq!(m.properties["stable"], "true");
            assert_eq!(m.properties.len(), 7);
        }
        assert_eq!(Compression::Xz.media_type(), "application/x-xz");
    }

    #[test]
    fn variant_defaults_and_errors_are_clear() {
        let t = tempfile::tempdir().unwrap();
        let p = make_tarball(
            t.path(),
            "min.tar.xz",
            "-cJf",
            Some("architecture: aarch64\ncreation_date: 5\n"),
            false,
        );
        let m = read_metadata(&p).unwrap();
        assert_eq!(m.variant(), "default");
        assert_eq!(m.os(), None);
        assert!(m.properties.is_empty());

        let cases: [(&str, Option<&str>, &str); 5] = [
            ("none.tar.xz", None, "no metadata.yaml"),
            (
                "bad.tar.xz",
                Some("architecture: [unclosed\n"),
                "invalid YAML",
            ),
            (
                "noarch.tar.xz",
                Some("creation_date: 1\nproperties: {os: x}\n"),
                "missing architecture",
            ),
            (
                "nodate.tar.xz",
                Some("architecture: x86_64\n"),
                "missing creation_date",
            ),
            (
                "nested.tar.xz",
                Some("architecture: x\ncreation_date: 1\nproperties:\n  os: [a]\n"),
                "properties.os",
            ),
        ];
        for (name, yaml, needle) in cases {
            let p = make_tarball(t.path(), name, "-cJf", yaml, false);
            let e = read_metadata(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{name}: {e}");
            assert!(
                e.contains(name),
                "{name}: error does not name the file: {e}"
            );
        }

        let junk = t.path().join("junk.tar.xz");
        fs::write(
            &junk,
            b"this is definitely not a tarball, just some text ".repeat(20),
        )
        .unwrap();
        let e = read_metadata(&junk).unwrap_err();
        assert!(matches!(e, ImageError::NotTar { .. }), "{e}");
        let zst = t.path().join("m.tar.zst");
        fs::write(&zst, [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]).unwrap();
        assert!(read_metadata(&zst)
            .unwrap_err()
            .to_string()
            .contains("zstd"));
        // Truncated xz stream.
        let p = make_tarball(t.path(), "trunc.tar.xz", "-cJf", Some(SAMPLE_YAML), false);
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read_metadata(&p).is_err());
    }

    #[test]
    fn detects_root_formats_by_magic() {
        let t = tempfile::tempdir().unwrap();
        let sq = make_squashfs(t.path(), "rootfs.img");
        let q = make_qcow2(t.path(), "disk.squashfs"); // misleading name on purpose
        assert_eq!(detect_root_format(&sq).unwrap(), RootFormat::Squashfs);
        assert_eq!(detect_root_format(&q).unwrap(), RootFormat::Qcow2);
        assert_eq!(
            RootFormat::Squashfs.media_type(),
            "application/vnd.squashfs"
        );
        assert_eq!(RootFormat::Qcow2.media_type(), "application/x-qemu-disk");
        assert_eq!(RootFormat::Qcow2.format_str(), "qcow2");

        let tarball = make_tarball(t.path(), "meta.tar.xz", "-cJf", Some(SAMPLE_YAML), false);
        let e = detect_root_format(&tarball).unwrap_err();
        assert!(e.to_string().contains("meta.tar.xz"), "{e}");
        let empty = t.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert!(detect_root_format(&empty).is_err());
        assert!(matches!(
            detect_root_format(&t.path().join("missing")),
            Err(ImageError::Io { .. })
        ));
    }
}
