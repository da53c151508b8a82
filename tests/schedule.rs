//! Continuous mirroring: `imgsrv serve` runs its `[[mirror]]` jobs, and the
//! last run's outcome is visible in the log, `GET /v1/mirrors` and
//! `imgsrv mirrors`.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::*;

fn mirrors(server: &TestServer) -> Value {
    let mut resp = server
        .agent()
        .get(format!("{}/v1/mirrors", server.url()))
        .header("Authorization", &format!("Bearer {}", server.admin_token()))
        .call()
        .expect("GET /v1/mirrors");
    assert_eq!(resp.status().as_u16(), 200);
    serde_json::from_reader(resp.body_mut().as_reader()).unwrap()
}

/// Waits until the job has finished `runs` runs.
fn wait_runs(server: &TestServer, runs: u64) -> Value {
    let t = Instant::now();
    loop {
        let m = mirrors(server);
        let job = m["mirrors"][0].clone();
        if job["runs"].as_u64().unwrap_or(0) >= runs && job["state"] == "idle" {
            return job;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job did not run: {m}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn serve_runs_mirror_jobs_and_reports_their_outcome() {
    // the upstream: another imgsrv with one published image
    let upstream = TestServer::start();
    let tmp = temp_dir("schedule");
    let (pubkey, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust_key(upstream.data_dir(), None, &pubkey);
    let img = make_test_image(tmp.path().join("img"), &["--serial", "20260501_0000"]);
    publish_image(&upstream, &secret, &img, &[]);

    // the mirror signs with its own key, which the downstream must trust
    let (mirror_pub, mirror_secret) = minisign_keypair(tmp.path().join("mirror"));
    let config = format!(
        "[[mirror]]\nname = \"upstream-a\"\nupstream = \"{}\"\nupstream_ca = \"{}\"\nkey = \"{}\"\ninterval = \"1h\"\n",
        upstream.url(),
        upstream.cert().display(),
        mirror_secret.display()
    );
    let mut down = TestServer::start_with(&config);
    let data = down.data_dir().to_str().unwrap().to_string();

    // first run: the mirror key is not trusted yet, so the run stops before
    // downloading anything (issue 9), saying how to trust it
    let job = wait_runs(&down, 1);
    assert_eq!(job["name"], "upstream-a");
    // (the run could not start: an error, not a run with failed versions)
    assert_eq!(job["last_outcome"], "error", "{job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("does not trust the signing key"),
        "{job}"
    );
    let status =
        String::from_utf8_lossy(&imgsrv(&["mirrors", "--data", &data]).stdout).into_owned();
    assert!(
        status.contains("upstream-a") && status.contains("error"),
        "{status}"
    );
    assert!(
        down.log_text().contains("mirror upstream-a"),
        "the run is logged"
    );
    let metrics = down.scrape();
    let line = "imgsrv_background_job_attempts_total{job=\"mirror\",outcome=\"error\"} 1\n";
    assert!(metrics.contains(line), "{line} in\n{metrics}");
    // nothing was staged, so nothing was refused
    assert!(
        !metrics.contains("imgsrv_publishes_total{outcome=\"refused\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("imgsrv_background_job_last_error_timestamp_seconds{job=\"mirror\"} "));
    assert!(
        !metrics.contains("imgsrv_background_job_last_success_timestamp_seconds{job=\"mirror\"}")
    );

    // trust the mirror key; a restart runs the job again at once
    trust_key(&data, Some("mirror"), &mirror_pub);
    down.kill();
    down.spawn();
    let job = wait_runs(&down, 2);
    assert_eq!(job["last_outcome"], "ok", "{job}");
    assert_eq!(job["last_summary"]["mirrored"], 1, "{job}");
    assert!(job["next_run"].is_string());
    // (a new process: its counters start again)
    let metrics = down.scrape();
    let line = "imgsrv_background_job_attempts_total{job=\"mirror\",outcome=\"success\"} 1\n";
    assert!(metrics.contains(line), "{line} in\n{metrics}");
    let when: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("imgsrv_background_job_last_success_timestamp_seconds{job=\"mirror\"} ")
        })
        .expect("a last success")
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 120.0..=now + 1.0).contains(&when), "{when} vs {now}");
    let images = down
        .agent()
        .get(format!("{}/v1/images", down.url()))
        .call()
        .unwrap();
    let images: Value = serde_json::from_reader(images.into_body().as_reader()).unwrap();
    assert_eq!(images["images"][0]["name"], "debian-bookworm", "{images}");

    // the publication is recorded as the job's
    let audit = imgsrv(&[
        "audit",
        "--data",
        &data,
        "--action",
        "publish",
        "--outcome",
        "ok",
        "--json",
    ]);
    let rows: Vec<Value> = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r["principal_name"] == "mirror:upstream-a"),
        "{rows:?}"
    );

    // anonymous callers may not read the operators' status
    let anon = down
        .agent()
        .get(format!("{}/v1/mirrors", down.url()))
        .call()
        .unwrap();
    assert_eq!(anon.status().as_u16(), 401);
}

#[test]
fn a_broken_mirror_entry_stops_the_server_with_a_clear_error() {
    let tmp = temp_dir("schedule-bad");
    let d = tmp.path().join("data");
    imgsrv(&["init", "--data", d.to_str().unwrap()]);
    for (cfg, needle) in [
        ("[[mirror]]\nupstream = \"https://x\"\nkey = \"/nonexistent\"\n", "needs a name"),
        ("[[mirror]]\nname = \"a\"\nupstream = \"https://x\"\nkey = \"/nonexistent\"\n", "not a file"),
        ("[[mirror]]\nname = \"a\"\nupstream = \"https://x\"\nkey = \"/etc/hostname\"\ninterval = \"5s\"\n", "at least"),
        ("[[mirror]]\nname = \"a\"\nupstream = \"https://x\"\nkey = \"/etc/hostname\"\nbogus = 1\n", "bogus"),
    ] {
        std::fs::write(d.join("imgsrv.toml"), cfg).unwrap();
        // a server that accepted the config would run on: stopped (failing the test) at 60 s
        let out = run_within(
            std::process::Command::new(IMGSRV).args(["serve", "--data", s(&d), "--listen", "127.0.0.1:0"]),
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "{cfg}");
        let text = text(&out);
        assert!(text.contains(needle), "{cfg}: {text}");
    }
}
