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
