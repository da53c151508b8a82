//! Consumer-side verification as a user runs it: `imgsrv verify` and `imgsrv pull`
//! against a real `imgsrv serve`, images published with `imgsrv publish`, the real
//! `minisign`, `sqlite3` and, for the import, the real `incus` client and daemon.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::*;

const OLD: &str = "20260101_0000";
const NEW: &str = "20260102_0000";
const IMAGE: &str = "debian-bookworm";

/// A server trusting the publisher key `release`, with `debian-bookworm@OLD` (container
/// and VM) published and signed by it, alias `stable` on it; and a consumer whose
/// trusted-keys directory holds `release.pub`.
struct Fixture {
    server: TestServer,
    img: TestImage,
    public: PathBuf,
    secret: PathBuf,
    /// The consumer's trusted keys: `release.pub`.
    keys: PathBuf,
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let server = TestServer::start();
        let tmp = temp_dir(name);
        let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
        trust_key(server.data_dir(), Some("release"), &public);
        let img = make_test_image(tmp.path().join("img"), &["--serial", OLD, "--type", "both"]);
        publish_image(&server, &secret, &img, &["--alias", "stable"]);
        let keys = tmp.path().join("trusted-keys");
        fs::create_dir_all(&keys).unwrap();
        fs::copy(&public, keys.join("release.pub")).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        Fixture {
            server,
            img,
            public,
            secret,
            keys,
            tmp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `imgsrv SUB --server URL --ca CERT ARGS...` as a consumer: no token, no
    /// IMGSRV_* environment, a HOME without any client.toml.
    fn run(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = consumer_command(&self.tmp.path().join("home"));
        cmd.arg(sub)
            .arg("--server")
            .arg(self.server.url())
            .arg("--ca")
            .arg(self.server.cert())
            .args(args);
        run_any(&mut cmd)
    }

    /// Writes a consumer config file and returns its path.
    fn config(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// The blob file of `file`'s bytes in the server's store, made writable.
    fn blob_path(&self, file: &Path) -> PathBuf {
        let h = sha256_file(file);
        let p = self
            .server
            .data_dir()
            .join("sha256")
            .join(&h[0..2])
            .join(&h[2..4])
            .join(&h);
        assert!(p.is_file(), "{} is not in the store", p.display());
        run_ok(Command::new("chmod").arg("u+w").arg(&p));
        p
    }
}

fn consumer_command(home: &Path) -> Command {
    let mut cmd = Command::new(IMGSRV);
    cmd.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("IMGSRV_CLIENT_CONFIG")
        .env_remove("IMGSRV_TOKEN")
        .env_remove("IMGSRV_SERVER")
        .env_remove("IMGSRV_CA")
        .stdin(Stdio::null());
    cmd
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing both streams otherwise.
#[track_caller]
fn expect(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}\n--- stdout:\n{}\n--- stderr:\n{}",
        out(o),
        err(o)
    );
}

#[track_caller]
fn assert_has(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

/// Names of the entries in `dir` (hidden ones too); empty if it does not exist.
fn entries(dir: &Path) -> BTreeSet<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn verify_and_pull_pass_on_an_untouched_image() {
    let f = Fixture::new("verify-ok");
    let new = make_test_image(f.path("new"), &["--serial", NEW, "--type", "both"]);
    publish_image(&f.server, &f.secret, &new, &[]);
    let keys = s(&f.keys);

    // IMAGE alone: the newest version.
    let o = f.run("verify", &["--trusted-keys", keys, IMAGE]);
    expect(&o, 0);
    assert_has(&out(&o), &format!("verified {IMAGE} {NEW} (container"));
    assert_has(
        &out(&o),
        &format!("release ({})", minisign_key_id(&f.public)),
    );
    assert_has(&out(&o), &new.container_fingerprint());

    // IMAGE:ALIAS through refs, --vm, one .pub file instead of a directory.
    let o = f.run(
        "verify",
        &[
            "--trusted-keys",
            s(&f.public),
            "--vm",
            &format!("{IMAGE}:stable"),
        ],
    );
    expect(&o, 0);
    assert_has(
        &out(&o),
        &format!("verified {IMAGE} {OLD} (virtual-machine"),
    );
    assert_has(&out(&o), &f.img.vm_fingerprint());
    assert_has(&out(&o), &format!("stable -> {OLD}"));

    // IMAGE@VERSION; amd64 is x86_64; there is no arm64 artifact.
    let at_old = format!("{IMAGE}@{OLD}");
    let o = f.run(
        "verify",
        &["--trusted-keys", keys, "--arch", "amd64", &at_old],
    );
    expect(&o, 0);
    assert_has(&out(&o), &f.img.container_fingerprint());
    let o = f.run(
        "verify",
        &["--trusted-keys", keys, "--arch", "arm64", &at_old],
    );
    expect(&o, 2);
    assert_has(&err(&o), "no squashfs artifact for aarch64");

    // pull: byte-identical files, the signed manifest and its signature.
    let dir = f.path("pulled");
    let o = f.run("pull", &["--trusted-keys", keys, "--out", s(&dir), &at_old]);
    expect(&o, 0);
    assert_eq!(
        entries(&dir),
        set(&[
            "incus.tar.xz",
            "rootfs.squashfs",
            "manifest.json",
            "manifest.json.minisig"
        ]),
        "exactly the final files, no temporary left"
    );
    assert_has(
        &out(&o),
        &format!(
            "incus image import {} {}",
            dir.join("incus.tar.xz").display(),
            dir.join("rootfs.squashfs").display()
        ),
    );
    assert!(fs::read(dir.join("incus.tar.xz")).unwrap() == fs::read(&f.img.metadata).unwrap());
    assert!(fs::read(dir.join("rootfs.squashfs")).unwrap() == fs::read(f.img.rootfs()).unwrap());
    assert_eq!(
        sha256_concat(dir.join("incus.tar.xz"), dir.join("rootfs.squashfs")),
        f.img.container_fingerprint()
    );
    assert_eq!(
        fs::read(dir.join("manifest.json")).unwrap(),
        f.server
            .get_ok(&format!("/v1/images/{IMAGE}/versions/{OLD}/manifest"))
    );
    // The user can re-check the signature with the stock minisign.
    run_ok(
        Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(&f.public)
            .arg("-m")
            .arg(dir.join("manifest.json")),
    );

    // pull --vm of the alias.
    let vm_dir = f.path("pulled-vm");
    let o = f.run(
        "pull",
        &[
            "--trusted-keys",
            keys,
            "--vm",
            "--out",
            s(&vm_dir),
            &format!("{IMAGE}:stable"),
        ],
    );
    expect(&o, 0);
    assert!(entries(&vm_dir).contains("disk.qcow2"));
    assert!(!entries(&vm_dir).contains("rootfs.squashfs"));
    assert!(fs::read(vm_dir.join("disk.qcow2")).unwrap() == fs::read(f.img.disk()).unwrap());

    // Pulling over existing files is refused (exit 2) and changes nothing.
    let before = fs::read(dir.join("manifest.json")).unwrap();
    let o = f.run("pull", &["--trusted-keys", keys, "--out", s(&dir), IMAGE]);
    expect(&o, 2);
    assert_has(&err(&o), "already exists");
    assert_eq!(fs::read(dir.join("manifest.json")).unwrap(), before);
    assert_eq!(entries(&dir).len(), 4);
}

#[test]
fn pulled_image_imports_into_a_real_incus_daemon() {
    let f = Fixture::new("verify-import");
    let dir = f.path("pulled");
    let o = f.run(
        "pull",
        &["--trusted-keys", s(&f.keys), "--out", s(&dir), IMAGE],
    );
    expect(&o, 0);

    let _daemon = IncusDaemon::up(f.server.cert());
    let incus = Incus::new(f.server.cert());
    incus.run(&[
        "image",
        "import",
        s(&dir.join("incus.tar.xz")),
        s(&dir.join("rootfs.squashfs")),
        "--alias",
        "pulled",
    ]);
    let fp = incus.info_fingerprint(&["pulled"]);
    assert_eq!(fp, f.img.container_fingerprint());
    assert_has(&out(&o), &fp);
}

#[test]
fn a_blob_altered_on_the_server_fails_and_pull_keeps_nothing() {
    let f = Fixture::new("verify-blob");
    let keys = s(&f.keys);
    let hex = sha256_file(f.img.rootfs());
    let blob = f.blob_path(f.img.rootfs());
    let mut bytes = fs::read(&blob).unwrap();
    bytes[1000] ^= 0x01;
    fs::write(&blob, &bytes).unwrap();

    let o = f.run("verify", &["--trusted-keys", keys, IMAGE]);
    expect(&o, 1);
    assert_has(
        &err(&o),
        &format!(
            "rootfs.squashfs (sha256:{hex}): sha256 mismatch: expected sha256:{hex}, got sha256:"
        ),
    );
    // The VM disk is untouched and still verifies.
    expect(
        &f.run("verify", &["--trusted-keys", keys, "--vm", IMAGE]),
        0,
    );

    // pull: nothing final (and no temporary) in --out, new or existing.
    let fresh = f.path("fresh");
    let o = f.run("pull", &["--trusted-keys", keys, "--out", s(&fresh), IMAGE]);
    expect(&o, 1);
    assert_has(&err(&o), "rootfs.squashfs");
    assert_has(&err(&o), "nothing was written");
    assert!(entries(&fresh).is_empty(), "{:?}", entries(&fresh));
    let existing = f.path("existing");
    fs::create_dir_all(&existing).unwrap();
    fs::write(existing.join("notes.txt"), "mine").unwrap();
    expect(
        &f.run(
            "pull",
            &["--trusted-keys", keys, "--out", s(&existing), IMAGE],
        ),
        1,
    );
    assert_eq!(entries(&existing), set(&["notes.txt"]));

    // warn: the problems are printed, exit 0, the files are kept.
    let warn = f.config("warn.toml", "[image_verification]\nmode = \"warn\"\n");
    let kept = f.path("kept");
    let o = f.run(
        "pull",
        &[
            "--config",
            &warn,
            "--trusted-keys",
            keys,
            "--out",
            s(&kept),
            IMAGE,
        ],
    );
    expect(&o, 0);
    assert_has(
        &err(&o),
        &format!("warning: rootfs.squashfs (sha256:{hex}): sha256 mismatch"),
    );
    assert_has(&err(&o), "warning: fingerprint:");
    assert_has(&out(&o), "NOT verified");
    assert_eq!(fs::read(kept.join("rootfs.squashfs")).unwrap(), bytes);

    // off skips only the signature: the digest check still fails.
    let off = f.config("off.toml", "[image_verification]\nmode = \"off\"\n");
    let o = f.run("verify", &["--config", &off, IMAGE]);
    expect(&o, 1);
    assert_has(&err(&o), "sha256 mismatch");
}

#[test]
fn a_manifest_signed_by_a_key_the_consumer_does_not_trust_fails() {
    let f = Fixture::new("verify-untrusted");
    let (other, _) = minisign_keypair(f.path("other"));
    let other_keys = f.path("other-keys");
    fs::create_dir_all(&other_keys).unwrap();
    fs::copy(&other, other_keys.join("someone.pub")).unwrap();
    let keys = s(&other_keys);

    let o = f.run("verify", &["--trusted-keys", keys, IMAGE]);
    expect(&o, 1);
    assert_has(
        &err(&o),
        &format!(
            "manifest signature: signed by key {} (the server calls it \"release\") which you do not trust",
            minisign_key_id(&f.public)
        ),
    );
    let dir = f.path("pulled");
    expect(
        &f.run("pull", &["--trusted-keys", keys, "--out", s(&dir), IMAGE]),
        1,
    );
    assert!(entries(&dir).is_empty());

    // warn and off let it through, saying so.
    let warn = f.config("warn.toml", "[image_verification]\nmode = \"warn\"\n");
    let o = f.run(
        "verify",
        &["--config", &warn, "--trusted-keys", keys, IMAGE],
    );
    expect(&o, 0);
    assert_has(&err(&o), "warning: manifest signature: signed by key");
    let off = f.config("off.toml", "[image_verification]\nmode = \"off\"\n");
    let o = f.run("verify", &["--config", &off, IMAGE]);
    expect(&o, 0);
    assert_has(&out(&o), "the signature was NOT checked");
    assert_has(&err(&o), "verification mode is off");

    // The default config places are read: IMGSRV_CLIENT_CONFIG, then XDG_CONFIG_HOME.
    let home = f.path("home");
    let o = run_any(
        consumer_command(&home)
            .env("IMGSRV_CLIENT_CONFIG", &warn)
            .args(["verify", "--server", &f.server.url(), "--ca"])
            .arg(f.server.cert())
            .args(["--trusted-keys", keys, IMAGE]),
    );
    expect(&o, 0);
    let xdg = f.path("xdg");
    fs::create_dir_all(xdg.join("imgsrv")).unwrap();
    fs::copy(&warn, xdg.join("imgsrv/client.toml")).unwrap();
    let o = run_any(
        consumer_command(&home)
            .env("XDG_CONFIG_HOME", &xdg)
            .args(["verify", "--server", &f.server.url(), "--ca"])
            .arg(f.server.cert())
            .args(["--trusted-keys", keys, IMAGE]),
    );
    expect(&o, 0);
    assert_has(&err(&o), "warning: manifest signature");

    // An unreadable mode is enforce, loudly.
    for (name, text, needle) in [
        (
            "typo.toml",
            "[image_verification]\nmode = \"of\"\n",
            "\"of\"",
        ),
        (
            "type.toml",
            "[image_verification]\nmode = false\n",
            "boolean",
        ),
        (
            "broken.toml",
            "[image_verification\nmode = \"off\"\n",
            "not valid TOML",
        ),
    ] {
        let cfg = f.config(name, text);
        let o = f.run("verify", &["--config", &cfg, "--trusted-keys", keys, IMAGE]);
        expect(&o, 1);
        assert_has(&err(&o), needle);
        assert_has(&err(&o), "verification mode is ENFORCE");
        assert_has(&err(&o), "do not trust");
    }
    let o = f.run(
        "verify",
        &[
            "--config",
            s(&f.path("missing.toml")),
            "--trusted-keys",
            keys,
            IMAGE,
        ],
    );
    expect(&o, 1);
    assert_has(&err(&o), "ENFORCE");

    // Trusted keys that cannot be used: could not run.
    let empty = f.path("empty-keys");
    fs::create_dir_all(&empty).unwrap();
    let o = f.run("verify", &["--trusted-keys", s(&empty), IMAGE]);
    expect(&o, 2);
    assert_has(&err(&o), "no trusted keys");
    let o = f.run("verify", &["--trusted-keys", s(&f.path("nope")), IMAGE]);
    expect(&o, 2);
    assert_has(&err(&o), "nope");
    let o = f.run("verify", &[IMAGE]);
    expect(&o, 2);
    assert_has(&err(&o), "--trusted-keys");
}

#[test]
fn a_served_manifest_that_does_not_match_its_signature_fails() {
    let mut f = Fixture::new("verify-manifest");
    // The privileged-operator attack: edit the published manifest in the catalog.
    f.server.kill();
    let sql = "DROP TRIGGER publish_records_no_update; \
        UPDATE publish_records SET manifest = CAST(replace(CAST(manifest AS TEXT), \
        '\"release\":\"bookworm\"', '\"release\":\"bullseye\"') AS BLOB); \
        SELECT changes();";
    let changed = catalog_sql(f.server.data_dir(), sql);
    assert_eq!(changed.trim(), "1", "the manifest row was not changed");
    f.server.spawn();
    let served = f
        .server
        .get_ok(&format!("/v1/images/{IMAGE}/versions/{OLD}/manifest"));
    assert!(String::from_utf8_lossy(&served).contains("\"release\":\"bullseye\""));

    let o = f.run("verify", &["--trusted-keys", s(&f.keys), IMAGE]);
    expect(&o, 1);
    assert_has(
        &err(&o),
        "manifest signature: does not verify with your key release",
    );
    assert_has(&err(&o), "not the one that was signed");
    let dir = f.path("pulled");
    expect(
        &f.run(
            "pull",
            &["--trusted-keys", s(&f.keys), "--out", s(&dir), IMAGE],
        ),
        1,
    );
    assert!(entries(&dir).is_empty());

    // warn: both the signature and the publication record disagree.
    let warn = f.config("warn.toml", "[image_verification]\nmode = \"warn\"\n");
    let o = f.run(
        "verify",
        &["--config", &warn, "--trusted-keys", s(&f.keys), IMAGE],
    );
    expect(&o, 0);
    assert_has(&err(&o), "warning: manifest signature: does not verify");
    assert_has(&err(&o), "publication record names manifest");
}

#[test]
fn a_revoked_or_out_of_scope_key_fails() {
    let f = Fixture::new("verify-revoked");
    let keys = s(&f.keys);
    let policy = f.keys.join("release.toml");
    let id = minisign_key_id(&f.public);

    // Revoked in the consumer's own store.
    fs::write(
        &policy,
        "scopes = [\"*\"]\nstate = \"revoked\"\nrevoked_at = \"2026-02-01T00:00:00Z\"\n",
    )
    .unwrap();
    let o = f.run("verify", &["--trusted-keys", keys, IMAGE]);
    expect(&o, 1);
    assert_has(
        &err(&o),
        &format!("manifest signature: key release ({id}) is revoked in your trusted keys"),
    );
    let dir = f.path("pulled");
    expect(
        &f.run("pull", &["--trusted-keys", keys, "--out", s(&dir), IMAGE]),
        1,
    );
    assert!(entries(&dir).is_empty());

    // Scopes that do not cover the image.
    fs::write(&policy, "scopes = [\"ubuntu-*\"]\nstate = \"active\"\n").unwrap();
    let o = f.run("verify", &["--trusted-keys", keys, IMAGE]);
    expect(&o, 1);
    assert_has(&err(&o), "may sign only images matching ubuntu-*");

    // Retired: what it signed still verifies.
    fs::write(&policy, "scopes = [\"debian-*\"]\nstate = \"retired\"\n").unwrap();
    expect(&f.run("verify", &["--trusted-keys", keys, IMAGE]), 0);

    // A policy that cannot be read: could not run (it may hold a revocation).
    fs::write(&policy, "state = \"gone\"\n").unwrap();
    expect(&f.run("verify", &["--trusted-keys", keys, IMAGE]), 2);

    // Revoked on the server (no restart): the consumer's "active" does not override it.
    fs::remove_file(&policy).unwrap();
    expect(&f.run("verify", &["--trusted-keys", keys, IMAGE]), 0);
    // an Incus client that read the index before the revocation (it caches
    // it for 5 minutes, a daemon for an hour)
    let cached = Incus::new(f.server.cert());
    cached.remote_add("r", &f.server.url());
    assert_eq!(cached.fingerprints("r:").len(), 2, "container and VM");
    imgsrv(&["key", "revoke", "--data", s(f.server.data_dir()), "release"]);
    // what the revoked key signed is gone for the Incus client: not listed
    // for a fresh one, and not downloadable for the one with the cached index
    let fresh = Incus::new(f.server.cert());
    fresh.remote_add("r", &f.server.url());
    assert_eq!(fresh.fingerprints("r:"), Vec::<String>::new());
    let out = f.path("exported");
    let o = cached.try_run(&[
        "image",
        "export",
        &format!("r:{}", f.img.container_fingerprint()),
        s(&out),
    ]);
    assert!(
        !o.status.success(),
        "export of a revoked key's image succeeded: {}",
        text(&o)
    );
    // Incus names the refusal: "Unable to fetch https://…/download/…: 410 Gone"
    assert_has(&text(&o), "410 Gone");
    let o = f.run("verify", &["--trusted-keys", keys, IMAGE]);
    expect(&o, 1);
    assert_has(
        &err(&o),
        &format!("key release ({id}) is revoked: the server reports it revoked"),
    );
    expect(
        &f.run("pull", &["--trusted-keys", keys, "--out", s(&dir), IMAGE]),
        1,
    );
    assert!(entries(&dir).is_empty());
}

#[test]
fn exit_2_when_it_cannot_run() {
    let server = TestServer::start();
    let tmp = temp_dir("verify-cannot");
    let (public, _) = minisign_keypair(tmp.path().join("k"));
    let home = tmp.path().join("home");
    let run = |url: &str, args: &[&str]| {
        let mut cmd = consumer_command(&home);
        cmd.args(["verify", "--server", url, "--ca"])
            .arg(server.cert())
            .arg("--trusted-keys")
            .arg(&public)
            .args(args);
        run_any(&mut cmd)
    };

    let dead = format!("https://127.0.0.1:{}", free_port());
    let o = run(&dead, &[IMAGE]);
    expect(&o, 2);
    assert_has(&err(&o), "127.0.0.1");

    for target in ["nope", "nope@1", "nope:stable"] {
        let o = run(&server.url(), &[target]);
        expect(&o, 2);
        assert_has(&err(&o), "404");
    }
    let o = run(&server.url(), &["Not/An-Image"]);
    expect(&o, 2);
    assert_has(&err(&o), "invalid image name");
    let o = run("http://127.0.0.1:1", &[IMAGE]);
    expect(&o, 2);
    assert_has(&err(&o), "https://");

    // Usage errors (clap) are 2 as well: no server, no image.
    let o = run_any(consumer_command(&home).args(["verify", IMAGE]));
    expect(&o, 2);
    let o = run_any(consumer_command(&home).args(["pull", "--server", &server.url(), IMAGE]));
    expect(&o, 2);
    assert_has(&err(&o), "--out");
}
