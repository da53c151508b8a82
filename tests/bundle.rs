//! `imgsrv export` / `imgsrv import`: bundles carried across an air gap, with
//! real servers, the real `minisign`, `sha256sum`, `tar` and `incus` clients.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn trust(data: &Path, public: &Path) {
    trust_key(data, Some("publisher"), public);
}

fn export(args: &[&str]) -> Output {
    run_any(Command::new(IMGSRV).arg("export").args(args))
}

fn import_into(data: &Path, bundle: &Path) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args(["import", "--data", s(data)])
            .arg(bundle),
    )
}

/// Anonymous `GET /v1/images`: the image names anyone can see.
fn visible_images(server: &TestServer) -> Vec<String> {
    let v: Value = serde_json::from_slice(&server.get_ok("/v1/images")).unwrap();
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn published(data: &Path) -> Vec<String> {
    catalog_sql(
        data,
        "SELECT i.name || '@' || v.version FROM image_versions v JOIN images i ON i.id = v.image_id \
         WHERE v.state = 'published' ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// The members of a tar: (name, data offset, size), in order.
fn members(bundle: &Path) -> Vec<(String, u64, u64)> {
    let mut ar = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                e.raw_file_position(),
                e.size(),
            )
        })
        .collect()
}

/// The bytes of a bundle's first member, its index `imgsrv-bundle.json`.
fn index_bytes(bundle: &Path) -> Vec<u8> {
    let mut ar = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    let mut first = ar.entries().unwrap().next().unwrap().unwrap();
    let mut v = Vec::new();
    first.read_to_end(&mut v).unwrap();
    v
}

fn bundle_index(bundle: &Path) -> Value {
    serde_json::from_slice(&index_bytes(bundle)).unwrap()
}

/// A copy of `bundle` with one byte flipped at `offset` bytes into `member`.
fn tampered(bundle: &Path, member: &str, offset: u64, out: &Path) -> PathBuf {
    let (_, pos, size) = members(bundle)
        .into_iter()
        .find(|m| m.0 == member)
        .unwrap_or_else(|| panic!("no member {member}"));
    assert!(offset < size);
    let mut bytes = std::fs::read(bundle).unwrap();
    bytes[(pos + offset) as usize] ^= 0x01;
    std::fs::write(out, bytes).unwrap();
    out.to_path_buf()
}

/// A source server with a trusted publisher key.
struct Source {
    server: TestServer,
    public: PathBuf,
    secret: PathBuf,
    tmp: tempfile::TempDir,
}

fn source() -> Source {
    let server = TestServer::start();
    let tmp = temp_dir("bundle");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust(server.data_dir(), &public);
    Source {
        server,
        public,
        secret,
        tmp,
    }
}

impl Source {
    /// `imgsrv export --data SOURCE_DATA --key PUBLISHER_KEY EXTRA... -o BUNDLE`, asserting
    /// success: its output.
    #[track_caller]
    fn export_signed(&self, extra: &[&str], bundle: &Path) -> Output {
        let out = export(
            &[
                &[
                    "--data",
                    s(self.server.data_dir()),
                    "--key",
                    s(&self.secret),
                ],
                extra,
                &["-o", s(bundle)],
            ]
            .concat(),
        );
        assert!(out.status.success(), "{}", text(&out));
        out
    }
}

fn incus_fingerprints(server: &TestServer) -> BTreeSet<String> {
    let incus = Incus::new(server.cert());
    incus.remote_add("r", &server.url());
    incus.fingerprints("r:").into_iter().collect()
}

#[test]
fn export_from_a_data_dir_imports_into_a_site_trusting_the_same_publisher() {
    let src = source();
    let a = make_test_image(
        src.tmp.path().join("a"),
        &["--serial", "20260101_0000", "--type", "both"],
    );
    let b = make_test_image(src.tmp.path().join("b"), &["--serial", "20260102_0000"]);
    publish_image(&src.server, &src.secret, &a, &["--alias", "stable"]);
    publish_image(&src.server, &src.secret, &b, &[]);
    let bundle = src.tmp.path().join("release.tar");
    let out = src.export_signed(&[], &bundle);
    assert!(
        text(&out).contains("2 version(s), 5 blob(s)"),
        "{}",
        text(&out)
    );

    // the layout: index first (then the exporter's signature over it),
    // SHA256SUMS last, checkable with the usual tools
    let m = members(&bundle);
    assert_eq!(m[0].0, "imgsrv-bundle.json");
    assert_eq!(m[1].0, "imgsrv-bundle.json.minisig");
    assert_eq!(m.last().unwrap().0, "SHA256SUMS");
    for want in [
        "manifests/debian-bookworm/20260101_0000.json",
        "manifests/debian-bookworm/20260101_0000.json.minisig",
    ] {
        assert!(m.iter().any(|x| x.0 == want), "{want} missing: {m:?}");
    }
    let blobs = m
        .iter()
        .filter(|x| x.0.starts_with("blobs/sha256/"))
        .count();
    assert_eq!(blobs, 5, "each blob once: {m:?}");
    let x = src.tmp.path().join("extracted");
    std::fs::create_dir_all(&x).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&bundle)
            .arg("-C")
            .arg(&x),
    );
    let sums = run_any(
        Command::new("sha256sum")
            .args(["-c", "--strict", "SHA256SUMS"])
            .current_dir(&x),
    );
    assert!(sums.status.success(), "{}", text(&sums));
    let v = run_any(
        Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(&src.public)
            .arg("-m")
            .arg(x.join("manifests/debian-bookworm/20260102_0000.json")),
    );
    assert!(
        v.status.success(),
        "the publisher's signature: {}",
        text(&v)
    );
    let v = run_any(
        Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(&src.public)
            .arg("-m")
            .arg(x.join("imgsrv-bundle.json")),
    );
    assert!(v.status.success(), "the index signature: {}", text(&v));
    let index = bundle_index(&bundle);
    assert_eq!(index["format"], "imgsrv-bundle");
    assert_eq!(index["versions"][0]["aliases"][0], "stable");

    // the far side: a site that trusts the same publisher key (and only it)
    let dst = TestServer::start();
    trust(dst.data_dir(), &src.public);
    let imported = import_into(dst.data_dir(), &bundle);
    assert!(imported.status.success(), "{}", text(&imported));
    assert!(
        text(&imported).contains("imported 2 version(s)"),
        "{}",
        text(&imported)
    );
    assert_eq!(visible_images(&dst), ["debian-bookworm"]);
    for v in ["20260101_0000", "20260102_0000"] {
        let p = format!("/v1/images/debian-bookworm/versions/{v}");
        for suffix in ["/manifest", "/manifest.minisig"] {
            assert_eq!(
                dst.get_ok(&format!("{p}{suffix}")),
                src.server.get_ok(&format!("{p}{suffix}"))
            );
        }
    }
    // the real incus client sees the same images on both sides
    let want: BTreeSet<String> = [
        a.container_fingerprint(),
        a.vm_fingerprint(),
        b.container_fingerprint(),
    ]
    .into_iter()
    .collect();
    assert_eq!(incus_fingerprints(&src.server), want);
    assert_eq!(incus_fingerprints(&dst), want);
    let aliases =
        String::from_utf8_lossy(&dst.get_ok("/v1/images/debian-bookworm/aliases")).into_owned();
    assert!(aliases.contains("\"stable\""), "{aliases}");

    // re-importing is a no-op, and says so
    let again = import_into(dst.data_dir(), &bundle);
    assert!(again.status.success(), "{}", text(&again));
    let t = text(&again);
    assert!(t.contains("nothing to import"), "{t}");
    assert!(t.contains("already published"), "{t}");
    assert!(!t.contains("imported "), "{t}");

    // export through the API gives the same versions, blobs and bytes
    let via_api = src.tmp.path().join("api.tar");
    let out = export(&[
        "--server",
        &src.server.url(),
        "--ca",
        s(&src.server.cert()),
        "--key",
        s(&src.secret),
        "-o",
        s(&via_api),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let names = |b: &Path| -> Vec<String> { members(b).into_iter().map(|m| m.0).collect() };
    assert_eq!(names(&via_api), names(&bundle));
    let api_index = bundle_index(&via_api);
    assert_eq!(api_index["versions"], index["versions"]);
    assert_eq!(api_index["blobs"], index["blobs"]);
}

#[test]
fn tampered_or_untrusted_bundles_are_refused_and_publish_nothing() {
    let src = source();
    let a = make_test_image(src.tmp.path().join("a"), &["--serial", "20260101_0000"]);
    let b = make_test_image(src.tmp.path().join("b"), &["--serial", "20260102_0000"]);
    publish_image(&src.server, &src.secret, &a, &[]);
    publish_image(&src.server, &src.secret, &b, &[]);
    let bundle = src.tmp.path().join("good.tar");
    let out = export(&["--data", s(src.server.data_dir()), "-o", s(&bundle)]);
    assert!(out.status.success(), "{}", text(&out));

    let dst = TestServer::start();
    trust(dst.data_dir(), &src.public);
    // the largest blob (a rootfs), flipped in its middle
    let (blob, blob_size) = members(&bundle)
        .into_iter()
        .filter(|m| m.0.starts_with("blobs/"))
        .max_by_key(|m| m.2)
        .map(|m| (m.0, m.2))
        .unwrap();
    let manifest = "manifests/debian-bookworm/20260102_0000.json";
    let sig = "manifests/debian-bookworm/20260102_0000.json.minisig";
    // offset into the signature: inside its base64 signature line (line 2)
    let sig_offset = {
        let mut ar = tar::Archive::new(std::fs::File::open(&bundle).unwrap());
        let mut e = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path_bytes().as_ref() == sig.as_bytes())
            .unwrap();
        let mut t = String::new();
        e.read_to_string(&mut t).unwrap();
        (t.find('\n').unwrap() + 20) as u64
    };
    for (member, offset) in [
        (blob.as_str(), blob_size / 2),
        (manifest, 40),
        (sig, sig_offset),
    ] {
        let bad = tampered(
            &bundle,
            member,
            offset,
            &src.tmp.path().join("tampered.tar"),
        );
        let out = import_into(dst.data_dir(), &bad);
        assert_eq!(out.status.code(), Some(1), "{member}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains(member), "the message must name {member}: {t}");
        assert!(
            t.contains("refused") && t.contains("nothing from it was published"),
            "{t}"
        );
        assert!(
            visible_images(&dst).is_empty(),
            "{member}: something was published"
        );
        assert!(published(dst.data_dir()).is_empty());
    }
    // a flipped byte in the signature's untrusted comment still verifies,
    // but SHA256SUMS catches it
    let bad = tampered(&bundle, sig, 25, &src.tmp.path().join("comment.tar"));
    let out = import_into(dst.data_dir(), &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(sig) && text(&out).contains("SHA256SUMS"),
        "{}",
        text(&out)
    );
    assert!(visible_images(&dst).is_empty());
    // a truncated bundle
    let bytes = std::fs::read(&bundle).unwrap();
    let cut = src.tmp.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = import_into(dst.data_dir(), &cut);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(visible_images(&dst).is_empty());

    // a site that does not trust the publisher's key (enforce): refused
    let tmp = temp_dir("bundle-untrusted");
    let other_site = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&other_site)]);
    let (other, _) = minisign_keypair(tmp.path().join("other"));
    trust(&other_site, &other);
    let out = import_into(&other_site, &bundle);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("manifests/debian-bookworm/20260101_0000.json.minisig")
            && t.contains("not a trusted publisher key"),
        "{t}"
    );
    assert!(published(&other_site).is_empty());
    // and through the API of a server that does not trust it
    let other_server = TestServer::start();
    trust(other_server.data_dir(), &other);
    let out = run_any(
        Command::new(IMGSRV)
            .args(["import", "--server", &other_server.url(), "--ca"])
            .arg(other_server.cert())
            .arg("--token-file")
            .arg(other_server.admin_token_file())
            .arg(&bundle),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not a trusted publisher key"),
        "{}",
        text(&out)
    );
    assert!(visible_images(&other_server).is_empty());

    // could not run: no such bundle (2)
    let missing = import_into(dst.data_dir(), &src.tmp.path().join("nope.tar"));
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));

    // the intact bundle still imports (through the API, this time)
    let out = run_any(
        Command::new(IMGSRV)
            .args(["import", "--server", &dst.url(), "--ca"])
            .arg(dst.cert())
            .arg("--token-file")
            .arg(dst.admin_token_file())
            .arg(&bundle),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        published(dst.data_dir()),
        [
            "debian-bookworm@20260101_0000",
            "debian-bookworm@20260102_0000"
        ]
    );
    // its index is unsigned: the server created the image private
    assert!(text(&out).contains("imgsrv-bundle.json is not signed"));
    assert!(visible_images(&dst).is_empty());
    assert_eq!(visibility_and_aliases(dst.data_dir()), "private 0");
}

#[test]
fn incremental_bundles_carry_only_what_is_new() {
    let src = source();
    let v1 = make_test_image(src.tmp.path().join("v1"), &["--serial", "20260101_0000"]);
    let v2 = make_test_image(src.tmp.path().join("v2"), &["--serial", "20260102_0000"]);
    publish_files(
        &src.server,
        &src.secret,
        &v1.metadata,
        &[v1.rootfs()],
        &["--alias", "stable"],
    );
    let old = src.tmp.path().join("old.tar");
    src.export_signed(&[], &old);
    // the second version shares the first one's rootfs
    std::thread::sleep(Duration::from_millis(20));
    let between = chrono_now();
    publish_files(
        &src.server,
        &src.secret,
        &v2.metadata,
        &[v1.rootfs()],
        &["--alias", "stable"],
    );

    let new = src.tmp.path().join("new.tar");
    src.export_signed(&["--since-bundle", s(&old)], &new);
    let index = bundle_index(&new);
    let versions: Vec<&str> = index["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["20260102_0000"]);
    let blob_names = |b: &Path| -> BTreeSet<String> {
        members(b)
            .into_iter()
            .map(|m| m.0)
            .filter(|n| n.starts_with("blobs/"))
            .collect()
    };
    let (old_blobs, new_blobs) = (blob_names(&old), blob_names(&new));
    assert_eq!(
        new_blobs.len(),
        1,
        "only the new metadata tarball: {new_blobs:?}"
    );
    assert!(old_blobs.is_disjoint(&new_blobs));
    let rootfs = format!("sha256:{}", sha256_file(v1.rootfs()));
    assert_eq!(index["requires_blobs"][0]["digest"], rootfs.as_str());

    // --since DATE: the new version only, but with every blob it needs
    let dated = src.tmp.path().join("dated.tar");
    let out = export(&[
        "--data",
        s(src.server.data_dir()),
        "--since",
        &between,
        "-o",
        s(&dated),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        bundle_index(&dated)["versions"].as_array().unwrap().len(),
        1
    );
    assert_eq!(blob_names(&dated).len(), 2);

    // the new bundle alone cannot complete an empty site
    let tmp = temp_dir("bundle-incr");
    let site = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&site)]);
    trust(&site, &src.public);
    let out = import_into(&site, &new);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("incomplete") && t.contains(&rootfs) && t.contains("import that bundle first"),
        "{t}"
    );
    assert!(published(&site).is_empty());
    // old, then new: both
    let out = import_into(&site, &old);
    assert!(out.status.success(), "{}", text(&out));
    let out = import_into(&site, &new);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("alias debian-bookworm:stable -> 20260102_0000"),
        "{}",
        text(&out)
    );
    assert_eq!(
        published(&site),
        [
            "debian-bookworm@20260101_0000",
            "debian-bookworm@20260102_0000"
        ]
    );
    // the dated bundle is then a no-op
    let out = import_into(&site, &dated);
    assert!(text(&out).contains("nothing to import"), "{}", text(&out));
}

fn chrono_now() -> String {
    let out = run_ok(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Files in the blob store (`DATA/sha256/ab/cd/<hex>`).
fn stored_blobs(data: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let Ok(a) = std::fs::read_dir(data.join("sha256")) else {
        return found;
    };
    for a in a.flatten() {
        for b in std::fs::read_dir(a.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(b.path()).into_iter().flatten().flatten() {
                found.insert(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

#[test]
fn an_interrupted_import_resumes_and_never_shows_a_partial_version() {
    let src = source();
    let serials = ["20260101_0000", "20260102_0000", "20260103_0000"];
    for serial in serials {
        let img = make_test_image(
            src.tmp.path().join(serial),
            &["--serial", serial, "--pad-mib", "64"],
        );
        publish_image(&src.server, &src.secret, &img, &[]);
        std::fs::remove_dir_all(&img.dir).unwrap();
    }
    let bundle = src.tmp.path().join("big.tar");
    src.export_signed(&[], &bundle);
    drop(src.server);

    let dst = TestServer::start();
    trust(dst.data_dir(), &src.public);
    let before = stored_blobs(dst.data_dir());
    let mut child = Command::new(IMGSRV)
        .args(["import", "--data", s(dst.data_dir())])
        .arg(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut checks = 0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the import finished ({status}) before it could be interrupted");
        }
        // two blobs in: the first one's catalog row is surely written (the
        // blob being linked at the kill may not have its row yet)
        if stored_blobs(dst.data_dir()).len() >= before.len() + 2 {
            break;
        }
        if checks % 20 == 0 {
            assert!(visible_images(&dst).is_empty(), "visible during the import");
        }
        checks += 1;
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no blob was ever stored"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "not killed: {status}");
    let kept = stored_blobs(dst.data_dir());
    let stored_before_kill = kept.len() - before.len();
    assert!((2..6).contains(&stored_before_kill), "{stored_before_kill}");
    assert!(
        visible_images(&dst).is_empty(),
        "a partial import is visible"
    );
    assert!(published(dst.data_dir()).is_empty());

    let out = import_into(dst.data_dir(), &bundle);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("imported 3 version(s)"), "{t}");
    // what the killed run stored is not stored again (at most the one whose
    // catalog row was not written yet)
    let present: u64 = t
        .split(" already there")
        .next()
        .and_then(|x| x.rsplit(", ").next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'already there' count: {t}"));
    assert!(
        present + 1 >= stored_before_kill as u64 && present >= 1,
        "{t}"
    );
    assert_eq!(visible_images(&dst), ["debian-bookworm"]);
    assert_eq!(published(dst.data_dir()).len(), 3);
    assert_eq!(stored_blobs(dst.data_dir()).len(), before.len() + 6);
}

/// What only the index says (aliases, private flags) is trusted only when
/// the exporter signed it with a key the importing site trusts: otherwise
/// someone could make a private image public, or roll an alias back to an
/// older (signed, but vulnerable) version, on the way across the gap.
#[test]
fn the_index_is_signed_by_the_exporter_and_checked_on_import() {
    let src = source();
    let a = make_test_image(src.tmp.path().join("a"), &["--serial", "20260101_0000"]);
    publish_image(&src.server, &src.secret, &a, &["--alias", "stable"]);
    let data = src.server.data_dir();
    let signed = src.tmp.path().join("signed.tar");
    src.export_signed(&[], &signed);
    let unsigned = src.tmp.path().join("unsigned.tar");
    let out = export(&["--data", s(data), "-o", s(&unsigned)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(members(&unsigned)
        .iter()
        .all(|m| m.0 != "imgsrv-bundle.json.minisig"));
    let aliases_of = |server: &TestServer| {
        String::from_utf8_lossy(&server.get_ok("/v1/images/debian-bookworm/aliases")).into_owned()
    };

    // unsigned, enforce: the signed version comes in, the index's claims do not
    let dst = TestServer::start();
    trust(dst.data_dir(), &src.public);
    let out = import_into(dst.data_dir(), &unsigned);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("imgsrv-bundle.json is not signed"), "{t}");
    assert_eq!(published(dst.data_dir()), ["debian-bookworm@20260101_0000"]);
    assert!(visible_images(&dst).is_empty(), "created private");
    assert_eq!(visibility_and_aliases(dst.data_dir()), "private 0");

    // signed, but the index was altered on the way ("stable" -> "rtable")
    let at = index_bytes(&signed)
        .windows(8)
        .position(|w| w == b"\"stable\"")
        .expect("the alias in the index") as u64
        + 1;
    let altered = tampered(
        &signed,
        "imgsrv-bundle.json",
        at,
        &src.tmp.path().join("altered.tar"),
    );
    let dst2 = TestServer::start();
    trust(dst2.data_dir(), &src.public);
    let out = import_into(dst2.data_dir(), &altered);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("imgsrv-bundle.json.minisig: the index signature is refused"),
        "{}",
        text(&out)
    );
    assert!(published(dst2.data_dir()).is_empty());

    // signed by a key the importing site does not trust: refused too
    let (_other_pub, other_secret) = minisign_keypair(src.tmp.path().join("other"));
    let foreign = src.tmp.path().join("foreign.tar");
    let out = export(&[
        "--data",
        s(data),
        "--key",
        s(&other_secret),
        "-o",
        s(&foreign),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = import_into(dst2.data_dir(), &foreign);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the index signature is refused"),
        "{}",
        text(&out)
    );
    assert!(published(dst2.data_dir()).is_empty());

    // signed by the trusted key: aliases and visibility as on the source
    let out = import_into(dst2.data_dir(), &signed);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(visible_images(&dst2), ["debian-bookworm"]);
    assert!(
        aliases_of(&dst2).contains("\"stable\""),
        "{}",
        aliases_of(&dst2)
    );
    // on the first site, the signed bundle now sets the alias it held back
    // (an existing image keeps the visibility its operator gave it)
    let out = import_into(dst.data_dir(), &signed);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(visibility_and_aliases(dst.data_dir()), "private 1");
}

/// `VISIBILITY ALIASES` of debian-bookworm in a data directory's catalog.
fn visibility_and_aliases(data: &Path) -> String {
    catalog_sql(
        data,
        "SELECT visibility || ' ' || (SELECT count(*) FROM aliases) FROM images \
         WHERE name = 'debian-bookworm'",
    )
    .trim()
    .to_string()
}

/// `bundle` rebuilt with `edit` applied to each member (name, bytes) -> `None` to drop
/// it, and SHA256SUMS made anew over what is left: what someone on the way across the
/// gap who knows the format does.
fn rewritten(
    bundle: &Path,
    out: &Path,
    mut edit: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>,
) -> PathBuf {
    use sha2::Digest as _;
    let mut ar = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    let mut kept = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        if name == "SHA256SUMS" {
            continue;
        }
        if let Some(b) = edit(&name, bytes) {
            kept.push((name, b));
        }
    }
    let sums: String = kept
        .iter()
        .map(|(n, b)| format!("{}  {n}\n", hex::encode(sha2::Sha256::digest(b))))
        .collect();
    kept.push(("SHA256SUMS".into(), sums.into_bytes()));
    let mut w = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (name, b) in kept {
        let mut h = tar::Header::new_gnu();
        h.set_size(b.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        w.append_data(&mut h, &name, b.as_slice()).unwrap();
    }
    w.finish().unwrap();
    out.to_path_buf()
}

/// Issue 11, point 5: a bundle carries each version's tlog-proof, the log's checkpoint
/// and its level-0 tiles; an import whose client config trusts the source's log checks
/// them with no network and refuses, in enforce mode, a bundle whose proof was removed
/// or altered, one without the log, and an older bundle than one seen before (a smaller
/// tree); warn mode imports and says why.
#[test]
fn an_import_checks_the_bundles_log_proofs_offline_and_refuses_them_removed_or_altered() {
    let src = source();
    let work = src.tmp.path();
    let v1 = make_test_image(work.join("v1"), &["--serial", "20260301_0000"]);
    publish_image(&src.server, &src.secret, &v1, &[]);
    let old = work.join("old.tar");
    src.export_signed(&[], &old);
    let backup = work.join("backup");
    backup_to(src.server.data_dir(), &backup);
    let v2 = make_test_image(work.join("v2"), &["--serial", "20260302_0000"]);
    publish_image(&src.server, &src.secret, &v2, &[]);
    let bundle = work.join("release.tar");
    // (unsigned index: so that the rewrites below need no key)
    let out = export(&["--data", s(src.server.data_dir()), "-o", s(&bundle)]);
    assert!(out.status.success(), "{}", text(&out));

    // what it carries: a proof per version, the checkpoint, the tiles
    let names: Vec<String> = members(&bundle).into_iter().map(|m| m.0).collect();
    for want in [
        "manifests/debian-bookworm/20260301_0000.json.tlog-proof",
        "manifests/debian-bookworm/20260302_0000.json.tlog-proof",
        "log/checkpoint",
        "log/tile/0/000.p/3",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    let index = bundle_index(&bundle);
    let vkey = std::fs::read_to_string(src.server.data_dir().join("log/log.vkey")).unwrap();
    let origin = vkey.trim().split('+').next().unwrap().to_string();
    assert_eq!(index["log"]["origin"], origin.as_str(), "{index}");
    // (the publisher key's addition, then two publishes)
    assert_eq!(index["log"]["size"], 3, "{index}");
    // the proofs are the source's own, against the bundle's checkpoint
    let proof = read_member(
        &bundle,
        "manifests/debian-bookworm/20260302_0000.json.tlog-proof",
    );
    let checkpoint = read_member(&bundle, "log/checkpoint");
    assert!(
        String::from_utf8_lossy(&proof).ends_with(&*String::from_utf8_lossy(&checkpoint)),
        "{}",
        String::from_utf8_lossy(&proof)
    );

    // the importing site trusts the publisher and, in its client config, the log
    let config = work.join("client.toml");
    let state = work.join("state");
    std::fs::write(
        &config,
        format!(
            "[transparency_log]\nkeys = [\"{}\"]\nstate_dir = \"{}\"\n",
            vkey.trim(),
            state.display()
        ),
    )
    .unwrap();
    let site = |name: &str, mode: &str| {
        let data = work.join(name);
        imgsrv(&["init", "--data", s(&data)]);
        if !mode.is_empty() {
            std::fs::write(
                data.join("imgsrv.toml"),
                format!("[image_verification]\nmode = \"{mode}\"\n"),
            )
            .unwrap();
        }
        trust(&data, &src.public);
        data
    };
    let import = |data: &Path, bundle: &Path| {
        run_any(
            Command::new(IMGSRV)
                .args(["import", "--data", s(data), "--config", s(&config)])
                .arg(bundle),
        )
    };
    let refused = |data: &Path, bundle: &Path, why: &str| {
        let out = import(data, bundle);
        assert!(!out.status.success(), "imported: {}", text(&out));
        assert!(
            text(&out).contains("transparency log") && text(&out).contains(why),
            "{why}: {}",
            text(&out)
        );
        assert!(published(data).is_empty(), "{:?}", published(data));
    };

    // a proof removed (and the index and SHA256SUMS made to agree)
    let site1 = site("site1", "");
    let p2 = "manifests/debian-bookworm/20260302_0000.json.tlog-proof";
    let no_proof = rewritten(&bundle, &work.join("no-proof.tar"), |name, b| match name {
        n if n == p2 => None,
        "imgsrv-bundle.json" => {
            let mut i: Value = serde_json::from_slice(&b).unwrap();
            i["versions"][1]
                .as_object_mut()
                .unwrap()
                .remove("tlog_proof");
            Some(serde_json::to_vec_pretty(&i).unwrap())
        }
        _ => Some(b),
    });
    refused(
        &site1,
        &no_proof,
        "debian-bookworm@20260302_0000: the bundle carries no tlog-proof",
    );
    // a proof altered: it names another entry of the log (the first publish's)
    let p1 = "manifests/debian-bookworm/20260301_0000.json.tlog-proof";
    let other = read_member(&bundle, p1);
    let altered = rewritten(&bundle, &work.join("altered.tar"), |name, b| {
        (name == p2).then(|| other.clone()).or(Some(b))
    });
    refused(&site1, &altered, "does not prove this publication");
    // the whole log left out
    let no_log = rewritten(&bundle, &work.join("no-log.tar"), |name, b| match name {
        n if n.ends_with(".tlog-proof") || n.starts_with("log/") => None,
        "imgsrv-bundle.json" => {
            let mut i: Value = serde_json::from_slice(&b).unwrap();
            i.as_object_mut().unwrap().remove("log");
            for v in i["versions"].as_array_mut().unwrap() {
                v.as_object_mut().unwrap().remove("tlog_proof");
            }
            Some(serde_json::to_vec_pretty(&i).unwrap())
        }
        _ => Some(b),
    });
    refused(&site1, &no_log, "carries no transparency log");
    // a tile altered: the tree is not the checkpoint's
    let bad_tile = rewritten(&bundle, &work.join("bad-tile.tar"), |name, mut b| {
        if name == "log/tile/0/000.p/3" {
            b[0] ^= 1;
        }
        Some(b)
    });
    refused(&site1, &bad_tile, "do not make the tree");
    // (a checkpoint signed by the log was seen all the same: it is remembered, and a
    // smaller or forked tree shown later is caught against it)
    let remembered: Vec<_> = std::fs::read_dir(state.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "checkpoint"))
        .collect();
    assert_eq!(remembered.len(), 1, "{remembered:?}");
    assert_eq!(std::fs::read(&remembered[0]).unwrap(), checkpoint);

    // the real bundle imports, proven, and its checkpoint is remembered
    let out = import(&site1, &bundle);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("transparency log: 2 version(s) proven in")
            && text(&out).contains("at 3 entries"),
        "{}",
        text(&out)
    );
    assert_eq!(published(&site1).len(), 2);
    // then an older bundle (a tree of 2) into another site of the same consumer: rolled back
    let site2 = site("site2", "");
    refused(&site2, &old, "rolled back");

    // a fork: the source restored from a backup taken before v2, then publishing
    // something else as v2; its bundle (a tree of 3 again, another one) is refused
    // against the tree of 3 this consumer saw
    let (_root, forked_src) = serve_restored(&backup, "bundle-fork");
    let v2b = make_test_image(work.join("v2b"), &["--serial", "20260303_0000"]);
    publish_image(&forked_src, &src.secret, &v2b, &[]);
    let forked = work.join("forked.tar");
    let out = export(&["--data", s(forked_src.data_dir()), "-o", s(&forked)]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bundle_index(&forked)["log"]["size"], 3);
    refused(&site2, &forked, "a fork");

    // warn mode: imported, saying why
    let site3 = site("site3", "warn");
    let out = import(&site3, &no_proof);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("WARNING: transparency log: debian-bookworm@20260302_0000"),
        "{}",
        text(&out)
    );
    assert_eq!(published(&site3).len(), 2);
    // without log keys in the client config, no log is checked, and the import says so
    let site4 = site("site4", "");
    let out = run_any(
        Command::new(IMGSRV)
            .args([
                "import",
                "--data",
                s(&site4),
                "--config",
                s(&work.join("none.toml")),
            ])
            .arg(&no_log),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("transparency log: not checked"),
        "{}",
        text(&out)
    );
}

/// One member's bytes.
fn read_member(bundle: &Path, member: &str) -> Vec<u8> {
    let mut ar = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == member.as_bytes() {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            return v;
        }
    }
    panic!("no member {member}")
}
