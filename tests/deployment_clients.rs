//! Issue 10, point 6: the user-facing clients against the full deployment. Two
//! `imgsrv serve` instances, A and B (the real binary built with `--features full`), on
//! one PostgreSQL database (tests/fixtures/pg-harness) and one Garage bucket
//! (tests/fixtures/garage-harness); what goes in through one comes out of the other:
//!
//! 1. `imgsrv publish` into A; the stock `incus` client lists, inspects and exports
//!    through B over Simple Streams and over the Incus REST protocol, byte for byte; a
//!    real Incus daemon (tests/fixtures/incusd-harness) copies from B with
//!    `--auto-update`, takes a newer build published through A at `incus image refresh`,
//!    and launches containers from B (no VMs: no KVM here);
//! 2. `imgsrv mirror` from an embedded imgsrv upstream into A (the upstream's own
//!    signatures kept, through A's API) and from its Simple Streams into A's data
//!    directory (re-signed); B serves the same fingerprints;
//! 3. a bundle exported from B imports into a fresh embedded appliance, and a bundle
//!    from an embedded site imported into A is served by B (and exported again through
//!    B's API), same fingerprints;
//! 4. the identity matrix across the two: a scoped writer publishes through B inside
//!    its scope and not outside; a reader of private images sees them on both, an
//!    anonymous caller on neither; a grant removed and tokens revoked on A are refused
//!    by B at its next request; visibility and retirement set through B, served by A.
//!
//! One deployment, the steps in order in one test (each builds on what the earlier
//! ones published).
#![cfg(all(feature = "postgres", feature = "s3"))]

#[path = "support/deployment.rs"]
mod deployment;
#[path = "support/garage.rs"]
mod garage;
#[path = "support/pg.rs"]
mod pg;
mod support;

use deployment::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;
use support::*;

const IMAGE: &str = "debian-bookworm";
const OLD: &str = "20260101_0000";
const NEW: &str = "20260102_0000";

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

fn set<I: IntoIterator<Item = String>>(v: I) -> BTreeSet<String> {
    v.into_iter().collect()
}

/// A fresh directory under the test's work dir.
fn dir(d: &Deployment, name: &str) -> PathBuf {
    let p = d.work.path().join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

/// The access-log lines of `server` that answered requests for `path_part` with 200.
fn served(server: &TestServer, path_part: &str) -> usize {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("imgsrv::access") && l.contains(path_part) && l.contains(" 200 "))
        .count()
}

/// [`served`], once it is at least `n` or after 10 s (a request's access line is
/// written just after its answer, so it may lag behind the client by a moment).
fn served_at_least(server: &TestServer, path_part: &str, n: usize) -> usize {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = served(server, path_part);
        if got >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every fingerprint (containers and VMs) of `server`'s Simple Streams index as seen
/// with `token` (anonymous with `None`).
fn all_stream_fingerprints(server: &TestServer, token: Option<&str>) -> BTreeSet<String> {
    let (status, body) = curl(
        server,
        &format!("{}/streams/v1/images.json", server.url()),
        token,
        &[],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let ij = json_of(&body);
    let mut out = BTreeSet::new();
    for p in ij["products"].as_object().unwrap().values() {
        for v in p["versions"].as_object().unwrap().values() {
            for it in v["items"].as_object().unwrap().values() {
                for (k, fp) in it.as_object().unwrap() {
                    if k.starts_with("combined_") && k.ends_with("sha256") {
                        out.insert(fp.as_str().unwrap().to_string());
                    }
                }
            }
        }
    }
    out
}

/// The image names `GET /v1/images` lists with `token` (anonymous with `None`).
fn listed_images(server: &TestServer, token: Option<&str>) -> BTreeSet<String> {
    let (status, body) = curl(server, &format!("{}/v1/images", server.url()), token, &[]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    json_of(&body)["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

/// The fingerprints the real `incus` client lists on a fresh Simple Streams remote.
fn incus_fingerprints(server: &TestServer) -> BTreeSet<String> {
    let incus = Incus::new(server.cert());
    incus.remote_add("r", &server.url());
    set(incus.fingerprints("r:"))
}

/// `imgsrv ARGS...` whatever its exit status, with no server, CA or token from the
/// environment.
fn imgsrv_any(args: &[&str]) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args(args)
            .env_remove("IMGSRV_SERVER")
            .env_remove("IMGSRV_CA")
            .env_remove("IMGSRV_TOKEN")
            .env_remove("IMGSRV_DATA")
            .env_remove("IMGSRV_UPSTREAM_TOKEN"),
    )
}

/// `--server URL --ca CERT --token-file FILE` for `server` with `token_file`.
fn server_args(server: &TestServer, token_file: &Path) -> Vec<String> {
    vec![
        "--server".into(),
        server.url(),
        "--ca".into(),
        s(&server.cert()).into(),
        "--token-file".into(),
        s(token_file).into(),
    ]
}

/// `imgsrv principal add` + `grant add` + `token issue` on `data`: the token's id and
/// the file holding it.
fn principal_with_token(data: &Path, name: &str, grants: &[(&str, &str)]) -> (String, PathBuf) {
    let d = s(data);
    imgsrv(&["principal", "add", "--data", d, "--kind", "service", name]);
    for (role, scope) in grants {
        imgsrv(&["grant", "add", "--data", d, name, role, scope]);
    }
    let issued = imgsrv(&["token", "issue", "--data", d, name]);
    let first = String::from_utf8_lossy(&issued.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let id = first
        .strip_prefix("token ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token id in: {}", text(&issued)))
        .to_string();
    let file = data.parent().unwrap().join(format!("{name}.token"));
    fs::write(&file, format!("{}\n", last_line(&issued))).unwrap();
    (id, file)
}

/// What the shared steps need.
struct World {
    d: Deployment,
    public: PathBuf,
    secret: PathBuf,
    /// debian-bookworm OLD, container and VM, published through A (alias `stable`).
    deb: TestImage,
    /// debian-bookworm NEW, a container, published through A in step 1b.
    deb_new: TestImage,
}

#[test]
fn the_user_facing_clients_work_across_two_instances_on_postgres_and_garage() {
    let t0 = Instant::now();
    let d = deployment("clients");
    // the admin token works on both (one catalog); the CLIs read it from a file
    fs::copy(d.a.admin_token_file(), d.b.admin_token_file()).unwrap();
    let (public, secret) = minisign_keypair(dir(&d, "release"));
    trust_key(d.a.data_dir(), Some("release"), &public);
    let deb = make_test_image(dir(&d, "deb"), &["--serial", OLD, "--type", "both"]);
    let deb_new = make_test_image(dir(&d, "deb-new"), &["--serial", NEW]);
    let w = World {
        d,
        public,
        secret,
        deb,
        deb_new,
    };
    let step = |name: &str| eprintln!("[{:>5.1}s] {name}", t0.elapsed().as_secs_f64());

    step("1. publish on A, incus through B");
    publish_on_a_read_through_b(&w);
    step("1b. incus launch from B");
    launch_from_b(&w);
    step("2. mirror into the deployment");
    mirror_into_the_deployment(&w);
    step("3. bundles out of B and into A");
    let noble_fp = bundles(&w);
    step("4. the identity matrix across A and B");
    identity_matrix(&w, &noble_fp);
    step("done");
}

/// Step 1: Published through A, read by the stock `incus` client through B.
fn publish_on_a_read_through_b(w: &World) {
    let (a, b, deb) = (&w.d.a, &w.d.b, &w.deb);
    let (ct, vm) = (deb.container_fingerprint(), deb.vm_fingerprint());
    let out = publish_image(a, &w.secret, deb, &["--alias", "stable"]);
    assert!(out.contains(&ct) && out.contains(&vm), "{out}");

    // Simple Streams
    let incus = Incus::new(b.cert());
    incus.remote_add("ss", &b.url());
    let list = incus.json(&["image", "list", "ss:"]);
    let fps = set(list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap().to_string()));
    assert_eq!(fps, set([ct.clone(), vm.clone()]), "{list}");
    for i in list.as_array().unwrap() {
        let kind = if i["fingerprint"] == vm.as_str() {
            "virtual-machine"
        } else {
            "container"
        };
        assert_eq!(i["type"], kind, "{i}");
        assert_eq!(i["architecture"], "x86_64", "{i}");
    }
    assert_eq!(incus.info_fingerprint(&[&format!("ss:{IMAGE}")]), ct);
    assert_eq!(incus.info_fingerprint(&[&format!("ss:{IMAGE}/stable")]), ct);
    assert_eq!(
        incus.info_fingerprint(&[&format!("ss:{IMAGE}"), "--vm"]),
        vm
    );
    assert_eq!(incus.info_fingerprint(&["ss:debian/bookworm"]), ct);
    let ex = dir(&w.d, "export-ss-ct");
    incus.run(&["image", "export", &format!("ss:{IMAGE}/stable"), s(&ex)]);
    assert_eq!(single_file(&ex, ".incus.tar.xz"), read(&deb.metadata));
    assert_eq!(single_file(&ex, ".squashfs"), read(deb.rootfs()));
    let ex = dir(&w.d, "export-ss-vm");
    incus.run(&["image", "export", &format!("ss:{IMAGE}"), s(&ex), "--vm"]);
    assert_eq!(single_file(&ex, ".incus.tar.xz"), read(&deb.metadata));
    assert_eq!(single_file(&ex, ".qcow2"), read(deb.disk()));
    // B served the downloads, A none
    assert!(served_at_least(b, "/download/", 4) >= 4, "{}", b.log_text());
    assert_eq!(served(a, "/download/"), 0, "{}", a.log_text());

    // the Incus REST protocol (the certificate accepted and pinned, no SSL_CERT_FILE)
    let api = Incus::system_trust();
    api.remote_add_incus("api", &b.url());
    let list = api.json(&["image", "list", "api:"]);
    let fps = set(list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap().to_string()));
    assert_eq!(fps, set([ct.clone(), vm.clone()]), "{list}");
    for i in list.as_array().unwrap() {
        assert_eq!(i["public"], true, "{i}");
        assert_eq!(i["properties"]["os"], "Debian", "{i}");
        assert_eq!(i["properties"]["release"], "bookworm", "{i}");
    }
    assert_eq!(api.info_fingerprint(&[&format!("api:{IMAGE}")]), ct);
    assert_eq!(api.info_fingerprint(&[&format!("api:{IMAGE}/vm")]), vm);
    assert_eq!(api.info_fingerprint(&[&format!("api:{IMAGE}/stable")]), ct);
    assert_eq!(api.info_fingerprint(&[&format!("api:{}", &vm[..12])]), vm);
    let ex = dir(&w.d, "export-api");
    api.run(&["image", "export", "-q", &format!("api:{IMAGE}"), s(&ex)]);
    assert_eq!(
        read(ex.join(format!("meta-{ct}.tar.xz"))),
        read(&deb.metadata)
    );
    assert_eq!(read(ex.join(format!("{ct}.squashfs"))), read(deb.rootfs()));
    api.run(&["image", "export", "-q", &format!("api:{IMAGE}/vm"), s(&ex)]);
    assert_eq!(
        read(ex.join(format!("meta-{vm}.tar.xz"))),
        read(&deb.metadata)
    );
    assert_eq!(read(ex.join(format!("{vm}.qcow2"))), read(deb.disk()));
    for fp in [&ct, &vm] {
        assert_eq!(
            served_at_least(b, &format!("/1.0/images/{fp}/export"), 1),
            1,
            "{fp}"
        );
    }
    assert_eq!(served(a, "/1.0/images/"), 0, "{}", a.log_text());
}

/// Step 1b: A real Incus daemon copies the container published through A from B over
/// the Incus protocol with `--auto-update` (as tests/incus_api.rs does); a newer build
/// published through A is what `incus image refresh` then takes from B; the daemon
/// launches both, the older one from B's Simple Streams (as tests/incus.rs does it, the
/// daemon trusting B's certificate).
fn launch_from_b(w: &World) {
    let (a, b) = (&w.d.a, &w.d.b);
    let (old_ct, new_ct) = (
        w.deb.container_fingerprint(),
        w.deb_new.container_fingerprint(),
    );
    let _daemon = IncusDaemon::up(b.cert());
    let incus = Incus::new(b.cert());
    incus.remote_add("r", &b.url());
    incus.remote_add_incus("api", &b.url());
    let exports = |fp: &str| served(b, &format!("/1.0/images/{fp}/export"));

    // a copy following the alias, over the Incus protocol
    let before = exports(&old_ct);
    incus.run(&[
        "image",
        "copy",
        "api:debian/bookworm",
        "local:",
        "--auto-update",
        "--alias",
        "mine",
    ]);
    let local = |alias: &str| -> Value {
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
    let copied = local("mine");
    assert_eq!(copied["fingerprint"], old_ct.as_str(), "{copied}");
    assert_eq!(copied["update_source"]["protocol"], "incus", "{copied}");
    assert_eq!(
        copied["update_source"]["server"],
        b.url().as_str(),
        "{copied}"
    );
    assert_eq!(
        served_at_least(b, &format!("/1.0/images/{old_ct}/export"), before + 1),
        before + 1,
        "the daemon did not take it from B"
    );
    let out = incus.stdout(&["image", "refresh", "mine"]);
    assert!(out.contains("already up to date"), "{out}");

    // a newer build through A: B's alias follows at once, the refresh takes it
    let out = publish_image(a, &w.secret, &w.deb_new, &[]);
    assert!(out.contains(&new_ct), "{out}");
    let out = incus.stdout(&["image", "refresh", "mine"]);
    assert!(out.contains("refreshed successfully"), "{out}");
    assert_eq!(local("mine")["fingerprint"], new_ct.as_str());
    assert_eq!(
        served_at_least(b, &format!("/1.0/images/{new_ct}/export"), 1),
        1
    );
    assert_eq!(exports(&new_ct), 1);

    // launched: the older one from B's Simple Streams (no longer local), the newer by
    // the local alias
    let downloads = served(b, "/download/");
    incus.run(&["launch", &format!("r:{IMAGE}/stable"), "c1"]);
    incus.run(&["launch", "mine", "c2"]);
    let list = incus.json(&["list"]);
    for (name, marker) in [("c1", OLD), ("c2", NEW)] {
        let c = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {list}"));
        assert_eq!(c["status"], "Running", "{c}");
        assert_eq!(
            incus
                .stdout(&["exec", name, "--", "cat", "/etc/imgsrv-test-marker"])
                .trim(),
            marker,
            "{name}"
        );
    }
    assert!(
        served_at_least(b, "/download/", downloads + 1) > downloads,
        "the daemon did not download from B's Simple Streams"
    );
    assert!(set(incus.fingerprints("local:")).contains(&old_ct));
    assert_eq!(served(a, "/1.0/images/"), 0, "{}", a.log_text());
}

/// Step 2: `imgsrv mirror` from an embedded imgsrv upstream into the deployment: natively
/// through A's API (the publisher's manifests and signatures kept) and from its Simple
/// Streams into A's data directory (re-signed by the mirror key); B serves them.
fn mirror_into_the_deployment(w: &World) {
    let (a, b) = (&w.d.a, &w.d.b);
    let up = TestServer::start();
    let (up_pub, up_sk) = minisign_keypair(dir(&w.d, "upstream-publisher"));
    trust_key(up.data_dir(), Some("origin"), &up_pub);
    let alpine = |serial: &str, kind: &str| {
        make_test_image(
            dir(&w.d, &format!("alp-{serial}")),
            &[
                "--os",
                "Alpine",
                "--release",
                "3.19",
                "--serial",
                serial,
                "--type",
                kind,
            ],
        )
    };
    let alp1 = alpine(OLD, "container");
    let alp2 = alpine(NEW, "both");
    let fed = make_test_image(
        dir(&w.d, "fedora"),
        &["--os", "Fedora", "--release", "40", "--serial", OLD],
    );
    publish_image(&up, &up_sk, &alp1, &[]);
    publish_image(&up, &up_sk, &alp2, &["--alias", "edge"]);
    publish_image(&up, &up_sk, &fed, &[]);
    let alpine_fps = set([
        alp1.container_fingerprint(),
        alp2.container_fingerprint(),
        alp2.vm_fingerprint(),
    ]);
    let (mirror_pub, mirror_sk) = minisign_keypair(dir(&w.d, "mirror-key"));

    // natively, into A's API: the deployment trusts the upstream's publisher
    trust_key(a.data_dir(), Some("origin"), &up_pub);
    let native = || {
        let mut args = vec!["mirror".to_string()];
        args.extend(server_args(a, &a.admin_token_file()));
        args.extend(
            [
                "--key",
                s(&mirror_sk),
                "--upstream-ca",
                s(&up.cert()),
                "--image",
                "alpine-*",
                &up.url(),
            ]
            .map(String::from),
        );
        imgsrv_any(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = native();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is an imgsrv server"), "{}", text(&out));
    assert!(
        text(&out).contains("mirrored 2 version(s)"),
        "{}",
        text(&out)
    );
    // B serves them, the manifests and signatures the upstream's bytes
    let on_b = all_stream_fingerprints(b, None);
    assert!(on_b.is_superset(&alpine_fps), "{on_b:?}");
    for v in [OLD, NEW] {
        let p = format!("/v1/images/alpine-3.19/versions/{v}");
        for suffix in ["/manifest", "/manifest.minisig"] {
            assert!(
                b.get_ok(&format!("{p}{suffix}")) == up.get_ok(&format!("{p}{suffix}")),
                "{p}{suffix} differs on B"
            );
        }
    }
    // a second run copies nothing
    let again = native();
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("mirrored 0 version(s)")
            && text(&again).contains("2 already published"),
        "{}",
        text(&again)
    );

    // its Simple Streams, into A's data directory (written through the PostgreSQL
    // catalog and the bucket that directory's imgsrv.toml names)
    trust_key(a.data_dir(), Some("mirror"), &mirror_pub);
    let out = imgsrv_any(&[
        "mirror",
        "--data",
        s(a.data_dir()),
        "--key",
        s(&mirror_sk),
        "--upstream-ca",
        s(&up.cert()),
        "--simplestreams",
        "--image",
        "fedora-*",
        &up.url(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("summary: 1 version mirrored, 0 already present"),
        "{}",
        text(&out)
    );

    // the stock client through B: the upstream's fingerprints, its bytes
    let incus = Incus::new(b.cert());
    incus.remote_add("r", &b.url());
    let mut want = alpine_fps.clone();
    want.extend([
        fed.container_fingerprint(),
        w.deb.container_fingerprint(),
        w.deb.vm_fingerprint(),
        w.deb_new.container_fingerprint(),
    ]);
    assert_eq!(set(incus.fingerprints("r:")), want);
    let upstream_fps = incus_fingerprints(&up);
    assert!(want.is_superset(&upstream_fps), "{upstream_fps:?}");
    assert_eq!(
        incus.info_fingerprint(&["r:alpine-3.19/edge"]),
        alp2.container_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&["r:fedora/40"]),
        fed.container_fingerprint()
    );
    let ex = dir(&w.d, "export-mirrored");
    incus.run(&["image", "export", "r:fedora/40", s(&ex)]);
    assert_eq!(single_file(&ex, ".squashfs"), read(fed.rootfs()));
    let ex = dir(&w.d, "export-mirrored-vm");
    incus.run(&["image", "export", "r:alpine-3.19/edge", s(&ex), "--vm"]);
    assert_eq!(single_file(&ex, ".qcow2"), read(alp2.disk()));
}

/// Step 3: A bundle exported from B serves the same fingerprints on a fresh embedded
/// appliance; a bundle from an embedded site imported into A is served by B (its
/// fingerprint returned: `ubuntu-noble`, alias `lts`).
fn bundles(w: &World) -> String {
    let (a, b, deb) = (&w.d.a, &w.d.b, &w.deb);
    let (ct, vm) = (deb.container_fingerprint(), deb.vm_fingerprint());

    // out of B (its data directory: the deployment's catalog and bucket)
    let bundle = w.d.work.path().join("from-b.tar");
    let out = imgsrv_any(&[
        "export",
        "--data",
        s(b.data_dir()),
        "--key",
        s(&w.secret),
        "--image",
        "debian-*",
        "-o",
        s(&bundle),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 version(s), 5 blob(s)"),
        "{}",
        text(&out)
    );
    let site = TestServer::start();
    trust_key(site.data_dir(), Some("release"), &w.public);
    let out = imgsrv_any(&["import", "--data", s(site.data_dir()), s(&bundle)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("imported 2 version(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(
        incus_fingerprints(&site),
        set([ct.clone(), vm.clone(), w.deb_new.container_fingerprint()])
    );
    let p = format!("/v1/images/{IMAGE}/versions/{OLD}");
    for suffix in ["/manifest", "/manifest.minisig"] {
        assert!(
            site.get_ok(&format!("{p}{suffix}")) == b.get_ok(&format!("{p}{suffix}")),
            "{p}{suffix} differs"
        );
    }
    let incus = Incus::new(site.cert());
    incus.remote_add("r", &site.url());
    assert_eq!(incus.info_fingerprint(&[&format!("r:{IMAGE}/stable")]), ct);
    let ex = dir(&w.d, "export-site");
    incus.run(&["image", "export", &format!("r:{IMAGE}/stable"), s(&ex)]);
    assert_eq!(single_file(&ex, ".squashfs"), read(deb.rootfs()));

    // into A (its API) from an embedded site, served by B
    let origin = TestServer::start();
    trust_key(origin.data_dir(), Some("release"), &w.public);
    let noble = make_test_image(
        dir(&w.d, "noble"),
        &["--os", "Ubuntu", "--release", "noble", "--serial", OLD],
    );
    publish_image(&origin, &w.secret, &noble, &["--alias", "lts"]);
    let bundle = w.d.work.path().join("into-a.tar");
    let out = imgsrv_any(&[
        "export",
        "--data",
        s(origin.data_dir()),
        "--key",
        s(&w.secret),
        "-o",
        s(&bundle),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let fp = noble.container_fingerprint();
    assert!(!all_stream_fingerprints(b, None).contains(&fp));
    let mut args = vec!["import".to_string()];
    args.extend(server_args(a, &a.admin_token_file()));
    args.push(s(&bundle).into());
    let out = imgsrv_any(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("imported 1 version(s)"),
        "{}",
        text(&out)
    );
    let incus = Incus::new(b.cert());
    incus.remote_add("r", &b.url());
    assert!(set(incus.fingerprints("r:")).contains(&fp));
    assert_eq!(incus.info_fingerprint(&["r:ubuntu-noble/lts"]), fp);
    let p = format!("/v1/images/ubuntu-noble/versions/{OLD}");
    for suffix in ["/manifest", "/manifest.minisig"] {
        assert!(
            b.get_ok(&format!("{p}{suffix}")) == origin.get_ok(&format!("{p}{suffix}")),
            "{p}{suffix} differs"
        );
    }
    let ex = dir(&w.d, "export-imported");
    incus.run(&["image", "export", "r:ubuntu-noble", s(&ex)]);
    assert_eq!(single_file(&ex, ".incus.tar.xz"), read(&noble.metadata));
    assert_eq!(single_file(&ex, ".squashfs"), read(noble.rootfs()));

    // and on through B's API into the appliance: the same fingerprint and alias there
    let bundle = w.d.work.path().join("through-b.tar");
    let mut args = vec!["export".to_string()];
    args.extend(server_args(b, &b.admin_token_file()));
    args.extend(
        [
            "--key",
            s(&w.secret),
            "--image",
            "ubuntu-*",
            "-o",
            s(&bundle),
        ]
        .map(String::from),
    );
    let out = imgsrv_any(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 version(s), 2 blob(s)"),
        "{}",
        text(&out)
    );
    let out = imgsrv_any(&["import", "--data", s(site.data_dir()), s(&bundle)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("imported 1 version(s)"),
        "{}",
        text(&out)
    );
    let on_site = Incus::new(site.cert());
    on_site.remote_add("r", &site.url());
    assert_eq!(
        set(on_site.fingerprints("r:")),
        set([ct, vm, w.deb_new.container_fingerprint(), fp.clone()])
    );
    assert_eq!(on_site.info_fingerprint(&["r:ubuntu-noble/lts"]), fp);
    fp
}

/// Step 4: Principals, roles and scopes, made on A's data directory, honoured by both.
fn identity_matrix(w: &World, noble_fp: &str) {
    const V3: &str = "20260103_0000";
    const V4: &str = "20260104_0000";
    let (a, b) = (&w.d.a, &w.d.b);
    let admin = a.admin_token();
    let version_count = |image: &str, version: &str| {
        psql(
            &w.d.url,
            &format!(
                "SELECT count(*) FROM image_versions v JOIN images i ON i.id = v.image_id \
                 WHERE i.name = '{image}' AND v.version = '{version}'"
            ),
        )
    };
    let publish_as = |server: &TestServer, token: &Path, img: &TestImage, extra: &[&str]| {
        let mut args = vec!["publish".to_string()];
        args.extend(server_args(server, token));
        args.extend(["--key".into(), s(&w.secret).into()]);
        args.extend(extra.iter().map(|x| x.to_string()));
        args.push(s(&img.metadata).into());
        args.push(s(img.rootfs()).into());
        imgsrv_any(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let anonymous_sees = |server: &TestServer, image: &str| {
        let i = Incus::new(server.cert());
        i.remote_add("r", &server.url());
        i.info_fingerprint(&[&format!("r:{image}")])
    };

    // a content-writer on debian-* publishes through B inside its scope ...
    let (ci_id, ci_file) =
        principal_with_token(a.data_dir(), "ci", &[("content-writer", "debian-*")]);
    let v3 = make_test_image(dir(&w.d, "deb-v3"), &["--serial", V3]);
    let out = publish_as(b, &ci_file, &v3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        anonymous_sees(a, IMAGE),
        v3.container_fingerprint(),
        "A's newest {IMAGE}"
    );
    // ... and not outside it: refused, nothing made
    let outside = make_test_image(
        dir(&w.d, "outside"),
        &["--os", "Ubuntu", "--release", "jammy", "--serial", V3],
    );
    let out = publish_as(b, &ci_file, &outside, &[]);
    assert!(
        !out.status.success(),
        "published outside its scope: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("HTTP 403") && text(&out).contains("ubuntu-jammy"),
        "{}",
        text(&out)
    );
    let out = publish_as(b, &ci_file, &outside, &["--image", "ubuntu-noble"]);
    assert!(
        !out.status.success(),
        "published outside its scope: {}",
        text(&out)
    );
    assert!(text(&out).contains("HTTP 403"), "{}", text(&out));
    assert_eq!(version_count("ubuntu-jammy", V3), "0");
    assert_eq!(version_count("ubuntu-noble", V3), "0");
    assert!(!all_stream_fingerprints(b, Some(&admin)).contains(&outside.container_fingerprint()));
    // nor may it retire what is outside (ubuntu-noble came in the bundle of step 3)
    let retire = |token: &Path, image: &str, version: &str| {
        let mut args = vec!["version".to_string(), "retire".into()];
        args.extend(server_args(b, token));
        args.extend([
            "--reason".into(),
            "test".into(),
            image.into(),
            version.into(),
        ]);
        imgsrv_any(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = retire(&ci_file, "ubuntu-noble", OLD);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("HTTP 403"), "{}", text(&out));
    assert!(all_stream_fingerprints(a, None).contains(noble_fp));

    // a private image, published through A; a reader of secret-* sees it on both
    // instances, an anonymous caller on neither
    let secret_img = make_test_image(
        dir(&w.d, "secret"),
        &["--os", "Secret", "--release", "one", "--serial", OLD],
    );
    publish_image(a, &w.secret, &secret_img, &["--private"]);
    let sfp = secret_img.container_fingerprint();
    let (lab_id, lab_file) = principal_with_token(a.data_dir(), "lab", &[("reader", "secret-*")]);
    let lab = read_token(&lab_file);
    let manifest = format!("/v1/images/secret-one/versions/{OLD}/manifest");
    let manifest_status = |server: &TestServer, token: Option<&str>| {
        curl(server, &format!("{}{manifest}", server.url()), token, &[]).0
    };
    for server in [a, b] {
        assert!(listed_images(server, Some(&lab)).contains("secret-one"));
        assert!(!listed_images(server, None).contains("secret-one"));
        assert!(all_stream_fingerprints(server, Some(&lab)).contains(&sfp));
        assert!(!all_stream_fingerprints(server, None).contains(&sfp));
        assert_eq!(manifest_status(server, Some(&lab)), 200);
        assert_eq!(manifest_status(server, None), 404);
    }
    // and the stock client through B, the reader's token in the remote's URL
    let reader = Incus::new(b.cert());
    reader.remote_add(
        "p",
        &b.url().replace("https://", &format!("https://lab:{lab}@")),
    );
    assert!(set(reader.fingerprints("p:")).contains(&sfp));
    let ex = dir(&w.d, "export-private");
    reader.run(&["image", "export", "p:secret-one", s(&ex)]);
    assert_eq!(single_file(&ex, ".squashfs"), read(secret_img.rootfs()));
    let anon = Incus::new(b.cert());
    anon.remote_add("r", &b.url());
    assert!(!set(anon.fingerprints("r:")).contains(&sfp));
    assert!(!anon
        .try_run(&["image", "info", "r:secret-one"])
        .status
        .success());

    // the grant removed on A: B hides the image from the reader at its next request
    // (the token itself still authenticates)
    imgsrv(&[
        "grant",
        "rm",
        "--data",
        s(a.data_dir()),
        "lab",
        "reader",
        "secret-*",
    ]);
    assert_eq!(
        manifest_status(b, Some(&lab)),
        404,
        "B still honours a removed grant"
    );
    assert!(!all_stream_fingerprints(b, Some(&lab)).contains(&sfp));
    assert!(listed_images(b, Some(&lab)).contains(IMAGE));
    imgsrv(&[
        "grant",
        "add",
        "--data",
        s(a.data_dir()),
        "lab",
        "reader",
        "secret-*",
    ]);
    assert_eq!(manifest_status(b, Some(&lab)), 200);

    // tokens revoked on A are refused by B at the very next request: the reader's by
    // `imgsrv token revoke` on A's data directory, the writer's through A's API
    let out = imgsrv(&["token", "revoke", "--data", s(a.data_dir()), &lab_id]);
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    assert_eq!(
        manifest_status(b, Some(&lab)),
        401,
        "B still takes a token revoked on A"
    );
    assert_eq!(manifest_status(a, Some(&lab)), 401);

    let ci = read_token(&ci_file);
    assert_eq!(call(b, &ci, "GET", "/v1/images", b"").0, 200);
    let (st, body) = call(
        a,
        &admin,
        "DELETE",
        &format!("/v1/auth/api-tokens/{ci_id}"),
        b"",
    );
    assert!(
        (200..300).contains(&st),
        "{st}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        call(b, &ci, "GET", "/v1/images", b"").0,
        401,
        "B still takes a token revoked on A"
    );
    let v4 = make_test_image(dir(&w.d, "deb-v4"), &["--serial", V4]);
    let out = publish_as(b, &ci_file, &v4, &[]);
    assert!(
        !out.status.success(),
        "published with a revoked token: {}",
        text(&out)
    );
    assert!(text(&out).contains("HTTP 401"), "{}", text(&out));
    assert_eq!(version_count(IMAGE, V4), "0");

    // what the admin changes through B, A serves on its next request: the private
    // image made public, the scoped writer's version retired
    let mut args = vec!["image".to_string(), "set-visibility".into()];
    args.extend(server_args(b, &b.admin_token_file()));
    args.extend(["secret-one".into(), "public".into()]);
    let out = imgsrv_any(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(manifest_status(a, None), 200);
    assert_eq!(anonymous_sees(a, "secret-one"), sfp);
    let out = retire(&b.admin_token_file(), IMAGE, V3);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!all_stream_fingerprints(a, None).contains(&v3.container_fingerprint()));
    assert_eq!(
        anonymous_sees(a, IMAGE),
        w.deb_new.container_fingerprint(),
        "A's alias did not move back"
    );
}

fn read_token(file: &Path) -> String {
    fs::read_to_string(file).unwrap().trim().to_string()
}
