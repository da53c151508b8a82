//! `imgsrv publish FILE...`: which file is which, by content, in any order.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::{detect_compression, detect_root_format, read_magic, Compression, RootFormat};

/// What one file given to `imgsrv publish` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFile {
    /// A metadata tarball candidate (xz, gzip or a plain tar): `read_metadata` decides.
    Metadata,
    Root(RootFormat),
}

/// Recognises a file by its first bytes: squashfs (`hsqs`), qcow2
/// (`QFI\xfb`), an xz or gzip stream or a tar (`ustar` at 257) for the
/// metadata tarball. Anything else is refused, naming what was expected.
pub fn classify(path: &Path) -> anyhow::Result<ImageFile> {
    if let Ok(f) = detect_root_format(path) {
        return Ok(ImageFile::Root(f));
    }
    match detect_compression(path)? {
        Compression::Xz | Compression::Gzip => return Ok(ImageFile::Metadata),
        Compression::None => {}
    }
    let head = read_magic(path, 262)?;
    if head.get(257..262) == Some(b"ustar") {
        return Ok(ImageFile::Metadata);
    }
    bail!(
        "{}: not an Incus image file: expected the metadata tarball (incus.tar.xz: a tar, \
         xz- or gzip-compressed, holding metadata.yaml), a squashfs root (rootfs.squashfs) \
         or a qcow2 disk (disk.qcow2)",
        path.display()
    )
}

/// Sorts `files` into the metadata tarball and the root files (at most one
/// squashfs and one qcow2), whatever their order on the command line.
pub fn sort_files(files: &[PathBuf]) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let mut metadata: Option<&PathBuf> = None;
    let mut roots: Vec<(&PathBuf, RootFormat)> = Vec::new();
    for p in files {
        match classify(p)? {
            ImageFile::Metadata => {
                if let Some(m) = metadata {
                    bail!(
                        "{} and {} both look like metadata tarballs: give one metadata tarball \
                         (incus.tar.xz) with a rootfs.squashfs and/or a disk.qcow2",
                        m.display(),
                        p.display()
                    );
                }
                metadata = Some(p);
            }
            ImageFile::Root(f) => {
                if let Some((other, _)) = roots.iter().find(|(_, g)| *g == f) {
                    bail!(
                        "{} and {} are both {}: give at most one squashfs and one qcow2",
                        other.display(),
                        p.display(),
                        f.format_str()
                    );
                }
                roots.push((p, f));
            }
        }
    }
    let Some(metadata) = metadata else {
        bail!(
            "no metadata tarball among the files given: add incus.tar.xz (the tarball with \
             metadata.yaml) beside the rootfs.squashfs and/or disk.qcow2"
        );
    };
    if roots.is_empty() {
        bail!(
            "no root file given: add a squashfs (container) and/or a qcow2 (virtual machine) \
             beside {}",
            metadata.display()
        );
    }
    Ok((
        metadata.clone(),
        roots.into_iter().map(|(p, _)| p.clone()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{make_qcow2, make_squashfs, make_tarball, SAMPLE_YAML};
    use super::*;

    #[test]
    fn files_are_sorted_by_content_in_any_order() {
        let t = tempfile::tempdir().unwrap();
        let meta = make_tarball(t.path(), "a.bin", "-cJf", Some(SAMPLE_YAML), false);
        let plain = make_tarball(t.path(), "b.bin", "-cf", Some(SAMPLE_YAML), false);
        let sq = make_squashfs(t.path(), "c.bin");
        let q = make_qcow2(t.path(), "d.bin");
        for order in [
            vec![sq.clone(), q.clone(), meta.clone()],
            vec![q.clone(), meta.clone(), sq.clone()],
            vec![meta.clone(), sq.clone(), q.clone()],
        ] {
            let (m, roots) = sort_files(&order).unwrap();
            assert_eq!(m, meta);
            assert_eq!(roots.len(), 2);
            assert!(roots.contains(&sq) && roots.contains(&q));
        }
        assert_eq!(sort_files(&[sq.clone(), plain.clone()]).unwrap().0, plain);
        let junk = t.path().join("notes.txt");
        std::fs::write(&junk, "hello, not an image\n".repeat(40)).unwrap();
        let e = sort_files(&[meta.clone(), junk.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("notes.txt") && e.contains("not an Incus image file"),
            "{e}"
        );
        let e = sort_files(&[sq.clone(), q.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no metadata tarball"), "{e}");
        let e = sort_files(&[meta.clone(), plain.clone(), sq.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("both look like metadata"), "{e}");
        let e = sort_files(std::slice::from_ref(&meta))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no root file"), "{e}");
        let e = sort_files(&[meta, sq.clone(), sq]).unwrap_err().to_string();
        assert!(e.contains("both squashfs"), "{e}");
    }
}
