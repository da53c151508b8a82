//! Issue 9, "rough edges": what a new user hits in the first hour, each with
//! the message that says what to do next. The real `imgsrv` binary, a real
//! `imgsrv serve`, the real `openssl`, `minisign` and `curl`.

mod support;

use std::fs;
use std::process::{Command, Output};

use support::*;

/// `imgsrv ARGS` with none of the IMGSRV_* variables of the caller's shell.
fn clean(args: &[&str]) -> Command {
    let mut c = Command::new(IMGSRV);
    c.args(args);
    for v in ["IMGSRV_SERVER", "IMGSRV_CA", "IMGSRV_TOKEN", "IMGSRV_DATA"] {
        c.env_remove(v);
    }
    c
}

fn show(o: &Output) -> String {
    format!("status {}\n{}", o.status, text(o))
}

/// A server whose certificate is the stock openssl recipe's (self-signed,
/// CA:TRUE): `imgsrv init`, then its tls/cert.pem and key.pem replaced.
fn openssl_server() -> (TestServer, tempfile::TempDir) {
    let root = temp_dir("openssl-server");
    let data = root.path().join("data");
    imgsrv(&["init", "--data", s(&data)]);
    let (cert, key) = openssl_self_signed(root.path(), "server", "127.0.0.1");
    fs::copy(&cert, data.join("tls/cert.pem")).unwrap();
    fs::copy(&key, data.join("tls/key.pem")).unwrap();
    (TestServer::start_in(&data), root)
}

/// `--ca CERT` of the client commands pins the certificate: a self-signed
/// CA:TRUE one made by openssl is accepted (webpki alone says
/// CaUsedAsEndEntity), for the host names it carries.
#[test]
fn client_ca_pins_a_self_signed_openssl_certificate() {
    let (server, _root) = openssl_server();
    let cert = server.cert();
    let list = run_any(&mut clean(&[
        "list",
        "--server",
        &server.url(),
        "--ca",
        s(&cert),
    ]));
    assert!(list.status.success(), "{}", show(&list));
    // the same through IMGSRV_CA
    let list = run_any(clean(&["list", "--server", &server.url()]).env("IMGSRV_CA", &cert));
    assert!(list.status.success(), "{}", show(&list));
    // for another name than the certificate's: refused
    let url = format!("https://localhost:{}", server.port());
    let refused = run_any(&mut clean(&["list", "--server", &url, "--ca", s(&cert)]));
    assert_eq!(refused.status.code(), Some(1), "{}", show(&refused));
    assert!(
        text(&refused).contains("not valid for name"),
        "{}",
        show(&refused)
    );
}

/// Every subcommand, with its path (`imgsrv key add`).
fn subcommands(c: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
    for sub in c.get_subcommands() {
        let p = format!("{path} {}", sub.get_name());
        out.push((p.clone(), sub.clone()));
        subcommands(sub, &p, out);
    }
}

fn all_commands() -> Vec<(String, clap::Command)> {
    use clap::CommandFactory;
    let mut cmd = imgsrv::cli::Cli::command();
    cmd.build();
    let mut out = Vec::new();
    subcommands(&cmd, "imgsrv", &mut out);
    out
}

/// Every command taking --server, --ca or --data reads IMGSRV_SERVER,
/// IMGSRV_CA, IMGSRV_DATA (and `--help` says so); --token-file names
/// IMGSRV_TOKEN, which every such command reads.
#[test]
fn every_site_flag_reads_its_variable_and_help_says_so() {
    let mut checked = 0;
    for (path, c) in all_commands() {
        for a in c.get_arguments() {
            let want = match a.get_long() {
                Some("server") => "IMGSRV_SERVER",
                Some("ca") => "IMGSRV_CA",
                Some("data") => "IMGSRV_DATA",
                Some("token-file") => {
                    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                    assert!(
                        help.contains("IMGSRV_TOKEN"),
                        "{path} --token-file: {help:?}"
                    );
                    continue;
                }
                _ => continue,
            };
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env.as_deref(), Some(want), "{path} --{}", a.get_id());
            checked += 1;
        }
    }
    // export, import, mirror-imgsrv, mirror, publish, ... and the admin commands
    assert!(checked > 40, "only {checked} flags found");
    // and `--help` shows it
    for sub in ["export", "import", "mirror-imgsrv"] {
        let help = text(&imgsrv(&[sub, "--help"]));
        for v in [
            "[env: IMGSRV_SERVER",
            "[env: IMGSRV_CA",
            "[env: IMGSRV_DATA",
            "IMGSRV_TOKEN",
        ] {
            assert!(help.contains(v), "imgsrv {sub} --help lacks {v}:\n{help}");
        }
    }
}

/// export, import and mirror-imgsrv work from the variables alone, and a
/// flag typed wins over the other site's variable.
#[test]
fn export_import_and_mirror_imgsrv_read_the_variables() {
    let server = TestServer::start();
    let keys = temp_dir("env-keys");
    let (public, secret) = minisign_keypair(keys.path());
    trust_key(server.data_dir(), Some("pub"), &public);
    let img = make_test_image(keys.path().join("img"), &["--serial", "20260101_0000"]);
    publish_image(&server, &secret, &img, &["--image", "envtest"]);
    let token = server.admin_token();
    let with_env = |c: &mut Command| {
        c.env("IMGSRV_SERVER", server.url())
            .env("IMGSRV_CA", server.cert())
            .env("IMGSRV_TOKEN", &token);
    };
    // export: the source from IMGSRV_SERVER/CA/TOKEN
    let bundle = keys.path().join("b.tar");
    let mut c = clean(&["export", "-o", s(&bundle)]);
    with_env(&mut c);
    let out = run_any(&mut c);
    assert!(out.status.success(), "{}", show(&out));
    // import with IMGSRV_DATA and IMGSRV_SERVER both set and no flag: ambiguous
    let target = keys.path().join("target");
    imgsrv(&["init", "--data", s(&target)]);
    trust_key(&target, Some("pub"), &public);
    let mut c = clean(&["import", s(&bundle)]);
    with_env(&mut c);
    c.env("IMGSRV_DATA", &target);
    let ambiguous = run_any(&mut c);
    assert_eq!(ambiguous.status.code(), Some(2), "{}", show(&ambiguous));
    assert!(
        text(&ambiguous).contains("both set"),
        "{}",
        show(&ambiguous)
    );
    // IMGSRV_DATA alone
    let out = run_any(clean(&["import", s(&bundle)]).env("IMGSRV_DATA", &target));
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        catalog_sql(&target, "SELECT name FROM images").contains("envtest"),
        "not imported"
    );
    // mirror-imgsrv: --data typed wins over IMGSRV_SERVER
    let target2 = keys.path().join("target2");
    imgsrv(&["init", "--data", s(&target2)]);
    trust_key(&target2, Some("pub"), &public);
    let mut c = clean(&[
        "mirror-imgsrv",
        "--data",
        s(&target2),
        "--upstream-ca",
        s(&server.cert()),
        &server.url(),
    ]);
    with_env(&mut c);
    let out = run_any(&mut c);
    assert!(out.status.success(), "{}", show(&out));
    assert!(catalog_sql(&target2, "SELECT name FROM images").contains("envtest"));
    // and --server typed wins over IMGSRV_DATA (export from the server, not the dir)
    let bundle2 = keys.path().join("b2.tar");
    let mut c = clean(&["export", "--server", &server.url(), "-o", s(&bundle2)]);
    c.env("IMGSRV_CA", server.cert())
        .env("IMGSRV_TOKEN", &token)
        .env("IMGSRV_DATA", keys.path().join("no-such-dir"));
    let out = run_any(&mut c);
    assert!(out.status.success(), "{}", show(&out));
}

/// `audit --since/--until` take a date, an RFC 3339 time or a duration ago,
/// and refuse anything else (before: printed nothing and exit 0).
#[test]
fn audit_since_refuses_what_is_not_a_time() {
    let t = temp_dir("audit-since");
    let data = t.path().join("data");
    imgsrv(&["init", "--data", s(&data)]);
    imgsrv(&["principal", "add", "--data", s(&data), "ci"]);
    for bad in ["yesterday", "2026-13-45"] {
        let out = run_any(&mut clean(&["audit", "--data", s(&data), "--since", bad]));
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", show(&out));
        let msg = text(&out);
        assert!(msg.contains(bad) && msg.contains("24h"), "{bad}: {msg}");
    }
    // a duration ago: the principal just added is there; an hour ahead: nothing
    let recent = text(&imgsrv(&["audit", "--data", s(&data), "--since", "1h"]));
    assert!(recent.contains("principal.add"), "{recent}");
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let none = imgsrv(&["audit", "--data", s(&data), "--since", &tomorrow]);
    assert_eq!(text(&none), "", "rows from tomorrow on");
    let before = imgsrv(&["audit", "--data", s(&data), "--until", &tomorrow]);
    assert!(text(&before).contains("principal.add"));
    // an offset is converted to UTC before comparing
    let later = (chrono::Utc::now() + chrono::Duration::hours(1))
        .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600).unwrap())
        .to_rfc3339();
    let none = imgsrv(&["audit", "--data", s(&data), "--since", &later]);
    assert_eq!(text(&none), "", "--since {later}");
}

/// `imgsrv publish` recognises its files by content, in any order; a file
/// that is none of them is named, with what was expected, and nothing is
/// published.
#[test]
fn publish_takes_its_files_in_any_order() {
    let server = TestServer::start();
    let keys = temp_dir("order-keys");
    let (public, secret) = minisign_keypair(keys.path());
    trust_key(server.data_dir(), Some("pub"), &public);
    let img = make_test_image(
        keys.path().join("img"),
        &["--serial", "20260101_0000", "--type", "both"],
    );
    // disk, rootfs, then the metadata tarball (the helper puts its third
    // argument first)
    let out = publish_files(
        &server,
        &secret,
        img.disk(),
        &[img.rootfs(), &img.metadata],
        &["--image", "ordered"],
    );
    assert!(out.contains(&img.container_fingerprint()), "{out}");
    assert!(out.contains(&img.vm_fingerprint()), "{out}");

    let junk = keys.path().join("README.txt");
    fs::write(&junk, "not an image\n".repeat(100)).unwrap();
    let mut c = clean(&[
        "publish",
        "--server",
        &server.url(),
        "--ca",
        s(&server.cert()),
        "--token-file",
        s(&server.admin_token_file()),
        "--key",
        s(&secret),
        "--image",
        "junk",
        s(img.rootfs()),
        s(&junk),
    ]);
    let out = run_any(&mut c);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("README.txt: not an Incus image file") && msg.contains("incus.tar.xz"),
        "{msg}"
    );
    assert!(msg.lines().count() <= 2, "garbage printed: {msg}");
    assert!(!catalog_sql(server.data_dir(), "SELECT name FROM images").contains("junk"));
}

/// A publish refused because the key's scope does not cover the image says
/// so, and how to widen it (before: "is key ... trusted there?").
#[test]
fn a_publish_out_of_the_keys_scope_says_the_scope_is_why() {
    let server = TestServer::start();
    let keys = temp_dir("scope-keys");
    let (public, secret) = minisign_keypair(keys.path());
    imgsrv(&[
        "key",
        "add",
        "--data",
        s(server.data_dir()),
        "--name",
        "deb",
        "--scope",
        "debian-*",
        s(&public),
    ]);
    let img = make_test_image(keys.path().join("img"), &["--serial", "20260101_0000"]);
    let mut c = clean(&[
        "publish",
        "--server",
        &server.url(),
        "--ca",
        s(&server.cert()),
        "--token-file",
        s(&server.admin_token_file()),
        "--key",
        s(&secret),
        "--image",
        "alpine-edge",
        s(&img.metadata),
        s(img.rootfs()),
    ]);
    let out = run_any(&mut c);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let msg = text(&out);
    assert!(!msg.contains("trusted there"), "{msg}");
    assert!(
        msg.contains("is trusted, but its scope (debian-*) does not cover image \"alpine-edge\""),
        "{msg}"
    );
    assert!(
        msg.contains("imgsrv key scope --data DIR deb --scope GLOB")
            && msg.contains("imgsrv key add --name deb --scope"),
        "{msg}"
    );
    // and doing what it says works: widen the scopes, publish again
    let widened = text(&imgsrv(&[
        "key",
        "scope",
        "--data",
        s(server.data_dir()),
        "deb",
        "--scope",
        "debian-*",
        "--scope",
        "alpine-*",
    ]));
    assert!(
        widened.contains("may sign images debian-*, alpine-*"),
        "{widened}"
    );
    let out = run_any(&mut c);
    assert!(out.status.success(), "{}", show(&out));
}

/// Errors say each cause once and hint at what to do: nothing listening, a
/// certificate not trusted (--ca / IMGSRV_CA), `--listen` given a port alone.
#[test]
fn errors_say_each_cause_once_with_a_hint() {
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let out = run_any(&mut clean(&["list", "--server", &url]));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(msg.matches("os error 111").count(), 1, "{msg}");
    assert!(msg.contains("hint: nothing listens there"), "{msg}");

    // a server whose certificate this machine does not trust
    let server = TestServer::start();
    let out = run_any(&mut clean(&["list", "--server", &server.url()]));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    assert!(
        msg.contains("hint:") && msg.contains("--ca CERT") && msg.contains("IMGSRV_CA"),
        "{msg}"
    );
    assert!(msg.contains("DATA/tls/cert.pem"), "{msg}");

    // serve --listen 8443: the flag, not the config file, and nothing created
    let t = temp_dir("listen");
    let data = t.path().join("data");
    let out = run_any(
        clean(&["serve", "--data", s(&data), "--listen", "8443"]).env_remove("IMGSRV_LISTEN"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let msg = text(&out);
    assert!(
        msg.contains("--listen wants IP:PORT") && msg.contains("0.0.0.0:8443"),
        "{msg}"
    );
    assert!(!msg.contains("imgsrv.toml"), "{msg}");
    assert!(
        !data.exists(),
        "serve made {} before refusing",
        data.display()
    );
}

/// Every argument of every command has a help text, and none points into
/// this repository (a user has the binary, not the source tree).
#[test]
fn every_argument_has_help() {
    let mut missing = Vec::new();
    for (path, c) in all_commands() {
        if c.get_about().is_none() {
            missing.push(format!("{path} (the command)"));
        }
        for a in c.get_arguments() {
            use clap::ArgAction::{Help, HelpLong, HelpShort, Version};
            if matches!(a.get_action(), Help | HelpLong | HelpShort | Version) {
                continue;
            }
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                missing.push(format!("{path} {}", a.get_id()));
            }
        }
    }
    assert!(missing.is_empty(), "no help text: {missing:#?}");
    for (path, c) in all_commands() {
        let mut c = c.clone();
        let help = c.render_long_help().to_string();
        for inside in ["data/trusted-keys", "contrib/", "tests/", "docs/", "src/"] {
            assert!(
                !help.contains(inside),
                "{path} --help names {inside}:\n{help}"
            );
        }
    }
}

/// `imgsrv verify` without --trusted-keys says what to give, without
/// pointing into the source tree.
#[test]
fn verify_without_trusted_keys_says_what_they_are() {
    let out = run_any(
        clean(&["verify", "--server", "https://127.0.0.1:1", "debian"])
            .env("IMGSRV_CLIENT_CONFIG", "/nonexistent/client.toml"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let msg = text(&out);
    assert!(
        msg.contains("minisign -G") && msg.contains("NAME.pub"),
        "{msg}"
    );
    assert!(!msg.contains("data/trusted-keys"), "{msg}");
}

/// contrib/install-test-deps.sh asks apt for the missing packages only (an
/// `apt-get install` of installed ones upgrades them), and for nothing when
/// all are there: run with fake apt-get, dpkg-query and id on PATH.
#[test]
fn install_test_deps_installs_only_what_is_missing() {
    use std::os::unix::fs::PermissionsExt;
    let t = temp_dir("deps");
    let bin = t.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let log = t.path().join("apt.log");
    let tool = |name: &str, body: &str| {
        let p = bin.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    };
    tool("apt-get", &format!("echo \"$*\" >> '{}'", log.display()));
    // every package is installed but those in FAKE_MISSING
    tool(
        "dpkg-query",
        "for p; do :; done\ncase \" $FAKE_MISSING \" in *\" $p \"*) exit 1 ;; esac\necho 'install ok installed'",
    );
    tool("id", "echo 0");
    tool("sstream-query", "exit 0");
    tool("garage", "exit 0");
    let policy = t.path().join("policy-rc.d");
    let run = |missing: &str| {
        let _ = fs::remove_file(&log);
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let out = run_any(
            Command::new("sh")
                .arg(repo_root().join("contrib/install-test-deps.sh"))
                .env("PATH", path)
                .env("FAKE_MISSING", missing)
                .env("IMGSRV_DEPS_POLICY_RC", &policy)
                .env_remove("IMGSRV_DEPS_FORCE"),
        );
        assert!(out.status.success(), "{}", show(&out));
        (text(&out), fs::read_to_string(&log).unwrap_or_default())
    };
    let (out, apt) = run("");
    assert!(out.contains("everything already installed"), "{out}");
    assert_eq!(apt, "", "apt-get asked with everything installed");

    let (out, apt) = run("nginx curl");
    assert!(out.contains("installing: nginx curl\n"), "{out}");
    let calls: Vec<&str> = apt.lines().collect();
    assert_eq!(
        calls,
        [
            "update -q",
            "install -y -q --no-install-recommends nginx curl"
        ],
        "{out}"
    );
    assert!(!policy.exists(), "policy-rc.d left behind");
}
