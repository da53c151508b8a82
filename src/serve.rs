//! `imgsrv serve`: bootstrap, load configuration, serve until SIGTERM/SIGINT.

use crate::app::App;
use crate::config::{Config, VerificationMode};
use crate::http::server::{Handler, Server, ServerConfig};
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;

pub fn serve(data_dir: &Path, listen: Option<&str>) -> anyhow::Result<()> {
    log::info!("imgsrv {}", crate::catalog::versions());
    let report = crate::app::init(data_dir, &[])?;
    for p in &report.created {
        log::info!("created {}", p.display());
    }
    if report.bootstrap_principal.is_some() {
        log::info!(
            "bootstrap admin token written to {}",
            data_dir.join(crate::auth::ADMIN_TOKEN_FILE).display()
        );
    }
    let config = Config::load(data_dir, listen)?;
    for w in &config.warnings {
        log::error!("CONFIGURATION: {w}");
    }
    match config.verification {
        VerificationMode::Enforce => {}
        m => log::warn!("image verification mode is {m}: publications are NOT required to carry a valid signature"),
    }
    let tls = crate::tls::server_config(&config.tls_cert, &config.tls_key)
        .with_context(|| format!("loading TLS certificate {}", config.tls_cert.display()))?;
    let engine = ServerConfig::default();
    let server = Server::bind(ServerConfig {
        listen: config.listen,
        tls: Some(tls),
        max_connections: config.max_connections.unwrap_or(engine.max_connections),
        max_workers: config.max_workers.unwrap_or(engine.max_workers),
        ..engine
    })
    .with_context(|| format!("listening on {}", config.listen))?;
    let addr = server.local_addr();
    let verification = config.verification;
    let jobs = crate::schedule::parse_jobs(&config.mirrors, data_dir)?;
    let app = Arc::new(App::open(config)?);
    // warm the projection so the first client does not pay for it
    if let Err(e) = app.streams(&[]) {
        log::error!("building the simplestreams projection: {e:#}");
    }
    let scheduler = (!jobs.is_empty()).then(|| {
        log::info!("{} mirror job(s) configured", jobs.len());
        crate::schedule::Scheduler::start(app.clone(), jobs)
    });
    let shutdown = server.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    // trusted keys are read from DATA/keys at every publish, index
                    // and download request
                    log::info!(
                        "SIGHUP: trusted keys are re-read at each request that uses them; nothing else to reload"
                    );
                    continue;
                }
                log::info!("signal {sig}: shutting down");
                shutdown.shutdown();
                break;
            }
        })?;
    println!(
        "imgsrv serving https://{addr} (data {}, image verification {verification})",
        data_dir.display()
    );
    let handler_app = app.clone();
    let handler: Handler = Arc::new(move |req| crate::http::routes::handle(&handler_app, req));
    server.run(handler).context("serving")?;
    if let Some(s) = scheduler {
        s.stop();
    }
    log::info!("stopped");
    Ok(())
}
