//! `imgsrv serve`: lock the data directory, bootstrap, load configuration,
//! serve until SIGTERM/SIGINT.

use crate::app::App;
use crate::config::{Config, VerificationMode};
use crate::http::server::{Handler, Server, ServerConfig};
use anyhow::Context;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

/// `DATA/serve.lock`: locked by the one `imgsrv serve` of a data directory
/// for as long as it runs, with its PID written in it.
pub const LOCK_FILE: &str = "serve.lock";

/// What makes a server the only one on its data directory.
///
/// Only `serve` takes it. Every other command that writes a data directory
/// (`init`, `key`, `principal`, `grant`, `token`, `import`, `mirror --data`)
/// changes it through catalog transactions (SQLite in WAL mode: one writer
/// at a time, the others wait up to 10 s) and blob files written under a
/// temporary name and renamed into place by digest, all safe beside a
/// running server, which reads the trusted keys at each request; `audit`,
/// `auth matrix` and `mirrors` only read. What must not run twice is what
/// only a server does: its scheduled mirror jobs (two servers would run
/// each job twice at once, over the same status files) and answering for
/// the data directory (a second server would start silently on another
/// port, and stopping "the" server would leave it running).
///
/// The lock is flock(2) on the open file, not the file's existence: the
/// kernel releases it when the process ends, however it ends (a crash,
/// SIGKILL, a power cut), so a leftover `serve.lock` never stops the next
/// start; the PID in it is only there to name the holder. The descriptor is
/// close-on-exec (Rust opens files so), so no child process inherits it.
pub struct ServeLock {
    _file: File,
}

impl ServeLock {
    /// Takes the lock of `data_dir` (made if missing), or says who holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<ServeLock> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        use std::os::unix::io::AsRawFd;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        loop {
            // SAFETY: flock(2) on a descriptor owned by `file`, open here.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    let mut pid = String::new();
                    let _ = file.read_to_string(&mut pid);
                    let (holder, stop) = match pid.trim().parse::<u32>() {
                        Ok(pid) => (
                            format!("another imgsrv serve (PID {pid})"),
                            format!("`kill {pid}`"),
                        ),
                        Err(_) => (
                            "another imgsrv serve (its PID is not written yet)".to_string(),
                            format!("`fuser -v {}` names it", path.display()),
                        ),
                    };
                    anyhow::bail!(
                        "{holder} is already serving the data directory {} (it holds the lock {}); \
                         stop that server first ({stop}, or `systemctl stop` its service), or give \
                         this one another --data directory",
                        data_dir.display(),
                        path.display()
                    );
                }
                _ => return Err(err).with_context(|| format!("locking {}", path.display())),
            }
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(ServeLock { _file: file })
    }
}

pub fn serve(data_dir: &Path, listen: Option<&str>) -> anyhow::Result<()> {
    log::info!("imgsrv {}", crate::catalog::versions());
    // held until this function returns: one server per data directory
    let _lock = ServeLock::acquire(data_dir)?;
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
    let scrub = crate::schedule::spawn_scrub(app.clone());
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
    if let Some(s) = scrub {
        s.stop();
    }
    log::info!("stopped");
    Ok(())
}
