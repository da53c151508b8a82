//! Issue 11: the transparency log as a consumer meets it. A real `imgsrv serve`, real
//! publishes signed with the `minisign` CLI, and an independent verifier written from
//! the C2SP and RFC 6962/9162 specs in Python (tests/fixtures/tlog-verify, which calls
//! no imgsrv code) that checks the checkpoint's signature, the tree from the tiles
//! alone, every inclusion proof and a consistency proof across a publish.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

const VERIFIER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tlog-verify");

fn verify(server: &TestServer, vkey: &str, proofs: &[&Path], old: Option<&Path>) -> Output {
    let mut c = Command::new("/usr/bin/python3");
    c.arg(VERIFIER).args([
        "--url",
        &server.url(),
        "--ca",
        s(&server.cert()),
        "--vkey",
        vkey,
    ]);
    for p in proofs {
        c.arg("--proof").arg(p);
    }
    if let Some(o) = old {
        c.arg("--old").arg(o);
    }
    run_any(&mut c)
}

fn verified(
    server: &TestServer,
    vkey: &str,
    proofs: &[&Path],
    old: Option<&Path>,
) -> serde_json::Value {
    let out = verify(server, vkey, proofs, old);
    assert!(out.status.success(), "the verifier refused: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn an_independent_verifier_checks_checkpoint_tiles_inclusion_and_consistency() {
    let work = temp_dir("tlog-verify");
    let server = TestServer::start();
    let data = server.data_dir().to_path_buf();

    // the key made at init: its vkey in DATA/log/log.vkey, served, the private half 0600
    let vkey = fs::read_to_string(data.join("log/log.vkey")).unwrap();
    let vkey = vkey.trim().to_string();
    assert_eq!(
        String::from_utf8(server.get_ok("/log/vkey"))
            .unwrap()
            .trim(),
        vkey
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(data.join("log/log.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(fs::read_to_string(data.join("log/log.key"))
        .unwrap()
        .starts_with("PRIVATE+KEY+"));

    // `imgsrv init` prints the verifier key it made, and makes none the second time
    let fresh = work.path().join("fresh");
    let init = run_ok(Command::new(IMGSRV).args(["init", "--data", s(&fresh)]));
    let made = fs::read_to_string(fresh.join("log/log.vkey")).unwrap();
    assert!(text(&init).contains(made.trim()), "{}", text(&init));
    run_ok(Command::new(IMGSRV).args(["init", "--data", s(&fresh)]));
    assert_eq!(
        fs::read_to_string(fresh.join("log/log.vkey")).unwrap(),
        made
    );

    let (public, secret) = minisign_keypair(work.path().join("k"));
    trust_key(&data, Some("release"), &public);
    let first = make_test_image(work.path().join("a"), &["--serial", "20260101_0000"]);
    let second = make_test_image(work.path().join("b"), &["--serial", "20260102_0000"]);
    publish_image(
        &server,
        &secret,
        &first,
        &["--image", "debian", "--version", "1"],
    );

    // a consumer remembers this checkpoint and the first proof
    let old = save(
        work.path(),
        "old.checkpoint",
        &server.get_ok("/log/checkpoint"),
    );
    let proof1 = save(
        work.path(),
        "1.tlog-proof",
        &server.get_ok("/v1/images/debian/versions/1/manifest.tlog-proof"),
    );
    let seen = verified(&server, &vkey, &[&proof1], None);
    assert_eq!(seen["size"], 2, "{seen}");

    publish_image(
        &server,
        &secret,
        &second,
        &["--image", "debian", "--version", "2"],
    );
    let proof2 = save(
        work.path(),
        "2.tlog-proof",
        &server.get_ok("/v1/images/debian/versions/2/manifest.tlog-proof"),
    );
    let now = verified(&server, &vkey, &[&proof1, &proof2], Some(&old));
    assert_eq!(now["size"], 3, "{now}");
    assert_eq!(now["consistent_from"], 2, "{now}");
    let entries: Vec<&str> = now["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        entries[0].starts_with("imgsrv-log/1\nkind key-add\nkey "),
        "{entries:?}"
    );
    assert!(entries[0].contains("\nname release\n"), "{entries:?}");
    let manifest1 = digest_of(&server.get_ok("/v1/images/debian/versions/1/manifest"));
    assert!(
        entries[1].starts_with("imgsrv-log/1\nkind publish\nimage debian\nversion 1\n")
            && entries[1].contains(&format!("\nmanifest {manifest1}\n")),
        "{entries:?}"
    );
    assert!(entries[2].contains("\nversion 2\n"), "{entries:?}");
    assert_eq!(now["proofs"][0]["index"], 1);
    assert_eq!(now["proofs"][1]["index"], 2);

    // the verifier is not a rubber stamp: an altered proof, another log's key, and a
    // checkpoint of a history the log does not have are each refused
    let proof_text = fs::read_to_string(&proof2).unwrap();
    let lines: Vec<&str> = proof_text.lines().collect();
    let hash_line = lines.iter().position(|l| l.starts_with("index ")).unwrap() + 1;
    let mut altered = lines.clone();
    let flipped = if lines[hash_line].starts_with('A') {
        format!("B{}", &lines[hash_line][1..])
    } else {
        format!("A{}", &lines[hash_line][1..])
    };
    altered[hash_line] = &flipped;
    let bad = save(
        work.path(),
        "bad.tlog-proof",
        format!("{}\n", altered.join("\n")).as_bytes(),
    );
    let out = verify(&server, &vkey, &[&bad], None);
    assert!(
        !out.status.success() && text(&out).contains("does not verify"),
        "{}",
        text(&out)
    );
    let origin = vkey.split('+').next().unwrap();
    let (_, impostor) = imgsrv::tlog::note::Signer::generate(origin).unwrap();
    let out = verify(&server, &impostor.verifier().vkey(), &[], None);
    assert!(
        !out.status.success() && text(&out).contains("no signature of the log key"),
        "{}",
        text(&out)
    );

    // every full or partial tile asked for is there; a tile beyond the log is not
    assert_eq!(server.get("/log/tile/0/000.p/3").0, 200);
    assert_eq!(
        server.get("/log/tile/0/000.p/2").0,
        200,
        "an older width stays"
    );
    assert_eq!(server.get("/log/tile/0/000.p/4").0, 404);
    assert_eq!(server.get("/log/tile/0/000").0, 404, "no full tile yet");
    assert_eq!(
        server.get("/log/tile/0/0000.p/3").0,
        404,
        "one spelling only"
    );
    assert_eq!(server.get("/log/consistency/3/2").0, 400);
}

fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Acceptance: the guards dropped and a published manifest edited in the `sqlite3`
/// shell, its digest fixed up to match (what an intruder with the database would do):
/// `imgsrv log verify` and `imgsrv verify` both fail, and both name the version.
#[test]
fn a_manifest_edited_behind_imgsrvs_back_fails_log_verify_and_verify() {
    let work = temp_dir("tlog-tamper");
    let server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let (public, secret) = minisign_keypair(work.path().join("k"));
    trust_key(&data, Some("release"), &public);
    let img = make_test_image(work.path().join("a"), &["--serial", "20260101_0000"]);
    publish_image(
        &server,
        &secret,
        &img,
        &["--image", "debian", "--version", "1"],
    );
    let clean = run_any(Command::new(IMGSRV).args(["log", "verify", "--data", s(&data)]));
    assert!(clean.status.success(), "{}", text(&clean));
    assert!(
        text(&clean).contains("no problem found"),
        "{}",
        text(&clean)
    );

    let manifest = server.get_ok("/v1/images/debian/versions/1/manifest");
    let mut edited = String::from_utf8(manifest.clone()).unwrap();
    assert!(edited.contains("\"version\":\"1\""), "{edited}");
    edited = edited.replacen("\"version\":\"1\"", "\"version\":\"1\",\"x\":1", 1);
    let db = data.join("catalog.db");
    let triggers = run_ok(Command::new("sqlite3").arg(&db).arg(
        "SELECT group_concat('DROP TRIGGER ' || name, '; ') FROM sqlite_master \
         WHERE type = 'trigger' AND tbl_name = 'publish_records'",
    ));
    let sql = format!(
        "{}; UPDATE publish_records SET manifest = X'{}', manifest_digest = '{}' \
         WHERE version_id = (SELECT v.id FROM image_versions v JOIN images i \
         ON i.id = v.image_id WHERE i.name = 'debian' AND v.version = '1')",
        String::from_utf8(triggers.stdout).unwrap().trim(),
        hex::encode(edited.as_bytes()),
        digest_of(edited.as_bytes())
    );
    run_ok(Command::new("sqlite3").arg(&db).arg(&sql));
    assert_ne!(
        server.get_ok("/v1/images/debian/versions/1/manifest"),
        manifest
    );

    // the log's rows rewritten too (a subtree hash of the signed tree): the key signs
    // no checkpoint over that history, even after a new publish
    assert_eq!(server.get("/log/checkpoint").0, 200);
    run_ok(Command::new("sqlite3").arg(&db).arg(
        "DROP TRIGGER log_hashes_no_update; \
         UPDATE log_hashes SET hash = zeroblob(32) WHERE level = 1 AND idx = 0",
    ));
    let more = make_test_image(work.path().join("b"), &["--serial", "20260102_0000"]);
    publish_image(
        &server,
        &secret,
        &more,
        &["--image", "debian", "--version", "2"],
    );
    let (status, body) = server.get("/log/checkpoint");
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("do not extend its last signed checkpoint"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    let logged = run_any(Command::new(IMGSRV).args(["log", "verify", "--data", s(&data)]));
    assert_eq!(logged.status.code(), Some(1), "{}", text(&logged));
    assert!(
        text(&logged).contains("level 1 index 0"),
        "{}",
        text(&logged)
    );
    assert!(
        text(&logged).contains("debian@1") && text(&logged).contains("altered"),
        "{}",
        text(&logged)
    );
    let verified = run_any(
        Command::new(IMGSRV)
            .args([
                "verify",
                "--server",
                &server.url(),
                "--ca",
                s(&server.cert()),
            ])
            .arg("--trusted-keys")
            .arg(&public)
            .arg("debian@1"),
    );
    assert_eq!(verified.status.code(), Some(1), "{}", text(&verified));
    assert!(text(&verified).contains("debian@1"), "{}", text(&verified));
}

/// `imgsrv verify` as a consumer that trusts the log's key ([transparency_log] in its
/// client config, its state directory beside it), against `server`.
fn consumer_verify(server: &TestServer, config: &Path, public: &Path, target: &str) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args([
                "verify",
                "--server",
                &server.url(),
                "--ca",
                s(&server.cert()),
            ])
            .arg("--config")
            .arg(config)
            .arg("--trusted-keys")
            .arg(public)
            .arg(target),
    )
}

/// Acceptance: a server whose data directory is restored from an older backup (its
/// log key with it) shows an older tree, then publishes something else (a fork). A
/// consumer that verified before refuses both; a publication whose entry the log does
/// not hold is refused by a fresh consumer too.
#[test]
fn a_consumer_refuses_a_rolled_back_or_forked_log() {
    let work = temp_dir("tlog-fork");
    let mut server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let vkey = fs::read_to_string(data.join("log/log.vkey")).unwrap();
    let (public, secret) = minisign_keypair(work.path().join("k"));
    trust_key(&data, Some("release"), &public);
    let img = |n: &str, serial: &str| make_test_image(work.path().join(n), &["--serial", serial]);
    let (one, two, other) = (
        img("1", "20260101_0000"),
        img("2", "20260102_0000"),
        img("x", "20260103_0000"),
    );
    publish_image(
        &server,
        &secret,
        &one,
        &["--image", "debian", "--version", "1"],
    );
    let backup = work.path().join("backup");
    backup_to(&data, &backup);

    let state = work.path().join("state");
    let config = save(
        work.path(),
        "client.toml",
        format!(
            "[transparency_log]\nkeys = [\"{}\"]\nstate_dir = \"{}\"\n",
            vkey.trim(),
            state.display()
        )
        .as_bytes(),
    );
    let first = consumer_verify(&server, &config, &public, "debian@1");
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("logged          entry 1 of "),
        "{}",
        text(&first)
    );
    assert!(
        text(&first).contains("the first you saw of it"),
        "{}",
        text(&first)
    );
    publish_image(
        &server,
        &secret,
        &two,
        &["--image", "debian", "--version", "2"],
    );
    let second = consumer_verify(&server, &config, &public, "debian@2");
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("consistent with the 2 you saw before"),
        "{}",
        text(&second)
    );
    // without the log's key trusted, the log is not checked, and verify says so
    let plain = run_any(
        Command::new(IMGSRV)
            .args([
                "verify",
                "--server",
                &server.url(),
                "--ca",
                s(&server.cert()),
            ])
            .arg("--config")
            .arg(work.path().join("none.toml"))
            .arg("--trusted-keys")
            .arg(&public)
            .arg("debian@2"),
    );
    assert!(
        text(&plain).contains("logged          not checked"),
        "{}",
        text(&plain)
    );
    server.kill();

    // the data directory restored from the older backup: the log is back at 2 entries
    let (_root, server) = serve_restored(&backup, "tlog-restored");
    let rolled = consumer_verify(&server, &config, &public, "debian@1");
    assert_eq!(rolled.status.code(), Some(1), "{}", text(&rolled));
    assert!(text(&rolled).contains("rolled back"), "{}", text(&rolled));

    // and publishes something else as entry 2: a tree of 3 entries other than the one seen
    publish_image(
        &server,
        &secret,
        &other,
        &["--image", "debian", "--version", "2"],
    );
    let forked = consumer_verify(&server, &config, &public, "debian@2");
    assert_eq!(forked.status.code(), Some(1), "{}", text(&forked));
    assert!(
        text(&forked).contains("debian@2") && text(&forked).contains("a fork"),
        "{}",
        text(&forked)
    );
    // what the consumer remembered is the tree of 3 it saw, not what it refused
    let kept: Vec<_> = fs::read_dir(state.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "checkpoint"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        fs::read_to_string(&kept[0]).unwrap().lines().nth(1),
        Some("3")
    );
}

/// Acceptance: a fresh consumer, who has seen nothing of the log before, refuses a
/// fork all the same when it asks for a quorum of witnesses. The log asks a witness
/// (another `imgsrv serve`, `[witness]`) to cosign every checkpoint it serves; the
/// witness cosigns only trees that extend what it saw. The log's data directory is
/// restored from an older backup and publishes something else: the witness refuses
/// that tree, so its checkpoint carries no cosignature, and the consumer who wants one
/// refuses it (one who asks for none still takes it: what witnesses are for).
#[test]
fn a_fresh_consumer_with_a_witness_quorum_refuses_a_fork() {
    let work = temp_dir("tlog-witness");
    let mut server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let vkey = fs::read_to_string(data.join("log/log.vkey"))
        .unwrap()
        .trim()
        .to_string();

    // the witness: its key, the log it witnesses, served
    let wdata = work.path().join("witness");
    let out = imgsrv(&[
        "witness",
        "init",
        "--data",
        s(&wdata),
        "--name",
        "witness.test/w1",
    ]);
    let wkey = last_line(&out);
    assert!(wkey.starts_with("witness.test/w1+"), "{wkey}");
    assert_eq!(
        fs::read_to_string(wdata.join("witness/witness.vkey"))
            .unwrap()
            .trim(),
        wkey
    );
    let witness =
        TestServer::start_configured_in(&wdata, &format!("[witness]\nlogs = [\"{vkey}\"]\n"));

    // the log asks it
    let config = data.join("imgsrv.toml");
    let mut text_cfg = fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&format!(
        "\n[transparency_log]\nwitnesses = [{{ url = \"{}/witness\", vkey = \"{wkey}\", ca = \"{}\" }}]\n",
        witness.url(),
        witness.cert().display()
    ));
    fs::write(&config, text_cfg).unwrap();
    server.kill();
    server.spawn();

    let (public, secret) = minisign_keypair(work.path().join("k"));
    trust_key(&data, Some("release"), &public);
    let img = |n: &str, serial: &str| make_test_image(work.path().join(n), &["--serial", serial]);
    let (one, two, other) = (
        img("1", "20260101_0000"),
        img("2", "20260102_0000"),
        img("x", "20260103_0000"),
    );
    let publish = |server: &TestServer, img: &TestImage, v: &str| {
        publish_image(server, &secret, img, &["--image", "debian", "--version", v])
    };
    publish(&server, &one, "1");
    let backup = work.path().join("backup");
    backup_to(&data, &backup);

    let consumer = |name: &str, witnesses: bool| {
        let extra = if witnesses {
            format!("witnesses = [\"{wkey}\"]\nquorum = 1\n")
        } else {
            String::new()
        };
        save(
            work.path(),
            &format!("{name}.toml"),
            format!(
                "[transparency_log]\nkeys = [\"{vkey}\"]\nstate_dir = \"{}\"\n{extra}",
                work.path().join(name).display()
            )
            .as_bytes(),
        )
    };
    // the checkpoint carries the witness's cosignature (C2SP tlog-cosignature), and a
    // consumer asking for it verifies
    let checkpoint = String::from_utf8(server.get_ok("/log/checkpoint")).unwrap();
    let note = imgsrv::tlog::note::Note::parse(&checkpoint).unwrap();
    let wk = imgsrv::tlog::cosign::WitnessKey::parse(&wkey).unwrap();
    assert!(
        wk.cosigned(&note).unwrap().is_some(),
        "no cosignature in:\n{checkpoint}\n{}",
        server.log_text()
    );
    let first = consumer_verify(&server, &consumer("a", true), &public, "debian@1");
    assert!(first.status.success(), "{}", text(&first));
    publish(&server, &two, "2");
    let second = consumer_verify(&server, &consumer("a", true), &public, "debian@2");
    assert!(second.status.success(), "{}", text(&second));
    server.kill();

    // restored from the older backup, and something else published as entry 3
    let (_root, server) = serve_restored(&backup, "tlog-witness-restored");
    publish(&server, &other, "2");
    let fresh = consumer_verify(&server, &consumer("b", true), &public, "debian@2");
    assert_eq!(fresh.status.code(), Some(1), "{}", text(&fresh));
    assert!(
        text(&fresh).contains("cosigned by 0 of the witnesses you trust")
            && text(&fresh).contains("debian@2"),
        "{}",
        text(&fresh)
    );
    assert!(
        server
            .log_text()
            .contains("did not cosign the checkpoint of 3 entries"),
        "{}",
        server.log_text()
    );
    // without a witness asked for, a fresh consumer has nothing to tell the fork by
    let blind = consumer_verify(&server, &consumer("c", false), &public, "debian@2");
    assert!(blind.status.success(), "{}", text(&blind));
}

/// Issue 11, point 6: `imgsrv log monitor URL` follows a remote log and reports the
/// entries about a publisher's key (its addition, the publications it signed) or about
/// images, reading only what is new at each run; a log restored from an older backup
/// (a rollback), then grown with something else (a fork), is refused.
#[test]
fn a_monitor_reports_a_keys_entries_and_refuses_a_rewritten_log() {
    let work = temp_dir("tlog-monitor");
    let mut server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let vkey_file = data.join("log/log.vkey");
    let (public, secret) = minisign_keypair(work.path().join("k"));
    trust_key(&data, Some("release"), &public);
    let key = minisign_key_id(&public);
    let (other_pub, other_secret) = minisign_keypair(work.path().join("o"));
    trust_key(&data, Some("other"), &other_pub);
    let img = |n: &str, serial: &str| make_test_image(work.path().join(n), &["--serial", serial]);
    publish_image(
        &server,
        &secret,
        &img("1", "20260101_0000"),
        &["--image", "debian", "--version", "1"],
    );
    publish_image(
        &server,
        &other_secret,
        &img("u", "20260101_0000"),
        &["--image", "ubuntu", "--version", "1"],
    );
    let backup = work.path().join("backup");
    backup_to(&data, &backup);
    let state = work.path().join("state");
    let monitor = |server: &TestServer, filter: &[&str]| {
        run_any(
            Command::new(IMGSRV)
                .args(["log", "monitor", &server.url(), "--ca", s(&server.cert())])
                .arg("--vkey")
                .arg(&vkey_file)
                .arg("--state-dir")
                .arg(&state)
                .args(filter),
        )
    };
    let entries = |o: &Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("entry "))
            .map(str::to_string)
            .collect()
    };

    // the first run: the key's addition and the one publication it signed, not the other's
    let first = monitor(&server, &["--key", &key]);
    assert!(first.status.success(), "{}", text(&first));
    let got = entries(&first);
    assert_eq!(got.len(), 2, "{}", text(&first));
    assert!(
        got[0].starts_with("entry 0: ") && got[0].contains("kind key-add") && got[0].contains(&key),
        "{got:?}"
    );
    assert!(
        got[1].contains("kind publish image debian version 1"),
        "{got:?}"
    );
    assert!(
        text(&first).contains("4 entries (the first run)"),
        "{}",
        text(&first)
    );
    // nothing new: nothing reported
    let again = monitor(&server, &["--key", &key]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(entries(&again).is_empty(), "{}", text(&again));
    assert!(
        text(&again).contains("0 new since the 4 seen before"),
        "{}",
        text(&again)
    );
    // a publication signed by the key that its owner did not make shows up; an image
    // filter reports by image
    publish_image(
        &server,
        &secret,
        &img("2", "20260102_0000"),
        &["--image", "debian", "--version", "2"],
    );
    let seen = monitor(&server, &["--key", &key]);
    assert_eq!(entries(&seen).len(), 1, "{}", text(&seen));
    assert!(entries(&seen)[0].starts_with("entry 4: ") && entries(&seen)[0].contains("version 2"));
    publish_image(
        &server,
        &other_secret,
        &img("u2", "20260102_0000"),
        &["--image", "ubuntu", "--version", "2"],
    );
    let by_image = monitor(&server, &["--image", "ubu*"]);
    assert_eq!(entries(&by_image).len(), 1, "{}", text(&by_image));
    assert!(entries(&by_image)[0].contains("image ubuntu version 2"));
    server.kill();

    // restored from the older backup: rolled back; then grown past it: a fork
    let (_root, server) = serve_restored(&backup, "tlog-monitor-restored");
    let rolled = monitor(&server, &[]);
    assert_eq!(rolled.status.code(), Some(1), "{}", text(&rolled));
    assert!(text(&rolled).contains("rolled back"), "{}", text(&rolled));
    for n in 3..6 {
        publish_image(
            &server,
            &secret,
            &img(&format!("f{n}"), &format!("2026010{n}_0000")),
            &["--image", "debian", "--version", &n.to_string()],
        );
    }
    let forked = monitor(&server, &[]);
    assert_eq!(forked.status.code(), Some(1), "{}", text(&forked));
    assert!(text(&forked).contains("a fork"), "{}", text(&forked));
    // a wrong key is refused before anything is remembered
    let stranger = imgsrv::tlog::note::Signer::generate("x.example/imgsrv/1").unwrap();
    let wrong = run_any(
        Command::new(IMGSRV)
            .args(["log", "monitor", &server.url(), "--ca", s(&server.cert())])
            .args(["--vkey", &stranger.1.verifier().vkey()])
            .arg("--state-dir")
            .arg(work.path().join("other-state")),
    );
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("not signed by the key you gave"),
        "{}",
        text(&wrong)
    );
}

/// Issue 11, point 7: the tiles of a larger log. A full tile (256 hashes, 8 KiB) is the
/// leaf hashes of the entries its entry bundle holds, served as immutable, and the same
/// bytes again from memory at the next request; a partial one is served for the
/// log's size.
#[test]
fn full_tiles_are_the_hashes_of_their_entries_and_never_change() {
    use imgsrv::tlog::tiles::parse_entry_bundle;
    use imgsrv::tlog::tree::leaf_hash;
    let server = TestServer::start();
    let cat = imgsrv::admin_cli::open_catalog(server.data_dir()).unwrap();
    let at = cat.log_size().unwrap();
    let entries: Vec<imgsrv::tlog::entry::Entry> = (at..300)
        .map(|i| imgsrv::tlog::entry::Entry::Retire {
            image: "seed".into(),
            version: i.to_string(),
            manifest: imgsrv::digest::Digest::of(&i.to_be_bytes()),
            time: "2026-12-02T00:00:00Z".into(),
        })
        .collect();
    assert!(cat.append_log_at(at, &entries).unwrap());
    // a checkpoint of 300 first: tiles are served for the log's size
    let note = String::from_utf8(server.get_ok("/log/checkpoint")).unwrap();
    assert_eq!(note.lines().nth(1), Some("300"), "{note}");
    let bundle = server.get_ok("/log/tile/entries/000");
    let leaves: Vec<u8> = parse_entry_bundle(&bundle)
        .unwrap()
        .iter()
        .flat_map(|e| leaf_hash(e))
        .collect();
    assert_eq!(leaves.len(), 256 * 32);
    let first = server.get_ok("/log/tile/0/000");
    assert_eq!(first, leaves);
    assert_eq!(
        server.get_ok("/log/tile/0/000"),
        first,
        "the same bytes from memory"
    );
    let (code, headers) = {
        let resp = server
            .agent()
            .get(format!("{}/log/tile/0/000", server.url()))
            .call()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap().to_string()),
        )
    };
    assert_eq!(code, 200);
    assert!(headers.unwrap_or_default().contains("immutable"));
    assert_eq!(server.get_ok("/log/tile/0/001.p/44").len(), 44 * 32);
    let rest = server.get_ok("/log/tile/entries/001.p/44");
    assert_eq!(parse_entry_bundle(&rest).unwrap().len(), 44);
}
