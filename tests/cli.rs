//! The command line as a user runs it: `imgsrv init|serve|key|publish|alias|list`.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// `imgsrv` with the client environment pointing at `server`.
fn client(server: &TestServer) -> Command {
    let mut c = Command::new(IMGSRV);
    c.env("IMGSRV_SERVER", server.url())
        .env("IMGSRV_CA", server.cert())
        .env("IMGSRV_TOKEN", server.admin_token())
        .stdin(Stdio::null());
    c
}

#[test]
fn init_is_idempotent_and_prints_what_it_made() {
    let tmp = temp_dir("cli-init");
    let d = tmp.path().join("data");
    let first = text(&imgsrv(&[
        "init",
        "--data",
        s(&d),
        "--name",
        "images.example.org",
        "--name",
        "10.1.2.3",
    ]));
    for f in [
        "imgsrv.toml",
        "catalog.db",
        "tls/cert.pem",
        "tls/key.pem",
        "admin.token",
    ] {
        assert!(first.contains(f), "{f} not reported:\n{first}");
        assert!(d.join(f).exists(), "{f} missing");
    }
    let token = std::fs::read_to_string(d.join("admin.token")).unwrap();
    let cert = std::fs::read(d.join("tls/cert.pem")).unwrap();
    let second = text(&imgsrv(&["init", "--data", s(&d)]));
    assert!(second.contains("already initialised"), "{second}");
    assert_eq!(
        std::fs::read_to_string(d.join("admin.token")).unwrap(),
        token,
        "token kept"
    );
    assert_eq!(
        std::fs::read(d.join("tls/cert.pem")).unwrap(),
        cert,
        "certificate kept"
    );
    let sans = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(d.join("tls/cert.pem")),
    );
    let sans = String::from_utf8_lossy(&sans.stdout);
    for want in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "DNS:images.example.org",
        "IP Address:10.1.2.3",
    ] {
        assert!(sans.contains(want), "{want} not in {sans}");
    }
}

#[test]
fn trusted_keys_are_managed_in_the_catalog() {
    let tmp = temp_dir("cli-keys");
    let d = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&d)]);
    let (public, _) = minisign_keypair(tmp.path().join("k"));
    let added = text(&imgsrv(&[
        "key",
        "add",
        "--data",
        s(&d),
        "--name",
        "release",
        s(&public),
    ]));
    assert!(
        added.contains("trusted key release") && added.contains("in the catalog"),
        "{added}"
    );
    assert!(!d.join("keys").exists(), "no key files any more");
    assert_eq!(
        catalog_sql(&d, "SELECT name, scopes FROM trusted_keys").trim(),
        "release|[\"*\"]"
    );
    let list = text(&imgsrv(&["key", "list", "--data", s(&d)]));
    assert!(
        list.contains("release") && list.contains("active"),
        "{list}"
    );
    let again = run_any(Command::new(IMGSRV).args([
        "key",
        "add",
        "--data",
        s(&d),
        "--name",
        "other",
        s(&public),
    ]));
    assert!(
        !again.status.success(),
        "the same key twice must be refused"
    );
    let junk = tmp.path().join("junk.pub");
    std::fs::write(&junk, "untrusted comment: x\nnot a key\n").unwrap();
    let bad = run_any(Command::new(IMGSRV).args(["key", "add", "--data", s(&d), s(&junk)]));
    assert!(!bad.status.success());
    assert!(text(&bad).contains("junk.pub"), "{}", text(&bad));
    let scoped = text(&imgsrv(&[
        "key",
        "scope",
        "--data",
        s(&d),
        "release",
        "--scope",
        "debian-*",
    ]));
    assert!(scoped.contains("may sign images debian-*"), "{scoped}");
    imgsrv(&["key", "remove", "--data", s(&d), "release"]);
    assert!(!text(&imgsrv(&["key", "list", "--data", s(&d)])).contains("release"));

    // a revoked key stays listed, and never comes back
    let (second, _) = minisign_keypair(tmp.path().join("k2"));
    trust_key(&d, Some("ci"), &second);
    imgsrv(&["key", "revoke", "--data", s(&d), "ci"]);
    let rm = run_any(Command::new(IMGSRV).args(["key", "remove", "--data", s(&d), "ci"]));
    assert_eq!(rm.status.code(), Some(1), "{}", text(&rm));
    assert!(
        text(&rm).contains("stays in the trust store"),
        "{}",
        text(&rm)
    );
    let list = text(&imgsrv(&["key", "list", "--data", s(&d)]));
    assert!(list.contains("ci") && list.contains("revoked"), "{list}");
    let back = run_any(Command::new(IMGSRV).args(["key", "retire", "--data", s(&d), "ci"]));
    assert!(!back.status.success(), "{}", text(&back));
    // every change is in the audit log
    let audit = catalog_sql(
        &d,
        "SELECT action FROM audit_log WHERE action LIKE 'key.%' ORDER BY id",
    );
    assert_eq!(
        audit.split_whitespace().collect::<Vec<_>>(),
        [
            "key.add",
            "key.scope",
            "key.remove",
            "key.add",
            "key.revoke"
        ]
    );
}

/// An appliance from before the keys moved into the catalog: its `DATA/keys/*.pub`
/// files (with their policies) are imported when the catalog is next opened, once;
/// a revoked file key is revoked in the catalog; the files stay as a record.
#[test]
fn the_key_files_of_an_older_appliance_are_imported_once() {
    let tmp = temp_dir("cli-key-import");
    let d = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&d)]);
    let keys = d.join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (release, _) = minisign_keypair(tmp.path().join("a"));
    let (old, _) = minisign_keypair(tmp.path().join("b"));
    let (later, _) = minisign_keypair(tmp.path().join("c"));
    std::fs::copy(&release, keys.join("release.pub")).unwrap();
    std::fs::write(
        keys.join("release.toml"),
        "scopes = [\"debian-*\"]\nstate = \"active\"\n",
    )
    .unwrap();
    std::fs::copy(&old, keys.join("old.pub")).unwrap();
    std::fs::write(
        keys.join("old.toml"),
        "scopes = [\"*\"]\nstate = \"revoked\"\nrevoked_at = \"2025-06-01T00:00:00Z\"\n",
    )
    .unwrap();
    let list =
        String::from_utf8_lossy(&imgsrv(&["key", "list", "--data", s(&d)]).stdout).into_owned();
    let rows: Vec<&str> = list.lines().collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(
        rows[0].starts_with("old\t") && rows[0].contains("\trevoked\t"),
        "{list}"
    );
    assert!(
        rows[1].starts_with("release\t") && rows[1].ends_with("\tactive\tdebian-*"),
        "{list}"
    );
    assert!(keys.join(imgsrv::sign::MARKER_FILE).is_file());
    assert_eq!(
        catalog_sql(
            &d,
            "SELECT count(*) FROM audit_log WHERE action = 'key.import'"
        )
        .trim(),
        "2"
    );
    // once: a key file added since is not trusted, and nothing is imported twice
    std::fs::copy(&later, keys.join("later.pub")).unwrap();
    let out = imgsrv(&["key", "list", "--data", s(&d)]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert_eq!(list.lines().count(), 2, "{list}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("later.pub")
            && said.contains("is not trusted")
            && said.contains("imgsrv key add"),
        "{said}"
    );
    assert_eq!(
        catalog_sql(
            &d,
            "SELECT count(*) FROM audit_log WHERE action = 'key.import'"
        )
        .trim(),
        "2"
    );
    // the files stay, as they were
    assert!(std::fs::read_to_string(keys.join("old.toml"))
        .unwrap()
        .contains("revoked"));
}

#[test]
fn serve_refuses_a_broken_config_with_a_clear_error() {
    let tmp = temp_dir("cli-badcfg");
    let d = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&d)]);
    for (cfg, needle) in [
        ("listen = 5", "imgsrv.toml"),
        ("lisen = \"127.0.0.1:1\"", "lisen"),
        ("[tls]\ncert = \"x.pem\"", "key"),
    ] {
        std::fs::write(d.join("imgsrv.toml"), cfg).unwrap();
        let t = Instant::now();
        // a server that accepted the config would run on: stopped (failing the test) at 60 s
        let out = run_within(
            Command::new(IMGSRV).args(["serve", "--data", s(&d), "--listen", "127.0.0.1:0"]),
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "{cfg}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(text(&out).contains(needle), "{cfg}: {}", text(&out));
    }
}

#[test]
fn publish_alias_and_list_through_the_cli() {
    let server = TestServer::start();
    let tmp = temp_dir("cli-publish");
    let (public, secret) = minisign_keypair(tmp.path().join("k"));
    let img = make_test_image(
        tmp.path().join("img"),
        &["--serial", "20260301_1200", "--type", "both"],
    );
    let publish = |extra: &[&str]| {
        run_any(
            client(&server)
                .arg("publish")
                .arg("--key")
                .arg(&secret)
                .args(extra)
                .arg(&img.metadata)
                .arg(img.rootfs())
                .arg(img.disk()),
        )
    };

    // the key is not trusted yet: refused, nothing published, the draft stays
    let refused = publish(&["--alias", "stable"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("412") || text(&refused).to_lowercase().contains("refused"),
        "{}",
        text(&refused)
    );
    let versions = text(&run_ok(client(&server).args(["list", "debian-bookworm"])));
    assert!(
        versions.contains("draft") && !versions.contains("published"),
        "{versions}"
    );

    // trusting the key takes effect without a restart; re-running resumes the draft
    trust_key(server.data_dir(), None, &public);
    let ok = publish(&["--alias", "stable"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let out = text(&ok);
    assert!(
        out.contains("debian-bookworm") && out.contains("20260301_1200"),
        "{out}"
    );
    assert!(
        out.contains(&img.container_fingerprint()) && out.contains(&img.vm_fingerprint()),
        "{out}"
    );

    // published is forever: the same version cannot be published again
    let again = publish(&[]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("already published"),
        "{}",
        text(&again)
    );

    // one row per artifact (tests/listing.rs checks the formats)
    let list = text(&run_ok(client(&server).args(["list", "--format", "csv"])));
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{list}");
    for r in rows {
        let cells: Vec<&str> = r.split(',').collect();
        assert_eq!(
            (cells[0], cells[1], cells[10], cells[11]),
            ("debian-bookworm", "20260301_1200", "stable", "published"),
            "{list}"
        );
    }

    run_ok(client(&server).args(["alias", "set", "debian-bookworm", "lts", "20260301_1200"]));
    assert!(text(&run_ok(client(&server).args(["list", "debian-bookworm"]))).contains("lts"));
    let bad = run_any(client(&server).args(["alias", "set", "debian-bookworm", "x", "19990101"]));
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad).contains("404"), "{}", text(&bad));
    run_ok(client(&server).args(["alias", "rm", "debian-bookworm", "lts"]));
    assert!(!text(&run_ok(client(&server).args(["list", "debian-bookworm"]))).contains("lts"));

    // no token: a clear error before anything is sent
    let no_token = run_any(
        Command::new(IMGSRV)
            .env("IMGSRV_SERVER", server.url())
            .env("IMGSRV_CA", server.cert())
            .env_remove("IMGSRV_TOKEN")
            .args(["alias", "rm", "debian-bookworm", "stable"]),
    );
    assert!(!no_token.status.success());
    assert!(text(&no_token).contains("token"), "{}", text(&no_token));
    // a wrong token is refused by the server
    let wrong = run_any(
        client(&server)
            .env("IMGSRV_TOKEN", "imgsrv_0000000000000000_00")
            .args(["alias", "rm", "debian-bookworm", "stable"]),
    );
    assert!(text(&wrong).contains("401"), "{}", text(&wrong));
}

#[test]
fn a_configured_certificate_replaces_the_generated_one() {
    let tmp = temp_dir("cli-owncert");
    let d = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&d)]);
    let (cert, key) = (tmp.path().join("own.pem"), tmp.path().join("own.key"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
            ])
            .args([
                "-subj",
                "/CN=own",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    std::fs::write(
        d.join("imgsrv.toml"),
        format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", s(&cert), s(&key)),
    )
    .unwrap();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}/healthz");
    let mut child = Command::new(IMGSRV)
        .args([
            "serve",
            "--data",
            s(&d),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let curl = |ca: &Path| {
        run_any(
            Command::new("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--tlsv1.3",
                    "--cacert",
                ])
                .arg(ca)
                .arg(&url),
        )
    };
    let t = Instant::now();
    while !curl(&cert).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server with its own certificate never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(String::from_utf8_lossy(&curl(&cert).stdout), "204");
    // the generated certificate is not what is served: curl refuses the
    // server's certificate (exit 60), not some other failure
    let other = curl(&d.join("tls/cert.pem"));
    assert_eq!(
        other.status.code(),
        Some(60),
        "served the generated certificate? {}",
        text(&other)
    );
    // SIGTERM stops it cleanly
    run_ok(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()),
    );
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn identity_matrix_from_the_command_line() {
    let server = TestServer::start();
    let d = s(server.data_dir()).to_string();
    let tmp = temp_dir("cli-matrix");
    let (public, secret) = minisign_keypair(tmp.path().join("k"));
    trust_key(&d, None, &public);
    imgsrv(&["principal", "add", "--data", &d, "--kind", "service", "ci"]);
    imgsrv(&[
        "grant",
        "add",
        "--data",
        &d,
        "ci",
        "content-writer",
        "debian-*",
    ]);
    let bad = run_any(Command::new(IMGSRV).args(["grant", "add", "--data", &d, "ci", "root", "*"]));
    assert!(
        !bad.status.success() && text(&bad).contains("unknown role"),
        "{}",
        text(&bad)
    );
    let bad = run_any(Command::new(IMGSRV).args([
        "grant",
        "add",
        "--data",
        &d,
        "ci",
        "auth-manager",
        "debian-*",
    ]));
    assert!(!bad.status.success(), "auth-manager is global");
    let issued = imgsrv(&["token", "issue", "--data", &d, "--expires", "30d", "ci"]);
    let token = last_line(&issued);
    assert!(token.starts_with("imgsrv_"), "{}", text(&issued));
    let token_id = token.split('_').nth(1).unwrap().to_string();

    let matrix = text(&imgsrv(&["auth", "matrix", "--data", &d]));
    let header = matrix.lines().next().unwrap();
    for col in [
        "PRINCIPAL",
        "AUTH-MANAGER",
        "CONTENT-WRITER",
        "READER",
        "TOKENS",
    ] {
        assert!(header.contains(col), "{matrix}");
    }
    let ci: Vec<&str> = matrix
        .lines()
        .find(|l| l.starts_with("ci "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(ci, ["ci", "service", "-", "debian-*", "-", "1"], "{matrix}");

    // the running server honours the new principal at once, within its scope only
    let publish = |image: &str, tok: &str| {
        let img = make_test_image(tmp.path().join(image), &["--serial", "20260401_0000"]);
        run_any(
            client(&server)
                .env("IMGSRV_TOKEN", tok)
                .args(["publish", "--key", s(&secret), "--image", image])
                .arg(&img.metadata)
                .arg(img.rootfs()),
        )
    };
    let ok = publish("debian-ci", &token);
    assert!(ok.status.success(), "{}", text(&ok));
    let out_of_scope = publish("ubuntu-ci", &token);
    assert!(
        !out_of_scope.status.success() && text(&out_of_scope).contains("403"),
        "{}",
        text(&out_of_scope)
    );

    imgsrv(&["token", "revoke", "--data", &d, &token_id]);
    let revoked = publish("debian-ci2", &token);
    assert!(text(&revoked).contains("401"), "{}", text(&revoked));

    // every change is in the audit log, local ones with the operator's name
    let audit = imgsrv(&["audit", "--data", &d, "--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for action in [
        "key.add",
        "principal.add",
        "grant.add",
        "token.issue",
        "token.revoke",
    ] {
        let r = rows
            .iter()
            .find(|r| r["action"] == action)
            .unwrap_or_else(|| panic!("{action} not audited"));
        assert!(
            r["principal_name"].as_str().unwrap().starts_with("local:"),
            "{r}"
        );
    }
    assert!(rows
        .iter()
        .any(|r| r["action"] == "publish" && r["outcome"] == "ok" && r["principal_name"] == "ci"));
    assert!(
        rows.iter()
            .any(|r| r["outcome"] == "denied" && r["principal_name"] == "ci"),
        "the 403 is audited"
    );
    let filtered = text(&imgsrv(&[
        "audit",
        "--data",
        &d,
        "--principal",
        "ci",
        "--outcome",
        "denied",
    ]));
    assert_eq!(filtered.lines().count(), 1, "{filtered}");

    // the last auth-manager cannot be removed by accident
    let last = run_any(Command::new(IMGSRV).args(["principal", "remove", "--data", &d, "admin"]));
    assert!(
        !last.status.success() && text(&last).contains("last"),
        "{}",
        text(&last)
    );
    imgsrv(&[
        "grant",
        "rm",
        "--data",
        &d,
        "ci",
        "content-writer",
        "debian-*",
    ]);
    imgsrv(&["principal", "remove", "--data", &d, "ci"]);
    assert!(!text(&imgsrv(&["principal", "list", "--data", &d])).contains("ci "));
}

/// Issue acceptance: long uploads show a progress bar on a terminal (and
/// only there: piped output stays clean for scripts). The terminal is a real
/// pty, made by `script` (util-linux).
#[test]
fn publish_shows_progress_bars_on_a_terminal_only() {
    let server = TestServer::start();
    let tmp = temp_dir("cli-progress");
    let (public, secret) = minisign_keypair(tmp.path().join("k"));
    trust_key(server.data_dir(), None, &public);
    let image = |serial: &str| {
        make_test_image(
            tmp.path().join(serial),
            &["--serial", serial, "--pad-mib", "8"],
        )
    };
    let argv = |img: &TestImage| -> Vec<String> {
        [&secret, &img.metadata, img.rootfs()]
            .iter()
            .map(|p| s(p).to_string())
            .collect()
    };

    let on_tty = image("20260401_0000");
    let a = argv(&on_tty);
    let mut pty = on_pty(&[IMGSRV, "publish", "--key", &a[0], &a[1], &a[2]]);
    let out = run_ok(
        pty.env("IMGSRV_SERVER", server.url())
            .env("IMGSRV_CA", server.cert())
            .env("IMGSRV_TOKEN", server.admin_token()),
    );
    let shown = text(&out);
    assert!(shown.contains("rootfs.squashfs"), "{shown}");
    assert!(shown.contains("hashing"), "{shown}");
    assert!(shown.contains("[="), "no bar drawn: {shown}");

    let piped = image("20260402_0000");
    let a = argv(&piped);
    let out = run_ok(client(&server).args(["publish", "--key", &a[0], &a[1], &a[2]]));
    let quiet = text(&out);
    assert!(quiet.contains("20260402_0000"), "{quiet}");
    assert!(
        !quiet.contains("hashing") && !quiet.contains("[="),
        "{quiet}"
    );
}

/// One server per data directory: a second `imgsrv serve` on a data
/// directory in use exits non-zero naming the first one's PID; the commands
/// that only run catalog transactions work beside the first meanwhile; once
/// it is gone (stopped, or killed outright: the kernel drops its lock, the
/// file left behind does not matter), a new server starts.
#[test]
fn one_server_per_data_directory() {
    let mut server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let d = s(&data).to_string();
    let pid = server.pid().expect("running");
    let second = run_within(
        Command::new(IMGSRV).args(["serve", "--data", &d, "--listen", "127.0.0.1:0"]),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    assert!(
        err.contains(&format!(
            "another imgsrv serve (PID {pid}) is already serving"
        )) && err.contains(&format!("`kill {pid}`"))
            && err.contains("serve.lock"),
        "{err}"
    );
    assert!(!err.contains("imgsrv serving"), "{err}");
    let lock = std::fs::read_to_string(data.join("serve.lock")).unwrap();
    assert_eq!(lock.trim(), pid.to_string());
    assert_eq!(
        server.get("/healthz").0,
        204,
        "the first server is untouched"
    );

    // catalog commands beside it, seen by it at once
    let (public, _) = minisign_keypair(server.scratch().join("keys"));
    trust_key(&data, Some("beside"), &public);
    assert!(text(&imgsrv(&["key", "list", "--data", &d])).contains("beside"));
    imgsrv(&[
        "principal",
        "add",
        "--data",
        &d,
        "--kind",
        "service",
        "beside",
    ]);
    imgsrv(&[
        "grant",
        "add",
        "--data",
        &d,
        "beside",
        "content-writer",
        "*",
    ]);
    let token = last_line(&imgsrv(&["token", "issue", "--data", &d, "beside"]));
    let matrix = text(&imgsrv(&["auth", "matrix", "--data", &d]));
    assert!(matrix.contains("beside"), "{matrix}");
    let audit = text(&imgsrv(&["audit", "--data", &d, "--action", "token."]));
    assert!(audit.contains("token.issue"), "{audit}");
    let status = server
        .agent()
        .post(format!("{}/v1/images", server.url()))
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(r#"{"name": "made-beside"}"#)
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(
        status, 201,
        "the token issued beside the server works there"
    );

    // stopped: the next one starts
    server.kill();
    server.spawn();
    // killed outright: the lock goes with the process
    let pid = server.pid().expect("running");
    run_ok(Command::new("kill").args(["-KILL", &pid.to_string()]));
    server.kill();
    server.spawn();
    assert_eq!(server.get("/healthz").0, 204);
    let lock = std::fs::read_to_string(data.join("serve.lock")).unwrap();
    assert_eq!(lock.trim(), server.pid().unwrap().to_string());
}

/// Issue 7.7: `imgsrv --version` names the SQLite built into the binary, and it has the
/// 2025 fixes (CVE-2025-29087, CVE-2025-3277, CVE-2025-6965: 3.50.2 or newer).
#[test]
fn version_names_the_bundled_sqlite() {
    let out = imgsrv(&["--version"]);
    let line = text(&out);
    let v = line
        .split("SQLite ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no SQLite version in {line:?}"));
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().expect("number")).collect();
    assert!(
        parts.as_slice() >= [3, 50, 2].as_slice(),
        "bundled SQLite {v} predates 3.50.2: {line}"
    );
    assert!(
        line.starts_with(&format!("imgsrv {}", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
}

/// Issue 9: `imgsrv serve` says what to do next when it starts: the URL, the
/// certificate's SHA-256 fingerprint (what openssl computes, and the form
/// incus shows), the two `incus remote add` lines and where the admin token is.
#[test]
fn serve_prints_the_next_steps_with_the_certificate_fingerprint() {
    let server = TestServer::start();
    let log = server.log_text();
    let openssl = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(server.cert()),
    );
    let expected = String::from_utf8_lossy(&openssl.stdout)
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(expected.len(), 95, "{expected}");
    let line = log
        .lines()
        .find(|l| l.contains("SHA-256 fingerprint"))
        .unwrap_or_else(|| panic!("no fingerprint line in\n{log}"));
    let shown = line
        .split("SHA-256 fingerprint ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    assert_eq!(shown, expected, "{line}");
    let incus_form = expected.replace(':', "").to_lowercase();
    assert!(line.contains(&incus_form), "{line}");
    let url = server.url();
    assert!(
        log.contains(&format!("incus remote add imgsrv {url} ")),
        "no Incus protocol line for {url}:\n{log}"
    );
    assert!(
        log.contains(&format!("{url} --protocol=simplestreams")),
        "no Simple Streams line:\n{log}"
    );
    let token = server.admin_token_file();
    assert!(
        log.contains(&format!("the admin API token is in {}", token.display())),
        "{log}"
    );
}

/// Without `--ca` the client trusts the system store (`SSL_CERT_FILE` here), over
/// the same TLS transport as with it: a root of several MiB goes up in batched TLS
/// writes and the server takes the fingerprint Incus computes. With neither, the
/// self-signed server is refused and nothing is published.
#[test]
fn publish_without_ca_trusts_the_system_store() {
    let server = TestServer::start();
    let tmp = temp_dir("cli-system-trust");
    let (public, secret) = minisign_keypair(tmp.path().join("k"));
    trust_key(server.data_dir(), None, &public);
    let img = make_test_image(tmp.path().join("img"), &["--pad-mib", "5"]);
    let publish = |cert: Option<&Path>| {
        let mut c = client(&server);
        c.env_remove("IMGSRV_CA").env_remove("SSL_CERT_FILE");
        if let Some(cert) = cert {
            c.env("SSL_CERT_FILE", cert);
        }
        run_any(
            c.arg("publish")
                .arg("--key")
                .arg(&secret)
                .arg(&img.metadata)
                .arg(img.rootfs()),
        )
    };
    let refused = publish(None);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).to_lowercase().contains("certificate"),
        "{}",
        text(&refused)
    );
    let listed = text(&run_ok(client(&server).args(["list", "--format", "csv"])));
    assert_eq!(listed.lines().count(), 1, "{listed}");

    let ok = publish(Some(&server.cert()));
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains(&img.container_fingerprint()),
        "{}",
        text(&ok)
    );
    // a consumer with no --ca either: the bytes it downloads are the ones signed
    let verified = run_any(
        Command::new(IMGSRV)
            .env_remove("IMGSRV_CA")
            .env_remove("IMGSRV_TOKEN")
            .env("SSL_CERT_FILE", server.cert())
            .env("HOME", tmp.path())
            .args(["verify", "--server", &server.url(), "--trusted-keys"])
            .arg(&public)
            .arg("debian-bookworm"),
    );
    assert!(verified.status.success(), "{}", text(&verified));
}
