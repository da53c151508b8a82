//! In-process harness: the real App, catalog and blob store in a temp dir,
//! handlers called without sockets; keys and signatures from the real
//! `minisign` CLI.

use super::run_ok;
use imgsrv::app::{self, App};
use imgsrv::config::Config;
use imgsrv::digest::Digest;
use imgsrv::http::message::Request;
use imgsrv::http::routes::handle;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub app: App,
    pub token: String,
    /// More instances on the same catalog and blob store ([`env_shared`]): every
    /// request goes to the next instance in turn, `app` included.
    pub others: Vec<(tempfile::TempDir, App)>,
    turn: std::cell::Cell<usize>,
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    }
    pub fn detail(&self) -> String {
        self.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Temp dirs for in-process environments: on tmpfs when there is one, since
/// these tests exercise logic, not durability, and the catalog fsyncs.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("imgsrv-test-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

pub fn env_with(config: &str) -> Env {
    let dir = scratch();
    app::init(dir.path(), &[]).unwrap();
    std::fs::write(dir.path().join("imgsrv.toml"), config).unwrap();
    let app = App::open(Config::load(dir.path(), None).unwrap()).unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    Env {
        dir,
        app,
        token,
        others: Vec::new(),
        turn: Default::default(),
    }
}

/// `instances` instances of the App, each with its own data directory holding
/// `config` (written before `imgsrv init`, as an operator does for a deployment whose
/// `[storage]` names a shared catalog and blob store). The first init makes the admin,
/// the others find it; requests go to the instances in turn.
pub fn env_shared(config: &str, instances: usize) -> Env {
    let open = || {
        let dir = scratch();
        std::fs::write(dir.path().join("imgsrv.toml"), config).unwrap();
        app::init(dir.path(), &[]).unwrap();
        let app = App::open(Config::load(dir.path(), None).unwrap()).unwrap();
        (dir, app)
    };
    let (dir, app) = open();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let others = (1..instances).map(|_| open()).collect();
    Env {
        dir,
        app,
        token,
        others,
        turn: Default::default(),
    }
}

pub fn env() -> Env {
    env_with("")
}

impl Env {
    /// The instance that takes the next request.
    fn next_app(&self) -> &App {
        let n = self.turn.get();
        self.turn.set(n.wrapping_add(1));
        match n % (1 + self.others.len()) {
            0 => &self.app,
            i => &self.others[i - 1].1,
        }
    }

    pub fn call_full(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
        extra: &[(&str, &str)],
        secure: bool,
    ) -> Resp {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        let mut req = Request::for_test(method, path, &headers, body.to_vec());
        req.secure = secure;
        let r = handle(self.next_app(), &mut req);
        let status = r.status;
        let headers = r.headers.clone();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            r.body_bytes()
        };
        Resp {
            status,
            headers,
            body,
        }
    }
    pub fn call(&self, method: &str, path: &str, body: Value) -> Resp {
        let b = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        self.call_full(method, path, Some(&self.token), &b, &[], true)
    }
    pub fn anon(&self, method: &str, path: &str) -> Resp {
        self.call_full(method, path, None, &[], &[], true)
    }

    /// `POST /v1/uploads` declaring `digest` and `size`.
    pub fn begin_upload(&self, digest: &Digest, size: usize) -> Resp {
        self.call(
            "POST",
            "/v1/uploads",
            json!({"expected_digest": digest.to_string(), "expected_size_bytes": size}),
        )
    }

    /// `PUT /v1/uploads/ID/parts/N` with `data`.
    pub fn put_part(&self, id: &str, n: u32, data: &[u8]) -> Resp {
        self.call_full(
            "PUT",
            &format!("/v1/uploads/{id}/parts/{n}"),
            Some(&self.token),
            data,
            &[],
            true,
        )
    }

    /// Uploads bytes through a single-part session; returns the digest.
    pub fn upload(&self, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        let r = self.begin_upload(&d, data.len());
        assert!(
            r.status == 201 || r.status == 200,
            "{} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let s = r.json();
        if s["state"] == "ready" {
            return d;
        }
        let id = s["id"].as_str().unwrap().to_string();
        let p = self.put_part(&id, 1, data);
        assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
        let etag = p.json()["etag"].as_str().unwrap().to_string();
        let c = self.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            json!({"parts": [{"number": 1, "etag": etag, "size_bytes": data.len()}]}),
        );
        assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
        assert_eq!(c.json()["state"], "ready");
        d
    }

    /// Creates image `name` (if needed) and draft `ver` with a container
    /// (`root`) and a VM (`disk`) artifact sharing the metadata `meta`.
    pub fn draft(
        &self,
        name: &str,
        ver: &str,
        meta: &[u8],
        root: Option<&[u8]>,
        disk: Option<&[u8]>,
    ) {
        let r = self.call("POST", "/v1/images", json!({"name": name}));
        assert!(r.status == 201 || r.status == 409);
        let md = self.upload(meta);
        let r = self.call(
            "POST",
            &format!("/v1/images/{name}/versions"),
            json!({"version": ver, "metadata": {"os": "Debian", "release": "bookworm", "variant": "default", "serial": ver}}),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        for (data, format) in [(root, "squashfs"), (disk, "qcow2")] {
            let Some(data) = data else { continue };
            let d = self.upload(data);
            let a = self.call(
                "POST",
                &format!("/v1/images/{name}/versions/{ver}/artifacts"),
                json!({"operating_system": "debian", "architecture": "x86_64", "format": format,
                       "primary_blob_digest": d.to_string(), "primary_blob_size_bytes": data.len(),
                       "primary_media_type": "application/octet-stream"}),
            );
            assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
            let id = a.json()["id"].as_str().unwrap().to_string();
            let t = self.call(
                "POST",
                &format!("/v1/images/{name}/versions/{ver}/artifacts/{id}/attachments"),
                json!({"name": "incus.tar.xz", "media_type": "application/x-xz", "blob_digest": md.to_string(), "blob_size_bytes": meta.len()}),
            );
            assert_eq!(t.status, 201, "{}", String::from_utf8_lossy(&t.body));
        }
    }

    pub fn publish(&self, name: &str, ver: &str, signature: Option<String>) -> Resp {
        let body = match signature {
            Some(s) => json!({ "signature": s }),
            None => json!({}),
        };
        self.call(
            "POST",
            &format!("/v1/images/{name}/versions/{ver}/publish"),
            body,
        )
    }

    pub fn manifest(&self, name: &str, ver: &str) -> Vec<u8> {
        let r = self.call(
            "GET",
            &format!("/v1/images/{name}/versions/{ver}/manifest"),
            Value::Null,
        );
        assert_eq!(r.status, 200);
        r.body
    }

    pub fn state(&self, name: &str, ver: &str) -> String {
        let r = self.call(
            "GET",
            &format!("/v1/images/{name}/versions/{ver}"),
            Value::Null,
        );
        r.json()["version"]["state"].as_str().unwrap().to_string()
    }

    pub fn images_json(&self) -> Value {
        let r = self.anon("GET", "/streams/v1/images.json");
        assert_eq!(r.status, 200);
        r.json()
    }
}

/// A minisign key pair made by the stock CLI (unencrypted, `-W`).
pub struct Key {
    pub _dir: tempfile::TempDir,
    pub public: PathBuf,
    pub secret: PathBuf,
}

pub fn keypair() -> Key {
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("k.pub");
    let secret = dir.path().join("k.key");
    run_ok(
        Command::new("minisign")
            .args(["-G", "-W", "-p"])
            .arg(&public)
            .arg("-s")
            .arg(&secret),
    );
    Key {
        _dir: dir,
        public,
        secret,
    }
}

/// Signs `data` with the stock `minisign -S`, returning the .minisig text.
pub fn minisign_sign(key: &Key, data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("manifest.json");
    std::fs::write(&f, data).unwrap();
    run_ok(
        Command::new("minisign")
            .arg("-S")
            .arg("-s")
            .arg(&key.secret)
            .arg("-m")
            .arg(&f)
            .arg("-t")
            .arg("imgsrv test"),
    );
    std::fs::read_to_string(dir.path().join("manifest.json.minisig")).unwrap()
}

/// The catalog of the data directory `dir` (another handle on it, as `imgsrv key
/// ... --data DIR` opens), for the trust store.
pub fn catalog_of(dir: &Path) -> std::sync::Arc<dyn imgsrv::catalog::Catalog> {
    imgsrv::admin_cli::open_catalog(dir).unwrap()
}

pub fn trust(dir: &Path, key: &Key, name: &str) {
    imgsrv::sign::add_trusted_key(catalog_of(dir).as_ref(), Some(name), &key.public, &[]).unwrap();
}

pub const META: &[u8] = b"META";
pub const ROOT: &[u8] = b"ROOT";
pub const DISK: &[u8] = b"DISK";
pub const FP_CONTAINER: &str = "20571674193b3c85da6c0fff589a37adc93f4e23fa923feed99dab1f66076603";
pub const FP_VM: &str = "b467ed7be00d02bca812d15a62f47cc610c11d1870f53364a5683cb0a2fc39ad";
