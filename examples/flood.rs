//! Benchmark client: a connection flood against an HTTPS server while timing normal
//! requests (contrib/bench/flood.sh runs it against imgsrv and Debian's nginx).
//!
//!     cargo run --release --example flood -- ADDR CA_CERT [options]
//!
//! Options: `--idle-tcp N` (3000) TCP connections that send nothing, `--idle-tls N`
//! (3000) that finish TLS and send nothing, both re-opened as the server closes them;
//! `--requests N` (20) normal requests spread over `--seconds S` (25), each on a new
//! TLS connection and counted as unanswered after `--timeout S` (5); `--path P`
//! (`/healthz`); `--name HOST` (`localhost`, the TLS name and Host); `--pid PID[,PID...]` (the
//! server's processes, for their RSS and threads, summed). Prints one summary line; exits 1 when a request
//! was not answered.

#[path = "../tests/support/flood.rs"]
mod flood;

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: flood ADDR CA_CERT [--idle-tcp N] [--idle-tls N] [--requests N] \
                 [--seconds S] [--timeout S] [--path P] [--name HOST] [--pid PID]";
    let target = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let ca = std::path::PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let mut cfg = flood::FloodConfig {
        target,
        server_name: "localhost".into(),
        tls: imgsrv::tls::client_config(Some(&ca))?,
        idle_tcp: 3000,
        idle_tls: 3000,
        requests: 20,
        duration: Duration::from_secs(25),
        path: "/healthz".into(),
        request_timeout: Duration::from_secs(5),
        server_pids: Vec::new(),
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value; {usage}"))?;
        match flag.as_str() {
            "--idle-tcp" => cfg.idle_tcp = value.parse()?,
            "--idle-tls" => cfg.idle_tls = value.parse()?,
            "--requests" => cfg.requests = value.parse()?,
            "--seconds" => cfg.duration = Duration::from_secs_f64(value.parse()?),
            "--timeout" => cfg.request_timeout = Duration::from_secs_f64(value.parse()?),
            "--path" => cfg.path = value,
            "--name" => cfg.server_name = value,
            "--pid" => {
                for p in value.split(',') {
                    cfg.server_pids.push(p.parse()?);
                }
            }
            _ => anyhow::bail!("unknown option {flag}; {usage}"),
        }
    }
    let fds = imgsrv::http::server::raise_fd_limit();
    let need = cfg.idle_tcp + cfg.idle_tls + 64;
    anyhow::ensure!(
        fds >= need,
        "this process may open {fds} files, the flood needs {need}: raise the hard limit (ulimit -Hn)"
    );
    let report = flood::run(&cfg);
    println!("{}", report.summary());
    for f in &report.failures {
        eprintln!("flood: {f}");
    }
    std::process::exit(if report.answered() == report.requests {
        0
    } else {
        1
    });
}
