//! Issue 9, item 1: the Incus REST protocol (`incus remote add NAME https://host:PORT`,
//! no `--protocol`): the stock `incus` client with a fresh `INCUS_CONF` and no
//! `SSL_CERT_FILE` answers the certificate question once, then lists, inspects and
//! exports what a real `imgsrv serve` published, byte for byte; a real Incus daemon
//! (trusting no extra CA either) launches a container from it and follows a newer
//! publish with `incus image copy --auto-update` and `incus image refresh`. Retired
//! versions, a revoked key's versions and private images are absent, and their exports
//! answer as the download rule says.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use support::*;

const OLD: &str = "20260101_0000";
const NEW: &str = "20260102_0000";
const IMAGE: &str = "debian-bookworm";

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

/// `GET PATH` with curl (trusting the server's certificate): status and the parsed body.
fn api(server: &TestServer, path: &str) -> (u16, Value) {
    let (status, body) = curl(server, &format!("{}{path}", server.url()), None, &[]);
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "GET {path} ({status}): not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

/// The SHA-256 fingerprint of a PEM certificate as Incus prints it (lowercase hex of
/// the DER), by `openssl x509`.
fn cert_fingerprint(cert: &Path) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(cert),
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split_once('=')
        .unwrap_or_else(|| panic!("openssl printed {line}"))
        .1
        .replace(':', "")
        .to_lowercase()
}

/// `incus remote add NAME URL` answering its certificate question with `answer`.
fn remote_add_answering(incus: &Incus, name: &str, url: &str, answer: &str) -> (bool, String) {
    let mut child = incus
        .command()
        .args(["remote", "add", name, url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run incus");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{answer}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), text(&out))
}

/// A server with `debian-bookworm` OLD (alias `stable`) and NEW, container and VM each.
struct Fixture {
    server: TestServer,
    old: TestImage,
    new: TestImage,
    secret: std::path::PathBuf,
    tmp: tempfile::TempDir,
}

fn fixture(publish_new: bool) -> Fixture {
    let server = TestServer::start();
    let tmp = temp_dir("incus-api");
    let (public, secret) = minisign_keypair(tmp.path().join("keys"));
    trust_key(server.data_dir(), Some("release"), &public);
    let old = make_test_image(tmp.path().join("old"), &["--serial", OLD, "--type", "both"]);
    let new = make_test_image(tmp.path().join("new"), &["--serial", NEW, "--type", "both"]);
    publish_image(&server, &secret, &old, &["--alias", "stable"]);
    if publish_new {
        publish_image(&server, &secret, &new, &[]);
    }
    Fixture {
        server,
        old,
        new,
        secret,
        tmp,
    }
}

#[test]
fn the_certificate_question_is_asked_once_and_pinned() {
    let f = fixture(false);
    let url = f.server.url();
    let fingerprint = cert_fingerprint(&f.server.cert());
    let incus = Incus::system_trust();

    // "n": refused, nothing saved
    let (ok, out) = remote_add_answering(&incus, "imgsrv", &url, "n");
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("Certificate fingerprint: {fingerprint}")),
        "the client shows the server's fingerprint: {out}"
    );
    assert!(out.contains("NACKed"), "{out}");
    assert!(!incus.conf_dir().join("servercerts/imgsrv.crt").exists());

    // the fingerprint typed back: accepted, pinned, saved as a public remote
    let (ok, out) = remote_add_answering(&incus, "imgsrv", &url, &fingerprint);
    assert!(ok, "{out}");
    let pinned = incus.conf_dir().join("servercerts/imgsrv.crt");
    assert_eq!(cert_fingerprint(&pinned), fingerprint);
    let remotes = incus.json(&["remote", "list"]);
    assert_eq!(remotes["imgsrv"]["Protocol"], "incus", "{remotes}");
    assert_eq!(remotes["imgsrv"]["Public"], true, "{remotes}");
    assert_eq!(remotes["imgsrv"]["Addr"], url, "{remotes}");

    // and from then on the client trusts it with no SSL_CERT_FILE
    assert_eq!(
        incus.fingerprints("imgsrv:").len(),
        2,
        "container and VM of {OLD}"
    );

    // the fetch of the certificate itself: a plain GET / without verification gets an
    // HTTP answer (whatever answers `/`)
    let out = run_ok(Command::new("curl").args([
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{url}/"),
    ]));
    let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!((200..600).contains(&code), "GET / answered {code}");
}

#[test]
fn the_client_lists_inspects_and_exports_over_the_incus_protocol() {
    let f = fixture(true);
    let incus = Incus::system_trust();
    incus.remote_add_incus("imgsrv", &f.server.url());

    let list = incus.json(&["image", "list", "imgsrv:"]);
    let fps: BTreeSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = [
        f.old.container_fingerprint(),
        f.old.vm_fingerprint(),
        f.new.container_fingerprint(),
        f.new.vm_fingerprint(),
    ]
    .into_iter()
    .collect();
    assert_eq!(fps, want);
    for i in list.as_array().unwrap() {
        let fp = i["fingerprint"].as_str().unwrap();
        let vm = fp == f.old.vm_fingerprint() || fp == f.new.vm_fingerprint();
        assert_eq!(i["type"], if vm { "virtual-machine" } else { "container" });
        assert_eq!(i["architecture"], "x86_64");
        assert_eq!(i["public"], true);
        assert_eq!(i["properties"]["os"], "Debian");
        assert_eq!(i["properties"]["release"], "bookworm");
    }

    // one alias, one image: the newest build, the pinned alias, VMs under /vm, by
    // architecture, by version; a short fingerprint
    let info = |name: &str| incus.info_fingerprint(&[&format!("imgsrv:{name}")]);
    assert_eq!(info(IMAGE), f.new.container_fingerprint());
    assert_eq!(info(&format!("{IMAGE}/vm")), f.new.vm_fingerprint());
    assert_eq!(
        info(&format!("{IMAGE}/stable")),
        f.old.container_fingerprint()
    );
    assert_eq!(info(&format!("{IMAGE}/stable/vm")), f.old.vm_fingerprint());
    assert_eq!(
        info(&format!("{IMAGE}/{OLD}")),
        f.old.container_fingerprint()
    );
    assert_eq!(info("debian/bookworm"), f.new.container_fingerprint());
    assert_eq!(
        info("debian/bookworm/x86_64"),
        f.new.container_fingerprint()
    );
    assert_eq!(info("debian/bookworm/x86_64/vm"), f.new.vm_fingerprint());
    assert_eq!(info("debian/bookworm/default/vm"), f.new.vm_fingerprint());
    assert_eq!(
        info(&f.old.vm_fingerprint()[..12]),
        f.old.vm_fingerprint(),
        "a fingerprint prefix"
    );

    // the alias list agrees with the images
    let aliases = incus.json(&["image", "alias", "list", "imgsrv:"]);
    let find = |name: &str| {
        aliases
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no alias {name}: {aliases}"))
            .clone()
    };
    assert_eq!(
        find("debian/bookworm")["target"],
        f.new.container_fingerprint()
    );
    assert_eq!(find("debian/bookworm")["type"], "container");
    assert_eq!(find("debian/bookworm/vm")["type"], "virtual-machine");
    let names: BTreeSet<&str> = aliases
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        aliases.as_array().unwrap().len(),
        "unique names"
    );

    // exports are the published bytes, container and VM
    let tmp = temp_dir("incus-api-export");
    let ct = tmp.path().join("ct");
    let vm = tmp.path().join("vm");
    std::fs::create_dir_all(&ct).unwrap();
    std::fs::create_dir_all(&vm).unwrap();
    incus.run(&[
        "image",
        "export",
        "-q",
        &format!("imgsrv:{IMAGE}/stable"),
        ct.to_str().unwrap(),
    ]);
    let fp = f.old.container_fingerprint();
    assert_eq!(
        read(ct.join(format!("meta-{fp}.tar.xz"))),
        read(&f.old.metadata)
    );
    assert_eq!(
        read(ct.join(format!("{fp}.squashfs"))),
        read(f.old.rootfs())
    );
    incus.run(&[
        "image",
        "export",
        "-q",
        &format!("imgsrv:{IMAGE}/vm"),
        vm.to_str().unwrap(),
    ]);
    let fp = f.new.vm_fingerprint();
    assert_eq!(
        read(vm.join(format!("meta-{fp}.tar.xz"))),
        read(&f.new.metadata)
    );
    assert_eq!(read(vm.join(format!("{fp}.qcow2"))), read(f.new.disk()));

    // all of it over TLS, through the Incus routes
    let log = f.server.log_text();
    assert!(
        log.lines().any(|l| l.contains("imgsrv::access")
            && l.contains("/1.0/images/")
            && l.contains("/export")
            && l.contains(" 200 ")),
        "no export in the access log:\n{log}"
    );
}

#[test]
fn the_api_speaks_the_incus_envelope_on_raw_paths() {
    let f = fixture(true);
    let s = &f.server;

    let (status, v) = api(s, "/1.0");
    assert_eq!(status, 200);
    assert_eq!(v["type"], "sync");
    assert_eq!(v["status_code"], 200);
    assert_eq!(v["metadata"]["public"], true);
    assert_eq!(v["metadata"]["auth"], "untrusted");
    assert_eq!(v["metadata"]["api_version"], "1.0");
    assert!(v["metadata"]["api_extensions"].is_array());

    // the names as the client escapes them, and as typed; with the parameters it adds
    let target = f.new.container_fingerprint();
    for path in [
        "/1.0/images/aliases/debian%2Fbookworm",
        "/1.0/images/aliases/debian/bookworm",
        "/1.0/images/aliases/debian%2Fbookworm?project=default&target=node1",
    ] {
        let (status, v) = api(s, path);
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["metadata"]["target"], target, "{path}");
        assert_eq!(v["metadata"]["type"], "container", "{path}");
    }
    let (status, v) = api(s, "/1.0/images/aliases");
    assert_eq!(status, 200);
    assert!(
        v["metadata"]
            .as_array()
            .unwrap()
            .contains(&Value::from("/1.0/images/aliases/debian%2Fbookworm")),
        "{v}"
    );
    let (_, v) = api(s, "/1.0/images");
    assert_eq!(v["metadata"].as_array().unwrap().len(), 4);
    assert!(v["metadata"]
        .as_array()
        .unwrap()
        .contains(&Value::from(format!("/1.0/images/{target}"))));
    let (_, v) = api(s, "/1.0/images?recursion=1&project=default");
    assert_eq!(v["metadata"].as_array().unwrap().len(), 4);
    assert!(v["metadata"][0]["fingerprint"].is_string());

    // errors are Incus errors
    for (path, code) in [
        ("/1.0/images/aliases/debian%2Fnothing", 404),
        ("/1.0/images/0000000000000000", 404),
        ("/1.0/images/not-hex", 404),
        ("/1.0/instances", 404),
    ] {
        let (status, v) = api(s, path);
        assert_eq!(status, code, "{path}: {v}");
        assert_eq!(v["type"], "error", "{path}");
        assert_eq!(v["error_code"], code, "{path}");
        assert!(!v["error"].as_str().unwrap().is_empty(), "{path}");
    }
    let (status, body) = curl(
        s,
        &format!("{}/1.0/images", s.url()),
        None,
        &["-X", "DELETE"],
    );
    assert_eq!(status, 405);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "error");

    // the export: multipart, the metadata part then the root, with Content-Length
    let dir = temp_dir("incus-api-raw");
    let headers = dir.path().join("headers");
    let (status, body) = curl(
        s,
        &format!("{}/1.0/images/{target}/export", s.url()),
        None,
        &["-D", headers.to_str().unwrap()],
    );
    assert_eq!(status, 200);
    let h = std::fs::read_to_string(&headers).unwrap().to_lowercase();
    assert!(
        h.contains(&format!(
            "content-type: multipart/form-data; boundary=imgsrv-{target}"
        )),
        "{h}"
    );
    assert!(
        h.contains(&format!("content-length: {}", body.len())),
        "{h}"
    );
    let meta = read(&f.new.metadata);
    let root = read(f.new.rootfs());
    let want = [
        format!(
            "--imgsrv-{target}\r\nContent-Disposition: form-data; name=\"metadata\"; \
             filename=\"meta-{target}.tar.xz\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes(),
        meta,
        format!(
            "\r\n--imgsrv-{target}\r\nContent-Disposition: form-data; name=\"rootfs\"; \
             filename=\"{target}.squashfs\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes(),
        root,
        format!("\r\n--imgsrv-{target}--\r\n").into_bytes(),
    ]
    .concat();
    assert!(body == want, "the multipart body differs");

    // the VM's root part is `rootfs.img`
    let vm = f.new.vm_fingerprint();
    let (status, body) = curl(s, &format!("{}/1.0/images/{vm}/export", s.url()), None, &[]);
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&format!("name=\"rootfs.img\"; filename=\"{vm}.qcow2\"")),
        "VM part"
    );

    // over plain HTTP on the same port: refused
    let out = run_any(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{}/1.0", s.port()),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "400");
}

#[test]
fn retired_revoked_and_private_images_are_absent() {
    let f = fixture(true);
    let s = &f.server;
    let d = s.data_dir().to_str().unwrap().to_string();
    // another image signed by a second key, which is then revoked
    let (other_pub, other_secret) = minisign_keypair(f.tmp.path().join("other-keys"));
    trust_key(&d, Some("other"), &other_pub);
    let alpine = make_test_image(
        f.tmp.path().join("alpine"),
        &["--os", "Alpine", "--release", "edge", "--serial", OLD],
    );
    publish_image(s, &other_secret, &alpine, &[]);
    // and a private one
    let private = make_test_image(
        f.tmp.path().join("private"),
        &["--os", "Secret", "--release", "one", "--serial", OLD],
    );
    publish_image(s, &f.secret, &private, &["--private"]);

    let listed =
        |incus: &Incus| -> BTreeSet<String> { incus.fingerprints("imgsrv:").into_iter().collect() };
    let before = Incus::system_trust();
    before.remote_add_incus("imgsrv", &s.url());
    let seen = listed(&before);
    assert!(seen.contains(&alpine.container_fingerprint()), "{seen:?}");
    assert!(
        !seen.contains(&private.container_fingerprint()),
        "a private image is absent anonymously"
    );
    assert_eq!(seen.len(), 5);
    let status = |fp: &str| api(s, &format!("/1.0/images/{fp}/export")).0;
    let export_status =
        |fp: &str| curl(s, &format!("{}/1.0/images/{fp}/export", s.url()), None, &[]).0;
    assert_eq!(export_status(&private.container_fingerprint()), 404);
    assert_eq!(status(&private.container_fingerprint()[..16]), 404);

    // retire NEW, revoke the other key
    run_ok(
        Command::new(IMGSRV)
            .args(["version", "retire", IMAGE, NEW, "--reason", "broken"])
            .args(["--server", &s.url(), "--ca"])
            .arg(s.cert())
            .arg("--token-file")
            .arg(s.admin_token_file()),
    );
    imgsrv(&["key", "revoke", "--data", &d, "other"]);

    let after = Incus::system_trust();
    after.remote_add_incus("imgsrv", &s.url());
    let seen = listed(&after);
    let want: BTreeSet<String> = [f.old.container_fingerprint(), f.old.vm_fingerprint()]
        .into_iter()
        .collect();
    assert_eq!(seen, want, "only OLD is left");
    // the aliases moved back to the newest build still served
    assert_eq!(
        after.info_fingerprint(&[&format!("imgsrv:{IMAGE}")]),
        f.old.container_fingerprint()
    );
    assert_eq!(
        after.info_fingerprint(&["imgsrv:debian/bookworm/vm"]),
        f.old.vm_fingerprint()
    );
    assert!(!after
        .try_run(&["image", "info", "imgsrv:alpine/edge"])
        .status
        .success());
    let (code, v) = api(
        s,
        &format!("/1.0/images/{}", alpine.container_fingerprint()),
    );
    assert_eq!((code, v["type"].as_str()), (404, Some("error")));

    // exports: the revoked key's version is gone (410, saying why); the retired one
    // still downloads during the grace, like its Simple Streams files
    let (code, v) = api(
        s,
        &format!("/1.0/images/{}/export", alpine.container_fingerprint()),
    );
    assert_eq!(code, 410, "{v}");
    assert!(v["error"].as_str().unwrap().contains("revoked"), "{v}");
    assert_eq!(export_status(&f.new.container_fingerprint()), 200);
    // once collected, 410 too
    imgsrv(&["gc", "--data", &d, "--grace", "0"]);
    let (code, v) = api(
        s,
        &format!("/1.0/images/{}/export", f.new.container_fingerprint()),
    );
    assert_eq!(code, 410, "{v}");
    assert!(v["error"].as_str().unwrap().contains("retired"), "{v}");
    assert_eq!(export_status(&private.container_fingerprint()), 404);
}

#[test]
fn a_daemon_copies_auto_updates_and_launches_over_the_incus_protocol() {
    let f = fixture(false);
    let _daemon = IncusDaemon::up_system_trust();
    let incus = Incus::system_trust();
    incus.remote_add_incus("imgsrv", &f.server.url());
    let exports = |fp: &str| {
        f.server
            .log_text()
            .lines()
            .filter(|l| {
                l.contains("imgsrv::access")
                    && l.contains(&format!("/1.0/images/{fp}/export"))
                    && l.contains(" 200 ")
            })
            .count()
    };

    // a copy that follows the alias (the daemon pulls it, trusting the certificate the
    // client pinned and handed it)
    incus.run(&[
        "image",
        "copy",
        "imgsrv:debian/bookworm",
        "local:",
        "--auto-update",
        "--alias",
        "mine",
    ]);
    let image = |alias: &str| -> Value {
        let list = incus.json(&["image", "list", "local:"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|i| {
                i["aliases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a["name"] == alias)
            })
            .unwrap_or_else(|| panic!("no local image aliased {alias}: {list}"))
            .clone()
    };
    let copied = image("mine");
    assert_eq!(copied["fingerprint"], f.old.container_fingerprint());
    assert_eq!(copied["auto_update"], true, "{copied}");
    assert_eq!(
        copied["update_source"]["alias"], "debian/bookworm",
        "{copied}"
    );
    assert_eq!(copied["update_source"]["protocol"], "incus", "{copied}");
    assert_eq!(exports(&f.old.container_fingerprint()), 1);

    // nothing newer yet
    let out = incus.stdout(&["image", "refresh", "mine"]);
    assert!(out.contains("already up to date"), "{out}");

    // a newer build is published: the refresh takes it, the alias follows
    publish_image(&f.server, &f.secret, &f.new, &[]);
    let out = incus.stdout(&["image", "refresh", "mine"]);
    assert!(out.contains("refreshed successfully"), "{out}");
    let refreshed = image("mine");
    assert_eq!(refreshed["fingerprint"], f.new.container_fingerprint());
    assert_eq!(refreshed["auto_update"], true);
    assert_eq!(exports(&f.new.container_fingerprint()), 1);

    // launched through the daemon by alias, from imgsrv
    incus.run(&["launch", &format!("imgsrv:{IMAGE}/stable"), "c1"]);
    incus.run(&["launch", "mine", "c2"]);
    for (name, marker) in [("c1", OLD), ("c2", NEW)] {
        assert_eq!(
            incus
                .stdout(&["exec", name, "--", "cat", "/etc/imgsrv-test-marker"])
                .trim(),
            marker,
            "{name}"
        );
    }
}

#[test]
fn the_short_alias_follows_the_clients_architecture() {
    let f = fixture(false);
    let s = &f.server;
    // a newer build, for arm64 only
    let arm = make_test_image(
        f.tmp.path().join("arm"),
        &["--serial", NEW, "--arch", "aarch64"],
    );
    publish_image(s, &f.secret, &arm, &[]);

    // this (x86_64) client: its own architecture, though the arm64 build is newer
    let incus = Incus::system_trust();
    incus.remote_add_incus("imgsrv", &s.url());
    assert_eq!(
        incus.info_fingerprint(&["imgsrv:debian/bookworm"]),
        f.old.container_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&["imgsrv:debian/bookworm/aarch64"]),
        arm.container_fingerprint()
    );
    let list = incus.json(&["image", "list", "imgsrv:"]);
    let arches: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(arches, ["aarch64", "x86_64"].into_iter().collect());

    // an arm64 client (its User-Agent says so) gets the arm64 build; one that does not
    // say gets x86_64
    let alias = |agent: &[&str]| -> String {
        let (status, body) = curl(
            s,
            &format!("{}/1.0/images/aliases/debian%2Fbookworm", s.url()),
            None,
            agent,
        );
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["metadata"]["target"].as_str().unwrap().to_string()
    };
    assert_eq!(
        alias(&["-A", "Incus 6.0.4 (Linux; aarch64; 6.1.0; Debian; 12)"]),
        arm.container_fingerprint()
    );
    assert_eq!(alias(&[]), f.old.container_fingerprint());
}
