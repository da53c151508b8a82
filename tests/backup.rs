//! `imgsrv backup` and `imgsrv restore` as an operator runs them: the real binary
//! backing up a data directory that a real `imgsrv serve` serves while `imgsrv publish`
//! publishes signed versions into it, a restore into a new directory, a server on that,
//! the real `incus` client listing it and `imgsrv verify` checking every version; a
//! second backup into the same directory; damaged backups; refused targets; a backup
//! waiting for a GC's lock.

mod support;

use imgsrv::catalog::{LockMode, MaintCatalog, SqliteCatalog};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::*;

const IMAGE: &str = "debian-bookworm";

/// A server trusting the publisher key `release`, and a consumer whose trusted-keys
/// directory holds `release.pub`.
struct Fixture {
    server: TestServer,
    secret: PathBuf,
    /// The consumer's trusted keys.
    keys: PathBuf,
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let server = TestServer::start();
        let tmp = temp_dir(name);
        let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
        trust_key(server.data_dir(), Some("release"), &public);
        let keys = tmp.path().join("trusted-keys");
        fs::create_dir_all(&keys).unwrap();
        fs::copy(&public, keys.join("release.pub")).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        Fixture {
            server,
            secret,
            keys,
            tmp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A container+VM image whose version (serial) is `202601DD_0000`.
    fn image(&self, day: usize) -> (String, TestImage) {
        let serial = format!("202601{day:02}_0000");
        let img = make_test_image(
            self.path(&format!("img-{day}")),
            &["--serial", &serial, "--type", "both"],
        );
        (serial, img)
    }

    /// `imgsrv verify` of `IMAGE@version` (container, then VM) against `server` as a
    /// consumer trusting `release.pub`: no token, no IMGSRV_* environment, no client.toml.
    fn verify(&self, server: &TestServer, version: &str) {
        for vm in [false, true] {
            let mut cmd = Command::new(IMGSRV);
            cmd.env("HOME", self.tmp.path().join("home"))
                .env_remove("XDG_CONFIG_HOME")
                .env_remove("IMGSRV_CLIENT_CONFIG")
                .env_remove("IMGSRV_TOKEN")
                .env_remove("IMGSRV_SERVER")
                .env_remove("IMGSRV_CA")
                .arg("verify")
                .arg("--server")
                .arg(server.url())
                .arg("--ca")
                .arg(server.cert())
                .arg("--trusted-keys")
                .arg(&self.keys)
                .arg(format!("{IMAGE}@{version}"));
            if vm {
                cmd.arg("--vm");
            }
            let out = run_any(&mut cmd);
            assert_eq!(
                out.status.code(),
                Some(0),
                "verify {version}: {}",
                text(&out)
            );
        }
    }
}

fn backup(data: &Path, dest: &Path, extra: &[&str]) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args(["backup", "--data", s(data), "--out", s(dest)])
            .args(extra),
    )
}

fn restore(from: &Path, data: &Path) -> Output {
    run_any(Command::new(IMGSRV).args(["restore", "--from", s(from), "--data", s(data)]))
}

#[track_caller]
fn expect(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
}

/// (copied, copied bytes, skipped, skipped bytes) from `backup complete: copied N blobs
/// (B bytes), skipped N (B bytes), ...`.
fn summary(o: &Output) -> (u64, u64, u64, u64) {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("backup complete: copied "))
        .unwrap_or_else(|| panic!("no summary line:\n{}", text(o)));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .take(4)
        .map(|w| w.parse().unwrap())
        .collect();
    (n[0], n[1], n[2], n[3])
}

/// (blob rows, their bytes) of the catalog in `dir`, read with sqlite3.
fn blob_rows(dir: &Path) -> (u64, u64) {
    let out = catalog_sql(
        dir,
        "SELECT count(*), coalesce(sum(size_bytes), 0) FROM cas_blobs",
    );
    let (a, b) = out.trim().split_once('|').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// The published versions of `IMAGE` in the catalog in `dir`.
fn published(dir: &Path) -> BTreeSet<String> {
    catalog_sql(
        dir,
        "SELECT v.version FROM image_versions v JOIN images i ON i.id = v.image_id \
         WHERE i.name = 'debian-bookworm' AND v.state = 'published'",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Files in the blob tree of `dir`.
fn blob_files(dir: &Path) -> u64 {
    fn walk(p: &Path, depth: usize) -> u64 {
        let Ok(rd) = fs::read_dir(p) else { return 0 };
        rd.map(|e| e.unwrap().path())
            .map(|p| match (p.is_dir(), depth) {
                (true, d) if d < 2 => walk(&p, d + 1),
                (false, 2) => 1,
                _ => 0,
            })
            .sum()
    }
    walk(&dir.join("sha256"), 0)
}

fn blob_path(dir: &Path, file: &Path) -> PathBuf {
    let h = sha256_file(file);
    dir.join("sha256").join(&h[0..2]).join(&h[2..4]).join(&h)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A backup taken while `imgsrv publish` publishes into the served directory holds a
/// consistent catalog: restored into a new directory, served, the incus client lists
/// exactly the fingerprints of the versions in the backup's catalog and `imgsrv verify`
/// passes for each. A second backup into the same directory copies only the new blobs.
#[test]
fn a_backup_during_a_publish_loop_restores_to_the_same_images() {
    let f = Fixture::new("backup-loop");
    let data = f.server.data_dir().to_path_buf();
    let images: Vec<(String, TestImage)> = std::thread::scope(|sc| {
        let fr = &f;
        let handles: Vec<_> = (1..=7).map(|d| sc.spawn(move || fr.image(d))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let fingerprints: BTreeMap<String, [String; 2]> = images
        .iter()
        .map(|(v, i)| (v.clone(), [i.container_fingerprint(), i.vm_fingerprint()]))
        .collect();
    publish_image(&f.server, &f.secret, &images[0].1, &["--alias", "stable"]);

    let dest = f.path("backup");
    let done: Mutex<Vec<String>> = Mutex::new(vec![images[0].0.clone()]);
    let (first, at_start, at_end) = std::thread::scope(|sc| {
        sc.spawn(|| {
            for (v, img) in &images[1..] {
                publish_image(&f.server, &f.secret, img, &[]);
                done.lock().unwrap().push(v.clone());
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.lock().unwrap().len() < 3 {
            assert!(Instant::now() < deadline, "the publish loop is stuck");
            std::thread::sleep(Duration::from_millis(20));
        }
        let at_start = done.lock().unwrap().len();
        let out = backup(&data, &dest, &[]);
        let at_end = done.lock().unwrap().len();
        (out, at_start, at_end)
    });
    expect(&first, 0);
    assert!(
        at_start < images.len(),
        "the loop was still publishing when the backup started"
    );
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(out.contains("plan: copy "), "{out}");
    let in_backup = published(&dest);
    assert!(
        in_backup.len() >= at_start && in_backup.len() <= at_end + 1,
        "{in_backup:?}: {at_start}..={at_end} were published around the backup"
    );
    let (copied, copied_bytes, skipped, _) = summary(&first);
    assert_eq!((copied, copied_bytes), blob_rows(&dest), "{out}");
    assert_eq!(skipped, 0);
    assert_eq!(blob_files(&dest), copied);
    for secret in ["admin.token", "tls/key.pem", "log/log.key"] {
        assert_eq!(mode(&dest.join(secret)), 0o600, "{secret}");
    }
    // the trusted keys are in the catalog copy
    assert_eq!(
        catalog_sql(&dest, "SELECT name FROM trusted_keys").trim(),
        "release"
    );

    // restore, serve, list with incus, verify
    let root = temp_dir("restored");
    let restored = root.path().join("data");
    let r = restore(&dest, &restored);
    expect(&r, 0);
    assert!(
        text(&r).contains(&format!(
            "{} published signatures verified",
            in_backup.len()
        )),
        "{}",
        text(&r)
    );
    for secret in ["admin.token", "tls/key.pem", "log/log.key"] {
        assert_eq!(mode(&restored.join(secret)), 0o600, "{secret}");
    }
    let audit = imgsrv(&["audit", "--data", s(&restored), "--action", "restore"]);
    assert!(text(&audit).contains(s(&dest)), "{}", text(&audit));
    let server = TestServer::start_in(&restored);
    let incus = Incus::new(server.cert());
    incus.remote_add("r", &server.url());
    let listed: BTreeSet<String> = incus.fingerprints("r:").into_iter().collect();
    let want: BTreeSet<String> = in_backup
        .iter()
        .flat_map(|v| fingerprints[v].clone())
        .collect();
    assert_eq!(listed, want, "fingerprints the restored server serves");
    assert_eq!(
        incus.info_fingerprint(&[&format!("r:{IMAGE}/stable")]),
        fingerprints[&images[0].0][0],
        "the alias came along"
    );
    for v in &in_backup {
        f.verify(&server, v);
    }
    // the original's admin token works on the restored server
    let resp = server
        .agent()
        .get(format!("{}/v1/auth/principals", server.url()))
        .header(
            "Authorization",
            format!("Bearer {}", f.server.admin_token()),
        )
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    // everything published since: a second backup copies only what is new
    let before = blob_rows(&dest);
    let second = backup(&data, &dest, &[]);
    expect(&second, 0);
    let after = blob_rows(&dest);
    assert_eq!(published(&dest).len(), images.len());
    assert!(after.0 > before.0, "new versions, new blobs");
    assert_eq!(
        summary(&second),
        (after.0 - before.0, after.1 - before.1, before.0, before.1),
        "{}",
        text(&second)
    );
    assert_eq!(blob_files(&dest), after.0);
    let third = backup(&data, &dest, &[]);
    expect(&third, 0);
    assert_eq!(summary(&third), (0, 0, after.0, after.1));
}

/// Restore copies and checks every blob: a flipped byte and a missing blob fail it,
/// naming the version they affect, and leave the directory unusable (a server refuses
/// it); once the backup is repaired, a restore into the same directory starts over
/// and succeeds. A directory a running server holds, or any non-empty one, is refused.
#[test]
fn restore_checks_every_blob_and_refuses_what_it_must_not_write() {
    let f = Fixture::new("backup-damage");
    let data = f.server.data_dir().to_path_buf();
    let (version, img) = f.image(1);
    publish_image(&f.server, &f.secret, &img, &[]);
    let dest = f.path("backup");
    expect(&backup(&data, &dest, &[]), 0);

    let rootfs = blob_path(&dest, img.rootfs());
    let disk = blob_path(&dest, img.disk());
    let original = fs::read(&rootfs).unwrap();
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0x01;
    fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&rootfs, &flipped).unwrap();
    let disk_bytes = fs::read(&disk).unwrap();
    fs::remove_file(&disk).unwrap();

    let root = temp_dir("restore-bad");
    let target = root.path().join("data");
    let r = restore(&dest, &target);
    expect(&r, 1);
    let out = text(&r);
    let name = format!("{IMAGE}@{version}");
    for (file, why) in [
        (img.rootfs(), "damaged in the backup"),
        (img.disk(), "missing from the backup"),
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(&sha256_file(file)) && l.starts_with("FAILED"))
            .unwrap_or_else(|| panic!("{} not reported:\n{out}", file.display()));
        assert!(line.contains(why) && line.contains(&name), "{line}");
    }
    assert!(target.join("RESTORE-INCOMPLETE").is_file());
    let serve = run_within(
        Command::new(IMGSRV).args(["serve", "--data", s(&target), "--listen", "127.0.0.1:0"]),
        Duration::from_secs(20),
    );
    expect(&serve, 1);
    assert!(text(&serve).contains("is not usable"), "{}", text(&serve));
    assert!(!text(&serve).contains("imgsrv serving"));

    // the backup repaired: the same directory is cleared and restored
    fs::write(&rootfs, &original).unwrap();
    fs::write(&disk, &disk_bytes).unwrap();
    let r = restore(&dest, &target);
    expect(&r, 0);
    assert!(text(&r).contains("clearing what an unfinished restore left"));
    assert!(!target.join("RESTORE-INCOMPLETE").exists());
    let server = TestServer::start_in(&target);
    f.verify(&server, &version);

    // a directory a running server holds: refused, the server untouched
    let r = restore(&dest, server.data_dir());
    expect(&r, 1);
    let pid = server.pid().unwrap();
    assert!(
        text(&r).contains(&format!(
            "another imgsrv serve (PID {pid}) is already serving"
        )),
        "{}",
        text(&r)
    );
    assert!(!server.data_dir().join("RESTORE-INCOMPLETE").exists());
    f.verify(&server, &version);

    // any other non-empty directory: refused, and left as it was
    let other = root.path().join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("notes.txt"), "mine").unwrap();
    let r = restore(&dest, &other);
    expect(&r, 1);
    assert!(text(&r).contains("is not empty"), "{}", text(&r));
    let left: Vec<_> = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec!["notes.txt"]);

    // a damaged blob in the source: the backup names it and what it affects, and is
    // not a backup
    let source_blob = blob_path(&data, img.rootfs());
    fs::set_permissions(&source_blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&source_blob, &flipped).unwrap();
    let fresh = f.path("backup-of-damaged");
    let b = backup(&data, &fresh, &[]);
    expect(&b, 1);
    let line = text(&b)
        .lines()
        .find(|l| l.starts_with("FAILED") && l.contains(&sha256_file(img.rootfs())))
        .unwrap_or_else(|| panic!("not reported:\n{}", text(&b)))
        .to_string();
    assert!(
        line.contains(&name) && line.contains("does not match"),
        "{line}"
    );
    assert!(!fresh.join("backup.json").exists());
    let audit = imgsrv(&["audit", "--data", s(&data), "--action", "backup", "--json"]);
    let audit = String::from_utf8_lossy(&audit.stdout).into_owned();
    assert!(
        audit.contains("\"outcome\":\"failed\"") && audit.contains("\"outcome\":\"ok\""),
        "{audit}"
    );

    // a backup without its manifest is not a backup
    fs::rename(dest.join("backup.json"), f.path("backup.json")).unwrap();
    let r = restore(&dest, &root.path().join("fresh"));
    expect(&r, 1);
    assert!(
        text(&r).contains("not a complete imgsrv backup"),
        "{}",
        text(&r)
    );
    assert!(!root.path().join("fresh").exists());
}

/// A backup started while a GC holds the `blobs` lock exclusively waits for it, and
/// says so, before it takes its snapshot; killed while it waits, it leaves no
/// `backup.json` (restore refuses the directory) and the next backup completes.
/// `--dry-run` prints the plan and writes nothing.
#[test]
fn a_backup_waits_for_a_gc_and_an_interrupted_one_is_not_a_backup() {
    let f = Fixture::new("backup-gc");
    let data = f.server.data_dir().to_path_buf();
    let (_, img) = f.image(1);
    publish_image(&f.server, &f.secret, &img, &[]);
    let (rows, bytes) = blob_rows(&data);

    let dest = f.path("backup");
    let dry = backup(&data, &dest, &["--dry-run"]);
    expect(&dry, 0);
    assert!(
        text(&dry).contains(&format!("plan: copy {rows} blobs, {bytes} bytes")),
        "{}",
        text(&dry)
    );
    assert!(!dest.exists(), "a dry run writes nothing");

    let gc = SqliteCatalog::open(&data.join("catalog.db")).unwrap();
    let start_waiting = |log: &Path| {
        let file = fs::File::create(log).unwrap();
        let child = Command::new(IMGSRV)
            .args(["backup", "--data", s(&data), "--out", s(&dest)])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fs::read_to_string(log)
            .unwrap()
            .contains("waiting for the blobs lock")
        {
            assert!(
                Instant::now() < deadline,
                "{}",
                fs::read_to_string(log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    };

    let lock = gc
        .job_lock("blobs", LockMode::Exclusive, false)
        .unwrap()
        .expect("no one holds the lock");
    let mut child = start_waiting(&f.path("first.log"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "it waits");
    assert!(!dest.join("backup.json").exists());
    assert!(
        blob_files(&dest) == 0,
        "no blob copied while the GC holds the lock"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let r = restore(&dest, &f.path("restored"));
    expect(&r, 1);
    assert!(
        text(&r).contains("not a complete imgsrv backup"),
        "{}",
        text(&r)
    );

    let mut child = start_waiting(&f.path("second.log"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "it waits again");
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the backup did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = fs::read_to_string(f.path("second.log")).unwrap();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "backup complete: copied {rows} blobs ({bytes} bytes)"
        )),
        "{log}"
    );
    expect(&restore(&dest, &f.path("restored")), 0);
}
