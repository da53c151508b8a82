//! Issue 10, the storage seam: `[storage]` in the config picks the catalog and
//! blob backends, and every command opens them in one place. The real `imgsrv`
//! binary.

mod support;

use std::fs;
use std::process::Command;

use support::*;

/// A data directory whose config names other backends.
fn data_with(storage: &str) -> tempfile::TempDir {
    let root = temp_dir("storage");
    let data = root.path();
    run_ok(Command::new(IMGSRV).args(["init", "--data", s(data)]));
    let cfg = data.join("imgsrv.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(storage);
    fs::write(&cfg, text).unwrap();
    root
}

/// A mistake in `[storage]` stops every command with what to write instead, and
/// changes nothing in the data directory.
#[test]
fn a_wrong_storage_section_says_what_to_write() {
    for (section, says) in [
        (
            "\n[storage]\ncatalog = \"mysql\"\n",
            "[storage] catalog = \"mysql\" is not one of \"sqlite\", \"postgres\"",
        ),
        (
            "\n[storage]\nblobs = \"s3\"\n",
            "[storage] blobs = \"s3\" needs a [storage.s3] section",
        ),
        (
            "\n[storage]\ncatalog = \"postgres\"\n",
            "needs postgres_url = \"postgresql://USER@HOST:5432/DB\"",
        ),
    ] {
        let root = data_with(section);
        let data = root.path();
        let before = fs::read_dir(data).unwrap().count();
        for args in [
            vec!["serve", "--data", s(data), "--listen", "127.0.0.1:0"],
            vec!["audit", "--data", s(data)],
            vec!["gc", "--data", s(data), "--dry-run"],
        ] {
            let o = Command::new(IMGSRV)
                .args(&args)
                .env_remove("IMGSRV_POSTGRES_URL")
                .output()
                .unwrap();
            let t = text(&o);
            assert!(!o.status.success(), "{args:?} succeeded:\n{t}");
            assert!(t.contains(says), "{args:?}: {t}");
        }
        assert_eq!(fs::read_dir(data).unwrap().count(), before);
    }
}

/// The default build is the embedded appliance: a config that names PostgreSQL or
/// S3 is refused with how to build an imgsrv that has them.
#[cfg(not(feature = "postgres"))]
#[test]
fn a_default_build_names_the_feature_it_lacks() {
    let root = data_with(
        "\n[storage]\ncatalog = \"postgres\"\npostgres_url = \"postgresql://imgsrv@127.0.0.1/imgsrv\"\n",
    );
    let o = Command::new(IMGSRV)
        .args(["audit", "--data", s(root.path())])
        .env_remove("IMGSRV_POSTGRES_URL")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("built without PostgreSQL support")
            && t.contains("cargo build --release --features full"),
        "{t}"
    );
}

#[cfg(not(feature = "s3"))]
#[test]
fn a_default_build_names_the_s3_feature_it_lacks() {
    let root = data_with(
        "\n[storage]\nblobs = \"s3\"\n[storage.s3]\nendpoint = \"http://127.0.0.1:3900\"\n\
         bucket = \"imgsrv\"\naccess_key_id = \"GK1\"\n",
    );
    let o = Command::new(IMGSRV)
        .args(["gc", "--data", s(root.path()), "--dry-run"])
        .env("IMGSRV_S3_SECRET_ACCESS_KEY", "not-shown-anywhere")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("built without S3 support"), "{t}");
    assert!(!t.contains("not-shown-anywhere"), "{t}");
}

/// `imgsrv migrate` in the default build says which build moves an appliance onto
/// PostgreSQL and S3, before it opens anything.
#[cfg(not(all(feature = "postgres", feature = "s3")))]
#[test]
fn a_default_build_says_which_build_migrates() {
    let root = temp_dir("storage-migrate");
    let from = root.path().join("appliance");
    run_ok(Command::new(IMGSRV).args(["init", "--data", s(&from)]));
    let deploy = root.path().join("deploy");
    fs::create_dir(&deploy).unwrap();
    let to = deploy.join("imgsrv.toml");
    fs::write(
        &to,
        "[storage]\ncatalog = \"postgres\"\npostgres_url = \"postgresql://imgsrv@127.0.0.1/imgsrv\"\n\
         blobs = \"s3\"\n[storage.s3]\nendpoint = \"http://127.0.0.1:3900\"\nbucket = \"imgsrv\"\n\
         access_key_id = \"GK1\"\n",
    )
    .unwrap();
    let listing = |d: &std::path::Path| {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&from);
    let o = Command::new(IMGSRV)
        .args(["migrate", "--from", s(&from), "--to", s(&to)])
        .env("IMGSRV_S3_SECRET_ACCESS_KEY", "not-shown-anywhere")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("built without")
            && t.contains("--features full")
            && t.contains("nothing was changed"),
        "{t}"
    );
    assert_eq!(
        fs::read_dir(&deploy).unwrap().count(),
        1,
        "nothing beside the config"
    );
    assert_eq!(listing(&from), before, "nothing new in the appliance");
}
