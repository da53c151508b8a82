//! `imgsrv mirror` against a real upstream: a tree made by the stock
//! `incus-simplestreams`, served over TLS 1.3 by Debian's nginx, mirrored
//! into a real `imgsrv serve` (`--server`) and into a data directory
//! (`--data`), and read back with the real `incus` client.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tempfile::TempDir;

// ------------------------------------------------------------ nginx upstream

/// Debian's nginx serving a directory over TLS 1.3 (and plain http on a
/// second port), with an access log that records Range headers. Stopped on
/// drop.
struct Nginx {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
    http_port: u16,
    cert: PathBuf,
}

impl Nginx {
    fn start(root: &Path) -> Nginx {
        Self::start_with(root, None)
    }

    /// With this certificate and key (default: the ones `imgsrv init` generates).
    fn start_with(root: &Path, tls: Option<(PathBuf, PathBuf)>) -> Nginx {
        let dir = temp_dir("nginx");
        let (cert, key) = tls.unwrap_or_else(|| {
            // a certificate for 127.0.0.1: the one `imgsrv init` generates
            let tls = dir.path().join("certs");
            imgsrv(&["init", "--data", tls.to_str().unwrap()]);
            (
                tls.join("tls").join("cert.pem"),
                tls.join("tls").join("key.pem"),
            )
        });
        let mut n = Nginx {
            dir,
            child: None,
            port: 0,
            http_port: 0,
            cert,
        };
        for _ in 0..3 {
            n.port = free_port();
            n.http_port = free_port();
            let d = n.dir.path();
            // SAFETY: geteuid(2) has no preconditions.
            let user = if unsafe { libc::geteuid() } == 0 {
                "user root;"
            } else {
                ""
            };
            let conf = format!(
                r#"{user}
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format mirror '$request_method $uri "$http_range" $status $body_bytes_sent';
  access_log {d}/access.log mirror;
  sendfile on;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp-body;
  proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fastcgi;
  uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    listen 127.0.0.1:{http_port};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.3;
    root {root};
  }}
}}
"#,
                d = d.display(),
                port = n.port,
                http_port = n.http_port,
                cert = n.cert.display(),
                key = key.display(),
                root = root.display(),
            );
            fs::write(d.join("nginx.conf"), conf).unwrap();
            let _ = fs::remove_file(d.join("error.log"));
            let child = Command::new("nginx")
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .arg("-e")
                .arg(d.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run nginx");
            n.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = n.child.as_mut().unwrap().try_wait().unwrap() {
                    n.child = None;
                    let log = fs::read_to_string(d.join("error.log")).unwrap_or_default();
                    if log.contains("in use") {
                        break; // lost a race for a port: again
                    }
                    panic!("nginx exited with {st}:\n{log}");
                }
                let up = |p| TcpStream::connect(("127.0.0.1", p)).is_ok();
                if up(n.port) && up(n.http_port) {
                    return n;
                }
                assert!(Instant::now() < deadline, "nginx did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("nginx: no free port after 3 tries");
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port)
    }

    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.http_port)
    }

    /// Access log lines: `METHOD URI "RANGE" STATUS BYTES`.
    fn log(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
    }
}

// ------------------------------------------------------------ upstream tree

/// An upstream tree made by `incus-simplestreams add`:
/// * `Debian bookworm` x86_64, two versions (`deb1` created 2026-01-01 00:00,
///   `deb2` 2026-01-02 00:00), container and VM each, with `--alias debian/12`
///   besides the default `Debian/bookworm/default`;
/// * `Alpine 3.19` x86_64, one container version (`alp`).
struct Tree {
    _tmp: TempDir,
    root: PathBuf,
    deb1: TestImage,
    deb2: TestImage,
    alp: TestImage,
    keys: (PathBuf, PathBuf),
    /// XDG_CACHE_HOME for `--server` runs (the default staging directory).
    cache: PathBuf,
}

fn simplestreams_add(root: &Path, args: &[&Path], aliases: &[&str]) {
    let mut cmd = Command::new("incus-simplestreams");
    cmd.current_dir(root).env("TZ", "UTC").arg("add");
    for a in aliases {
        cmd.arg("--alias").arg(a);
    }
    run_ok(cmd.args(args));
}

fn tree(vm: bool) -> Tree {
    let tmp = temp_dir("mirror-upstream");
    let t = tmp.path();
    let kind = if vm { "both" } else { "container" };
    let deb1 = make_test_image(
        t.join("deb1"),
        &["--serial", "20260101_0000", "--type", kind],
    );
    let deb2 = make_test_image(
        t.join("deb2"),
        &["--serial", "20260102_0000", "--type", kind],
    );
    let alp = make_test_image(
        t.join("alp"),
        &[
            "--os",
            "Alpine",
            "--release",
            "3.19",
            "--serial",
            "20260101_0000",
        ],
    );
    let root = t.join("tree");
    fs::create_dir_all(&root).unwrap();
    for img in [&deb1, &deb2] {
        simplestreams_add(&root, &[&img.metadata, img.rootfs()], &["debian/12"]);
        if vm {
            simplestreams_add(&root, &[&img.metadata, img.disk()], &["debian/12"]);
        }
    }
    simplestreams_add(&root, &[&alp.metadata, alp.rootfs()], &[]);
    let keys = minisign_keypair(t.join("keys"));
    let cache = t.join("cache");
    Tree {
        root,
        deb1,
        deb2,
        alp,
        keys,
        cache,
        _tmp: tmp,
    }
}

impl Tree {
    fn secret(&self) -> &str {
        self.keys.1.to_str().unwrap()
    }

    fn images_json(&self) -> Value {
        serde_json::from_slice(&fs::read(self.root.join("streams/v1/images.json")).unwrap())
            .unwrap()
    }

    /// The tree's file for an upstream item of `img` with this ftype.
    fn item_file(&self, img: &TestImage, ftype: &str) -> PathBuf {
        let meta_sha = sha256_file(&img.metadata);
        let doc = self.images_json();
        for p in doc["products"].as_object().unwrap().values() {
            for v in p["versions"].as_object().unwrap().values() {
                let items = v["items"].as_object().unwrap();
                if items.values().any(|i| i["sha256"] == meta_sha.as_str()) {
                    let i = items.values().find(|i| i["ftype"] == ftype).unwrap();
                    return self.root.join(i["path"].as_str().unwrap());
                }
            }
        }
        panic!("no {ftype} item for {}", img.dir.display());
    }
}

/// `imgsrv key add` of the tree's public key into a data directory.
fn trust(data: &Path, t: &Tree) {
    trust_key(data, Some("mirror"), &t.keys.0);
}

/// `imgsrv mirror ARGS`, whatever its exit status.
fn mirror(t: &Tree, args: &[&str]) -> Output {
    run_any(
        Command::new(IMGSRV)
            .arg("mirror")
            .args(args)
            .env("XDG_CACHE_HOME", &t.cache)
            .env_remove("IMGSRV_SERVER")
            .env_remove("IMGSRV_CA")
            .env_remove("IMGSRV_TOKEN"),
    )
}

/// `imgsrv mirror --data DATA --key TREE_KEY --upstream-ca NGINX_CERT EXTRA... NGINX_URL`.
fn mirror_into(t: &Tree, ngx: &Nginx, data: &Path, extra: &[&str]) -> Output {
    let url = ngx.url();
    let args = [
        &[
            "--data",
            s(data),
            "--key",
            t.secret(),
            "--upstream-ca",
            s(&ngx.cert),
        ],
        extra,
        &[&url],
    ]
    .concat();
    mirror(t, &args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout:\n{}--- stderr:\n{}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh data directory trusting the tree's key.
fn data_dir(t: &Tree, name: &str) -> PathBuf {
    let d = t._tmp.path().join(name);
    imgsrv(&["init", "--data", d.to_str().unwrap()]);
    trust(&d, t);
    d
}

fn fingerprints(incus: &Incus) -> BTreeSet<String> {
    incus.fingerprints("r:").into_iter().collect()
}

/// (alias, type) → target fingerprint, as the incus client resolves them.
fn aliases(incus: &Incus) -> BTreeSet<(String, String, String)> {
    incus
        .json(&["image", "alias", "list", "r:"])
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_string();
            (s("name"), s("type"), s("target"))
        })
        .collect()
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

fn status(data: &Path, image: &str, version: &str) -> imgsrv::target::VersionStatus {
    use imgsrv::target::Target;
    imgsrv::target::LocalTarget::open(data)
        .unwrap()
        .status(image, version)
        .unwrap()
}

// ------------------------------------------------------------ tests

#[test]
fn filtered_mirrors_into_a_server_and_a_data_dir_show_the_upstream_fingerprints_to_incus() {
    let t = tree(true);
    let ngx = Nginx::start(&t.root);
    let up_ca = ngx.cert.to_str().unwrap().to_string();

    // 1. into a running server, only Debian containers (os filter in another case)
    let a = TestServer::start();
    trust(a.data_dir(), &t);
    let into_a = |os: &str| {
        mirror(
            &t,
            &[
                "--server",
                &a.url(),
                "--ca",
                s(&a.cert()),
                "--token-file",
                s(&a.admin_token_file()),
                "--key",
                t.secret(),
                "--upstream-ca",
                &up_ca,
                "--os",
                os,
                "--type",
                "container",
                &ngx.url(),
            ],
        )
    };
    let out = into_a("debian");
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "summary: 2 versions mirrored, 0 already present, 1 skipped by filter, 0 failed"
        ),
        "{text}"
    );
    let incus = Incus::new(a.cert());
    incus.remote_add("r", &a.url());
    let want = set(&[
        t.deb1.container_fingerprint(),
        t.deb2.container_fingerprint(),
    ]);
    assert_eq!(fingerprints(&incus), want);

    // upstream aliases resolve on the mirror: the default one incus-simplestreams
    // made and the --alias one, on the newest version
    let al = aliases(&incus);
    let new_ct = t.deb2.container_fingerprint();
    for name in [
        "Debian/bookworm/default",
        "debian/12",
        "debian/bookworm",
        "debian-bookworm",
    ] {
        assert!(
            al.contains(&(name.to_string(), "container".into(), new_ct.clone())),
            "{name} -> {new_ct} missing in {al:?}"
        );
    }
    // exported bytes are the upstream's
    let ex = temp_dir("mirror-export");
    incus.run(&[
        "image",
        "export",
        "r:debian/12",
        ex.path().to_str().unwrap(),
    ]);
    assert_eq!(
        single_file(ex.path(), ".incus.tar.xz"),
        fs::read(&t.deb2.metadata).unwrap()
    );
    assert_eq!(
        single_file(ex.path(), ".squashfs"),
        fs::read(t.deb2.rootfs()).unwrap()
    );

    // 2. a second run transfers nothing new
    let before = ngx.log().len();
    let again = into_a("DEBIAN");
    assert!(again.status.success(), "{}", show(&again));
    let text = stdout(&again);
    assert!(
        text.contains("summary: 0 versions mirrored, 2 already present, 1 skipped by filter, 0 failed; 0 B downloaded (0 files)"),
        "{text}"
    );
    // (besides the probe that asks whether the upstream is an imgsrv server)
    let new_requests: Vec<String> = ngx.log()[before..]
        .iter()
        .filter(|l| !l.starts_with("GET /v1/keys "))
        .cloned()
        .collect();
    assert_eq!(
        new_requests.len(),
        2,
        "only the JSON is read again: {new_requests:?}"
    );
    assert!(new_requests[0].starts_with("GET /streams/v1/index.json \"-\" 200"));
    assert!(new_requests[1].starts_with("GET /streams/v1/images.json \"-\" 200"));

    // 2b. another imgsrv's stream is an upstream too (a mirror of the mirror)
    let chain = data_dir(&t, "chain");
    let out = mirror(
        &t,
        &[
            "--data",
            chain.to_str().unwrap(),
            "--key",
            t.secret(),
            "--upstream-ca",
            a.cert().to_str().unwrap(),
            "--simplestreams",
            &a.url(),
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains(
            "summary: 2 versions mirrored, 0 already present, 0 skipped by filter, 0 failed"
        ),
        "{}",
        show(&out)
    );
    let c = imgsrv::target::LocalTarget::open(&chain).unwrap();
    let v = c
        .app
        .catalog
        .get_version("debian-bookworm", "202601020000")
        .unwrap();
    assert_eq!(v.metadata["upstream.url"], a.url());
    assert_eq!(
        v.metadata["upstream.sha256.root.squashfs"],
        sha256_file(t.deb2.rootfs())
    );
    let fps = c.app.catalog.projection_entries().unwrap();
    let fps: BTreeSet<String> = fps.iter().map(|e| e.combined_sha256.hex()).collect();
    assert_eq!(
        fps,
        set(&[
            t.deb1.container_fingerprint(),
            t.deb2.container_fingerprint()
        ])
    );

    // 3. into a data directory (of another running server), Debian on amd64
    //    (= x86_64 upstream), containers and VMs
    let b = TestServer::start();
    trust(b.data_dir(), &t);
    let out = mirror_into(
        &t,
        &ngx,
        b.data_dir(),
        &["--arch", "amd64", "--release", "Bookworm"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let incus_b = Incus::new(b.cert());
    incus_b.remote_add("r", &b.url());
    let want = set(&[
        t.deb1.container_fingerprint(),
        t.deb1.vm_fingerprint(),
        t.deb2.container_fingerprint(),
        t.deb2.vm_fingerprint(),
    ]);
    assert_eq!(fingerprints(&incus_b), want);
    let al = aliases(&incus_b);
    for (kind, fp) in [
        ("container", t.deb2.container_fingerprint()),
        ("virtual-machine", t.deb2.vm_fingerprint()),
    ] {
        for name in ["Debian/bookworm/default", "debian/12"] {
            assert!(
                al.contains(&(name.to_string(), kind.into(), fp.clone())),
                "{name} {kind} -> {fp} missing in {al:?}"
            );
        }
    }
    let vm = temp_dir("mirror-export-vm");
    incus_b.run(&[
        "image",
        "export",
        "r:debian/12",
        vm.path().to_str().unwrap(),
        "--vm",
    ]);
    assert_eq!(
        single_file(vm.path(), ".incus.tar.xz"),
        fs::read(&t.deb2.metadata).unwrap()
    );
    assert_eq!(
        single_file(vm.path(), ".qcow2"),
        fs::read(t.deb2.disk()).unwrap()
    );
    // the older version by its fingerprint, byte for byte
    let old = temp_dir("mirror-export-old");
    incus_b.run(&[
        "image",
        "export",
        &format!("r:{}", t.deb1.container_fingerprint()),
        old.path().to_str().unwrap(),
    ]);
    assert_eq!(
        single_file(old.path(), ".squashfs"),
        fs::read(t.deb1.rootfs()).unwrap()
    );

    // provenance is in the signed version metadata
    let m: Value = serde_json::from_slice(
        &run_ok(Command::new("curl").args([
            "-sSf",
            "--cacert",
            b.cert().to_str().unwrap(),
            &format!(
                "{}/v1/images/debian-bookworm/versions/202601020000/manifest",
                b.url()
            ),
        ]))
        .stdout,
    )
    .unwrap();
    let md = &m["metadata"];
    assert_eq!(md["upstream.url"], ngx.url().trim_end_matches('/'));
    assert_eq!(md["upstream.product"], "Debian:bookworm:default:x86_64");
    assert_eq!(md["upstream.version"], "202601020000");
    assert_eq!(md["serial"], "202601020000");
    assert_eq!(md["architecture"], "x86_64");
    assert_eq!(
        md["upstream.sha256.squashfs"],
        sha256_file(t.deb2.rootfs()).as_str()
    );
    let ss_aliases: BTreeSet<&str> = md["simplestreams.aliases"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(
        ss_aliases,
        BTreeSet::from(["Debian/bookworm/default", "debian/12"])
    );
    assert_eq!(
        status(b.data_dir(), "alpine-3.19", "202601010000"),
        imgsrv::target::VersionStatus::Absent
    );

    // the library's report of a run with nothing new
    let target = imgsrv::target::LocalTarget::open(b.data_dir()).unwrap();
    let mut opts = imgsrv::mirror::MirrorOptions::new(&ngx.url(), &t.keys.1);
    opts.upstream_ca = Some(ngx.cert.clone());
    opts.release = Some("bookworm".into());
    opts.staging_dir = Some(t._tmp.path().join("lib-staging"));
    let mut sink = Vec::new();
    let r = imgsrv::mirror::run(&opts, &target, &mut sink).unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.bytes_downloaded, r.files_downloaded), (0, 0));
    assert!(r.mirrored.is_empty());
    assert_eq!(r.already_present.len(), 2);
    assert_eq!(r.skipped_by_filter, 1, "alpine");
}

#[test]
fn corrupted_upstream_files_and_fingerprints_are_refused_and_the_rest_is_mirrored() {
    let t = tree(true);
    // a flipped byte in the Alpine rootfs
    let alp_root = t.item_file(&t.alp, "squashfs");
    let mut bytes = fs::read(&alp_root).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&alp_root, &bytes).unwrap();
    // a combined hash in the JSON that the files do not give (older Debian VM)
    let mut doc = t.images_json();
    let meta1 = sha256_file(&t.deb1.metadata);
    let bogus = "0".repeat(64);
    for p in doc["products"].as_object_mut().unwrap().values_mut() {
        for v in p["versions"].as_object_mut().unwrap().values_mut() {
            for i in v["items"].as_object_mut().unwrap().values_mut() {
                if i["sha256"] == meta1.as_str() {
                    i["combined_disk-kvm-img_sha256"] = Value::String(bogus.clone());
                }
            }
        }
    }
    fs::write(
        t.root.join("streams/v1/images.json"),
        serde_json::to_vec(&doc).unwrap(),
    )
    .unwrap();

    let ngx = Nginx::start(&t.root);
    let d = data_dir(&t, "data");
    let out = mirror_into(&t, &ngx, &d, &["--jobs", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "summary: 1 version mirrored, 0 already present, 0 skipped by filter, 2 failed"
        ),
        "{text}"
    );
    assert!(
        text.contains("FAILED   alpine-3.19 202601010000: squashfs: sha256 mismatch"),
        "{text}"
    );
    assert!(
        text.contains("FAILED   debian-bookworm 202601010000: fingerprint mismatch for the x86_64 virtual-machine"),
        "{text}"
    );
    assert!(text.contains(&bogus), "{text}");
    use imgsrv::target::VersionStatus::*;
    assert_eq!(status(&d, "alpine-3.19", "202601010000"), Absent);
    assert_eq!(
        status(&d, "debian-bookworm", "202601010000"),
        Absent,
        "not even a draft"
    );
    assert_eq!(status(&d, "debian-bookworm", "202601020000"), Published);
    // the corrupted file was fetched three times, from 0 each time
    let name = alp_root.file_name().unwrap().to_string_lossy().into_owned();
    let tries: Vec<String> = ngx
        .log()
        .into_iter()
        .filter(|l| l.contains(&name))
        .collect();
    assert_eq!(tries.len(), 3, "{tries:?}");
    assert!(tries.iter().all(|l| l.contains("\"-\" 200")), "{tries:?}");
    // nothing of it is left in the staging directory
    let staged: Vec<String> = fs::read_dir(d.join("tmp/mirror"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let alp_sha = sha256_file(t.alp.rootfs());
    assert!(
        !staged.iter().any(|f| f.starts_with(&alp_sha)),
        "{staged:?}"
    );
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let t = tree(false);
    let ngx = Nginx::start(&t.root);
    let d = data_dir(&t, "data");
    // an earlier run stopped halfway through the newest Debian rootfs
    let rootfs = fs::read(t.deb2.rootfs()).unwrap();
    let half = rootfs.len() / 2;
    let staging = d.join("tmp").join("mirror");
    fs::create_dir_all(&staging).unwrap();
    let sha = sha256_file(t.deb2.rootfs());
    fs::write(staging.join(format!("{sha}.partial")), &rootfs[..half]).unwrap();

    let out = mirror_into(&t, &ngx, &d, &["--image", "debian-*"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("files: 1 resumed"), "{text}");
    let name = t.item_file(&t.deb2, "squashfs");
    let name = name.file_name().unwrap().to_string_lossy().into_owned();
    let lines: Vec<String> = ngx
        .log()
        .into_iter()
        .filter(|l| l.contains(&name))
        .collect();
    assert_eq!(
        lines,
        [format!(
            "GET /images/{name} \"bytes={half}-\" 206 {}",
            rootfs.len() - half
        )]
    );
    // the downloaded total counts only what came over the network
    let sizes = [
        fs::metadata(&t.deb1.metadata).unwrap().len(),
        fs::metadata(t.deb1.rootfs()).unwrap().len(),
        fs::metadata(&t.deb2.metadata).unwrap().len(),
        (rootfs.len() - half) as u64,
    ];
    let total: u64 = sizes.iter().sum();
    let mib = total as f64 / 1048576.0;
    assert!(
        text.contains(&format!("{mib:.1} MiB downloaded (4 files)")),
        "{total} {text}"
    );
    use imgsrv::target::VersionStatus::*;
    assert_eq!(status(&d, "debian-bookworm", "202601020000"), Published);
    assert_eq!(status(&d, "debian-bookworm", "202601010000"), Published);
    assert!(!staging.join(format!("{sha}.partial")).exists());
    assert!(
        !staging.join(&sha).exists(),
        "staged files go once published"
    );
}

#[test]
fn latest_one_keeps_only_the_newest_version_and_plain_http_is_flagged() {
    let t = tree(false);
    let ngx = Nginx::start(&t.root);
    let d = data_dir(&t, "data");
    let out = mirror(
        &t,
        &[
            "--data",
            d.to_str().unwrap(),
            "--key",
            t.secret(),
            "--latest",
            "1",
            "--os",
            "Debian",
            &ngx.http_url(),
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "summary: 1 version mirrored, 0 already present, 2 skipped by filter, 0 failed"
        ),
        "{text}"
    );
    assert!(
        text.contains("WARNING: the upstream http://127.0.0.1"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain http"));
    use imgsrv::target::VersionStatus::*;
    assert_eq!(status(&d, "debian-bookworm", "202601020000"), Published);
    assert_eq!(status(&d, "debian-bookworm", "202601010000"), Absent);
    assert_eq!(status(&d, "alpine-3.19", "202601010000"), Absent);
}

#[test]
fn a_file_a_scrub_quarantined_is_fetched_again_by_the_next_run() {
    let t = tree(false);
    let ngx = Nginx::start(&t.root);
    let d = data_dir(&t, "data");
    let run = || mirror_into(&t, &ngx, &d, &["--os", "Debian", "--latest", "1"]);
    let out = run();
    assert!(out.status.success(), "{}", show(&out));
    let root = sha256_file(t.deb2.rootfs());
    let blob = d
        .join("sha256")
        .join(&root[..2])
        .join(&root[2..4])
        .join(&root);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&blob).unwrap();
    bytes[4096] ^= 0x01;
    fs::write(&blob, bytes).unwrap();
    let scrub = || run_any(Command::new(IMGSRV).args(["scrub", "--data", d.to_str().unwrap()]));
    let s = scrub();
    assert_eq!(s.status.code(), Some(1), "{}", show(&s));
    assert!(
        stdout(&s).contains(&format!("PROBLEM damaged sha256:{root}")),
        "{}",
        show(&s)
    );
    assert!(!blob.exists(), "quarantined");

    let out = run();
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("repair   debian-bookworm 202601020000: 1 of its files"),
        "{text}"
    );
    assert!(
        text.contains("repaired debian-bookworm 202601020000"),
        "{text}"
    );
    assert!(
        text.contains("repaired: 1 version already published"),
        "{text}"
    );
    assert_eq!(sha256_file(&blob), root);
    let s = scrub();
    assert_eq!(s.status.code(), Some(0), "{}", show(&s));
    let again = stdout(&run());
    assert!(!again.contains("repair"), "{again}");
    assert!(
        again.contains("present  debian-bookworm 202601020000"),
        "{again}"
    );
}

#[test]
fn bad_arguments_and_an_unreachable_upstream_exit_2() {
    let t = temp_dir("mirror-args");
    let d = t.path().join("data");
    imgsrv(&["init", "--data", d.to_str().unwrap()]);
    let (pk, sk) = minisign_keypair(t.path().join("keys"));
    // trusted: an untrusted key would stop the run before the upstream is read
    trust_key(&d, None, &pk);
    let run = |extra: &[&str], url: &str| {
        let mut c = Command::new(IMGSRV);
        c.args([
            "mirror",
            "--data",
            d.to_str().unwrap(),
            "--key",
            sk.to_str().unwrap(),
        ])
        .args(extra)
        .arg(url)
        .env("XDG_CACHE_HOME", t.path());
        run_any(&mut c)
    };
    let port = free_port();
    let unreachable = run(&[], &format!("https://127.0.0.1:{port}/"));
    assert_eq!(unreachable.status.code(), Some(2), "{}", show(&unreachable));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("reading the upstream index"));
    let bad_glob = run(&["--image", "[x]"], "https://127.0.0.1:1/");
    assert_eq!(bad_glob.status.code(), Some(2), "{}", show(&bad_glob));
    let bad_url = run(&[], "ftp://127.0.0.1/");
    assert_eq!(bad_url.status.code(), Some(2), "{}", show(&bad_url));
    let bad_type = run(&["--type", "lxc"], "https://127.0.0.1:1/");
    assert_eq!(bad_type.status.code(), Some(2), "{}", show(&bad_type));
    let mut c = Command::new(IMGSRV);
    c.args([
        "mirror",
        "--key",
        sk.to_str().unwrap(),
        "https://127.0.0.1:1/",
    ])
    .env_remove("IMGSRV_SERVER");
    let no_target = run_any(&mut c);
    assert_eq!(no_target.status.code(), Some(2), "{}", show(&no_target));
}

/// Issue acceptance: progress bars on a terminal (a real pty made by
/// `script`), none when the output is not one.
#[test]
fn mirror_shows_a_progress_bar_on_a_terminal_only() {
    let t = tree(false);
    let ngx = Nginx::start(&t.root);
    let on_tty = data_dir(&t, "tty");
    let url = ngx.url();
    let out = run_ok(
        on_pty(&[
            IMGSRV,
            "mirror",
            "--data",
            s(&on_tty),
            "--key",
            t.secret(),
            "--upstream-ca",
            s(&ngx.cert),
            "--latest",
            "1",
            &url,
        ])
        .env("XDG_CACHE_HOME", &t.cache)
        .env_remove("IMGSRV_SERVER")
        .env_remove("IMGSRV_TOKEN"),
    );
    let shown = text(&out);
    assert!(shown.contains("summary:"), "{shown}");
    assert!(shown.contains("mirror [="), "no bar drawn: {shown}");

    let piped = data_dir(&t, "piped");
    let out = mirror_into(&t, &ngx, &piped, &["--latest", "1"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!text(&out).contains("mirror ["), "{}", show(&out));
}

/// Issue 9: an upstream whose certificate was made by the stock `openssl req
/// -x509` recipe (self-signed, basicConstraints CA:TRUE) is trusted when that
/// certificate is given with --upstream-ca (pinned, as curl --cacert does);
/// another certificate, or the right one for another host name, is not.
#[test]
fn a_self_signed_openssl_upstream_certificate_given_with_upstream_ca_is_trusted() {
    let t = tree(false);
    let certs = temp_dir("openssl-certs");
    let (cert, key) = openssl_self_signed(certs.path(), "ngx", "127.0.0.1");
    let ngx = Nginx::start_with(&t.root, Some((cert.clone(), key)));
    // curl accepts it too (what a user compares with)
    let curl = run_any(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--cacert"])
            .arg(&cert)
            .arg(format!("{}streams/v1/index.json", ngx.url())),
    );
    assert!(curl.status.success(), "curl: {}", show(&curl));

    let data = data_dir(&t, "pinned");
    let out = mirror_into(&t, &ngx, &data, &["--latest", "1"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout(&out).contains("summary:"), "{}", show(&out));
    assert_eq!(
        status(&data, "alpine-3.19", "202601010000"),
        imgsrv::target::VersionStatus::Published
    );

    // another self-signed certificate is not this server's: refused, exit 2
    let (other, _) = openssl_self_signed(certs.path(), "other", "127.0.0.1");
    let url = ngx.url();
    let refused = mirror(
        &t,
        &[
            "--data",
            s(&data),
            "--key",
            t.secret(),
            "--upstream-ca",
            s(&other),
            &url,
        ],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", show(&refused));
    assert!(text(&refused).contains("certificate"), "{}", show(&refused));
    // the pinned certificate names 127.0.0.1, not localhost: refused too
    let by_name = format!("https://localhost:{}/", ngx.port);
    let refused = mirror(
        &t,
        &[
            "--data",
            s(&data),
            "--key",
            t.secret(),
            "--upstream-ca",
            s(&cert),
            &by_name,
        ],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", show(&refused));
    assert!(
        text(&refused).contains("not valid for name"),
        "{}",
        show(&refused)
    );
}

/// What was read from the tree (not the `GET /v1/keys` asking whether the
/// upstream is an imgsrv).
fn downloads(ngx: &Nginx) -> Vec<String> {
    ngx.log()
        .into_iter()
        .filter(|l| !l.starts_with("GET /v1/keys "))
        .collect()
}

/// Issue 9: a mirror key the target does not trust is found before anything
/// is downloaded (exit 2, with how to trust it), for a data directory and a
/// server (`GET /v1/keys`) alike; a retired one too.
#[test]
fn a_mirror_key_the_target_does_not_trust_stops_the_run_before_any_download() {
    let t = tree(false);
    let ngx = Nginx::start(&t.root);
    let d = t._tmp.path().join("untrusting");
    imgsrv(&["init", "--data", s(&d)]);
    let out = mirror_into(&t, &ngx, &d, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let msg = text(&out);
    assert!(msg.contains("does not trust the signing key"), "{msg}");
    assert!(msg.contains("imgsrv key add --data"), "{msg}");
    assert!(downloads(&ngx).is_empty(), "downloaded: {:?}", ngx.log());

    // a server: through GET /v1/keys
    let server = TestServer::start();
    let url = ngx.url();
    let out = run_any(
        Command::new(IMGSRV)
            .args(["mirror", "--server", &server.url(), "--ca"])
            .arg(server.cert())
            .arg("--token-file")
            .arg(server.admin_token_file())
            .args(["--key", t.secret(), "--upstream-ca", s(&ngx.cert), &url])
            .env("XDG_CACHE_HOME", &t.cache)
            .env_remove("IMGSRV_DATA"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        text(&out).contains("does not trust the signing key"),
        "{}",
        show(&out)
    );
    assert!(downloads(&ngx).is_empty(), "downloaded: {:?}", ngx.log());

    // retired there: refused too; trusted and active: mirrored
    trust(&d, &t);
    imgsrv(&["key", "retire", "--data", s(&d), "mirror"]);
    let out = mirror_into(&t, &ngx, &d, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out).contains("is retired on"), "{}", show(&out));
    let d2 = data_dir(&t, "trusting");
    let out = mirror_into(&t, &ngx, &d2, &["--latest", "1"]);
    assert!(out.status.success(), "{}", show(&out));
}
