//! `imgsrv list` (through the API, as any client) and `imgsrv token list` (on the data
//! directory): the table, JSON and CSV outputs, parsed and checked against what was
//! published and issued.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use support::*;

/// `imgsrv list ARGS` against `server` (with `token`, if any): stdout.
fn list(server: &TestServer, token: Option<&str>, args: &[&str]) -> String {
    let mut c = Command::new(IMGSRV);
    c.arg("list")
        .args(["--server", &server.url(), "--ca", s(&server.cert())])
        .args(args)
        .env_remove("IMGSRV_TOKEN");
    if let Some(t) = token {
        c.env("IMGSRV_TOKEN", t);
    }
    String::from_utf8(run_ok(&mut c).stdout).unwrap()
}

/// The cells of a box table (`| a | b |` lines between `+---+` rules): the header, then
/// the rows.
fn table_cells(t: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in t.lines() {
        if line.starts_with('+') {
            assert!(line.chars().all(|c| c == '+' || c == '-'), "rule {line:?}");
            continue;
        }
        assert!(line.starts_with('|') && line.ends_with('|'), "{line:?}");
        out.push(
            line[1..line.len() - 1]
                .split('|')
                .map(|c| c.trim().to_string())
                .collect(),
        );
    }
    out
}

fn csv_records(text: &str) -> Vec<csv::StringRecord> {
    csv::Reader::from_reader(text.as_bytes())
        .records()
        .map(|r| r.expect("CSV record"))
        .collect()
}

#[test]
fn list_prints_what_was_published_as_a_table_json_and_csv() {
    let server = TestServer::start();
    let tmp = temp_dir("listing");
    let (public, secret) = minisign_keypair(tmp.path().join("k"));
    trust_key(server.data_dir(), None, &public);
    let img = make_test_image(
        tmp.path().join("img"),
        &[
            "--os",
            "Ubuntu",
            "--release",
            "noble",
            "--serial",
            "20260501_0600",
            "--type",
            "both",
        ],
    );
    publish_image(
        &server,
        &secret,
        &img,
        &[
            "--image",
            "ubuntu-noble",
            "--alias",
            "stable",
            "--alias",
            "lts",
        ],
    );
    let private = make_test_image(tmp.path().join("private"), &["--serial", "20260502_0000"]);
    publish_image(
        &server,
        &secret,
        &private,
        &["--image", "inhouse", "--private"],
    );
    let admin = server.admin_token();
    let sizes = (
        fs::metadata(img.rootfs()).unwrap().len(),
        fs::metadata(img.disk()).unwrap().len(),
    );
    let expected = [
        (
            "container",
            img.container_fingerprint(),
            sizes.0,
            "squashfs",
        ),
        ("virtual-machine", img.vm_fingerprint(), sizes.1, "qcow2"),
    ];

    // JSON: every field
    let rows: Value =
        serde_json::from_str(&list(&server, Some(&admin), &["--format", "json"])).unwrap();
    let rows = rows.as_array().unwrap();
    let noble: Vec<&Value> = rows
        .iter()
        .filter(|r| r["image"] == "ubuntu-noble")
        .collect();
    assert_eq!(noble.len(), 2, "{rows:?}");
    for (r, (kind, fp, size, format)) in noble.iter().zip(&expected) {
        assert_eq!(r["version"], "20260501_0600");
        assert_eq!(r["state"], "published");
        assert_eq!(
            (r["os"].as_str(), r["release"].as_str()),
            (Some("Ubuntu"), Some("noble"))
        );
        assert_eq!(r["variant"], "default");
        assert_eq!(r["architecture"], "x86_64");
        assert_eq!(r["type"], *kind);
        assert_eq!(r["fingerprint"], fp.as_str());
        assert_eq!(r["size_bytes"], *size);
        assert_eq!(r["format"], *format);
        let aliases: BTreeSet<&str> = r["aliases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(aliases, BTreeSet::from(["lts", "stable"]));
        let at = r["published_at"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
    }
    assert!(
        rows.iter().any(|r| r["image"] == "inhouse"),
        "the admin reads private images"
    );

    // CSV: the same, one record per artifact, with a header
    let csv_text = list(&server, Some(&admin), &["--format", "csv", "ubuntu-noble"]);
    assert!(
        csv_text.starts_with(
            "image,version,os,release,variant,architecture,type,fingerprint,size_bytes,published_at,aliases,state,format,artifact_id\n"
        ),
        "{csv_text}"
    );
    let records = csv_records(&csv_text);
    assert_eq!(records.len(), 2, "{csv_text}");
    for (r, (kind, fp, size, _)) in records.iter().zip(&expected) {
        assert_eq!(&r[0], "ubuntu-noble");
        assert_eq!(&r[6], *kind);
        assert_eq!(&r[7], fp.as_str());
        assert_eq!(r[8].parse::<u64>().unwrap(), *size);
        assert_eq!(&r[11], "published");
        let aliases: BTreeSet<&str> = r[10].split(' ').collect();
        assert_eq!(aliases, BTreeSet::from(["lts", "stable"]));
    }

    // the table, as the Incus tools draw it: fingerprints cut to 12, sizes for people
    let table = list(&server, None, &[]);
    let cells = table_cells(&table);
    assert_eq!(
        cells[0],
        [
            "IMAGE",
            "VERSION",
            "OS",
            "RELEASE",
            "VARIANT",
            "ARCHITECTURE",
            "TYPE",
            "FINGERPRINT",
            "SIZE",
            "DATE",
            "ALIASES"
        ]
    );
    let body = &cells[1..];
    assert_eq!(body.len(), 2, "anonymous: the public image only\n{table}");
    for (r, (kind, fp, size, _)) in body.iter().zip(&expected) {
        assert_eq!(
            &r[..8],
            [
                "ubuntu-noble",
                "20260501_0600",
                "Ubuntu",
                "noble",
                "default",
                "x86_64",
                kind,
                &fp[..12]
            ]
        );
        let kib = *size as f64 / 1024.0;
        assert_eq!(r[8], format!("{kib:.1} KiB"), "{table}");
        assert!(
            r[9].ends_with(" UTC") && r[9].len() == "2026/05/01 06:00 UTC".len(),
            "{}",
            r[9]
        );
        assert!(r[10].contains("stable") && r[10].contains("lts"));
    }
    assert!(!table.contains("inhouse"), "{table}");

    // a draft, for its writer: no fingerprint, no date yet; nobody else sees it
    let (status, body) = curl(
        &server,
        &format!("{}/v1/images/ubuntu-noble/versions", server.url()),
        Some(&admin),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"version":"20260601_0000"}"#,
        ],
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let records = csv_records(&list(
        &server,
        Some(&admin),
        &["--format", "csv", "ubuntu-noble"],
    ));
    let draft = records
        .iter()
        .find(|r| &r[1] == "20260601_0000")
        .expect("the draft is listed for its writer");
    assert_eq!((&draft[7], &draft[9], &draft[11]), ("", "", "draft"));
    let table = list(&server, Some(&admin), &["ubuntu-noble"]);
    let row = table_cells(&table)
        .into_iter()
        .find(|r| r[1] == "20260601_0000")
        .unwrap();
    assert_eq!(
        (row[7].as_str(), row[9].as_str()),
        ("-", "draft"),
        "{table}"
    );
    assert!(!list(&server, None, &["ubuntu-noble"]).contains("20260601_0000"));

    // bad input: a clear refusal, exit 2 from clap
    let bad =
        run_any(Command::new(IMGSRV).args(["list", "--server", &server.url(), "--format", "yaml"]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("table, json, csv"), "{}", text(&bad));
    // an image nobody may see is a 404, not an empty list
    let missing = run_any(
        Command::new(IMGSRV)
            .args([
                "list",
                "--server",
                &server.url(),
                "--ca",
                s(&server.cert()),
                "inhouse",
            ])
            .env_remove("IMGSRV_TOKEN"),
    );
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(text(&missing).contains("404"), "{}", text(&missing));
}

#[test]
fn token_list_shows_every_token_but_never_a_secret() {
    let tmp = temp_dir("token-list");
    let d = tmp.path().join("data");
    let d = s(&d);
    imgsrv(&["init", "--data", d]);
    imgsrv(&["principal", "add", "--data", d, "ci", "--kind", "service"]);
    let issued = text(&imgsrv(&[
        "token",
        "issue",
        "--data",
        d,
        "--name",
        "pipeline",
        "--expires",
        "30d",
        "ci",
    ]));
    let plaintext = issued.lines().last().unwrap().trim().to_string();
    let id = issued
        .split_whitespace()
        .nth(1)
        .expect("token ID in the first line")
        .to_string();
    let secret_part = plaintext.rsplit('_').next().unwrap().to_string();
    assert!(secret_part.len() >= 32, "{plaintext}");
    let other = last_line(&imgsrv(&[
        "token",
        "issue",
        "--data",
        d,
        "--name",
        "old",
        "--expires",
        "never",
        "ci",
    ]));
    let other_id = other.split('_').nth(1).unwrap().to_string();
    imgsrv(&["token", "revoke", "--data", d, &other_id]);

    for format in ["table", "json", "csv"] {
        let out = text(&imgsrv(&["token", "list", "--data", d, "--format", format]));
        for secret in [&plaintext, &secret_part, &other] {
            assert!(
                !out.contains(secret.as_str()),
                "{format} shows a secret:\n{out}"
            );
        }
        assert!(out.contains(&id) && out.contains(&other_id), "{out}");
    }
    let rows: Value = serde_json::from_str(&text(&imgsrv(&[
        "token", "list", "--data", d, "--format", "json", "ci",
    ])))
    .unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "only ci's tokens: {rows:?}");
    let pipeline = rows.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(pipeline["principal"], "ci");
    assert_eq!(pipeline["name"], "pipeline");
    assert_eq!(pipeline["state"], "active");
    assert!(pipeline["last_used_at"].is_null());
    assert!(pipeline["revoked_at"].is_null());
    let expires =
        chrono::DateTime::parse_from_rfc3339(pipeline["expires_at"].as_str().unwrap()).unwrap();
    let days = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_hours() / 24;
    assert!((29..=30).contains(&days), "{days}");
    let old = rows.iter().find(|r| r["id"] == other_id.as_str()).unwrap();
    assert_eq!(old["state"], "revoked");
    assert!(old["expires_at"].is_null() && old["revoked_at"].is_string());

    // the table: every principal (the bootstrap admin too), with what it may read
    let table = text(&imgsrv(&["token", "list", "--data", d]));
    let cells = table_cells(&table);
    assert_eq!(
        cells[0],
        [
            "ID",
            "PRINCIPAL",
            "NAME",
            "STATE",
            "CREATED",
            "EXPIRES",
            "LAST USED",
            "REVOKED"
        ]
    );
    let row = cells.iter().find(|r| r[0] == id).expect("pipeline row");
    assert_eq!(&row[1..4], ["ci", "pipeline", "active"]);
    assert_eq!(row[6], "never", "never used");
    assert!(
        cells.iter().any(|r| r[1] == "admin" && r[2] == "bootstrap"),
        "{table}"
    );
    let csv_text = text(&imgsrv(&["token", "list", "--data", d, "--format", "csv"]));
    let records = csv_records(&csv_text);
    assert_eq!(records.len(), 3, "{csv_text}");

    // last use appears once the token was used
    let mut server = TestServer::start_in(tmp.path().join("data").as_path());
    let (status, _) = curl(
        &server,
        &format!("{}/v1/images", server.url()),
        Some(&plaintext),
        &[],
    );
    assert_eq!(status, 200);
    server.kill();
    let rows: Value = serde_json::from_str(&text(&imgsrv(&[
        "token", "list", "--data", d, "--format", "json", "ci",
    ])))
    .unwrap();
    let used = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert!(used["last_used_at"].is_string(), "{used}");

    // an unknown principal: said so, nothing printed
    let unknown = run_any(Command::new(IMGSRV).args(["token", "list", "--data", d, "nobody"]));
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown).contains("nobody"), "{}", text(&unknown));
}
