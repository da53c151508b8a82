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

pub mod next_steps;

/// `DATA/serve.lock`: locked by the one `imgsrv serve` of a data directory
/// for as long as it runs, with its PID written in it.
pub const LOCK_FILE: &str = "serve.lock";

/// What makes a server the only one on its data directory.
///
/// `serve` takes it, and so do `restore` (on the directory it fills) and
/// `backup` (on its destination), which must not have a server on the
/// directory they write. Every other command that writes a data directory
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
        Self::acquire_for(data_dir, "serve")
    }

    /// [`ServeLock::acquire`] for another command that must have the data
    /// directory to itself while it writes it (`restore`, a `backup` into
    /// its destination): no server starts on it meanwhile. `command` is
    /// written after the PID, so that whoever finds the lock taken is told
    /// which command holds it (a server writes its PID alone).
    pub fn acquire_for(data_dir: &Path, command: &str) -> anyhow::Result<ServeLock> {
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
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    return Err(held(data_dir, &path, &holder));
                }
                _ => return Err(err).with_context(|| format!("locking {}", path.display())),
            }
        }
        let line = match command {
            "serve" => format!("{}", std::process::id()),
            other => format!("{} {other}", std::process::id()),
        };
        file.set_len(0)
            .and_then(|()| writeln!(file, "{line}"))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(ServeLock { _file: file })
    }
}

/// Who holds the lock at `path`, from its text (`PID` for a server, `PID
/// COMMAND` for another command), and what to do about it.
fn held(data_dir: &Path, path: &Path, text: &str) -> anyhow::Error {
    let mut words = text.split_whitespace();
    let pid = words.next().and_then(|p| p.parse::<u32>().ok());
    let command = words.next().unwrap_or("serve");
    let (holder, stop) = match pid {
        Some(pid) => (
            format!("another imgsrv {command} (PID {pid})"),
            format!("`kill {pid}`"),
        ),
        None => (
            "another imgsrv serve (its PID is not written yet)".to_string(),
            format!("`fuser -v {}` names it", path.display()),
        ),
    };
    if command == "serve" {
        anyhow::anyhow!(
            "{holder} is already serving the data directory {} (it holds the lock {}); \
             stop that server first ({stop}, or `systemctl stop` its service), or give \
             this one another --data directory",
            data_dir.display(),
            path.display()
        )
    } else {
        anyhow::anyhow!(
            "{holder} is using the data directory {} (it holds the lock {}); wait until \
             it is done, or stop it ({stop})",
            data_dir.display(),
            path.display()
        )
    }
}

/// `metrics_listen` overrides the file's `metrics_listen` (`""`: none).
pub fn serve(
    data_dir: &Path,
    listen: Option<&str>,
    metrics_listen: Option<&str>,
) -> anyhow::Result<()> {
    log::info!("imgsrv {}", crate::catalog::versions());
    if Config::path(data_dir).exists() {
        // a configuration mistake is told before anything is created or locked
        Config::load(data_dir, listen)?;
    }
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
    let mut config = Config::load(data_dir, listen)?;
    if let Some(m) = metrics_listen {
        config.metrics_listen = crate::config::parse_metrics_listen(m)?;
    }
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
        observer: Some(Arc::new(crate::metrics::EngineObserver)),
        ..engine
    })
    .with_context(|| format!("listening on {}", config.listen))?;
    let addr = server.local_addr();
    let verification = config.verification;
    let tls_cert = config.tls_cert.clone();
    let jobs = crate::schedule::parse_jobs(&config.mirrors, data_dir)?;
    let metrics_addr = config.metrics_listen;
    let app = Arc::new(App::open(config)?);
    let metrics = match metrics_addr {
        Some(a) => crate::metrics::start_listener(a, app.clone()),
        None => {
            log::info!("metrics listener off (metrics_listen = \"\")");
            None
        }
    };
    // warm the projection so the first client does not pay for it
    if let Err(e) = app.streams(&[]) {
        log::error!("building the simplestreams projection: {e:#}");
    }
    let scheduler = (!jobs.is_empty()).then(|| {
        log::info!("{} mirror job(s) configured", jobs.len());
        crate::schedule::Scheduler::start(app.clone(), jobs)
    });
    let maintenance = crate::maint::periodic::Stop::default();
    start_gc(&app, &maintenance);
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
    if let Some(m) = &metrics {
        println!("imgsrv metrics on http://{}/metrics", m.addr);
    }
    println!(
        "imgsrv serving https://{addr} (data {}, image verification {verification})",
        data_dir.display()
    );
    next_steps::print(&mut std::io::stdout().lock(), data_dir, addr, &tls_cert)?;
    let handler_app = app.clone();
    let handler: Handler = Arc::new(move |req| crate::http::routes::handle(&handler_app, req));
    server.run(handler).context("serving")?;
    if let Some(s) = scheduler {
        s.stop();
    }
    maintenance.stop();
    if let Some(m) = metrics {
        m.stop();
    }
    if let Some(s) = scrub {
        s.stop();
    }
    log::info!("stopped");
    Ok(())
}

/// The periodic garbage collection (`[gc] interval`, the first run 10 s after
/// the start): beside uploads and publishes, as `imgsrv gc` is.
fn start_gc(app: &Arc<App>, stop: &crate::maint::periodic::Stop) {
    let Some(interval) = app.config.gc.interval else {
        log::info!("gc: periodic garbage collection is off ([gc] interval = \"off\")");
        return;
    };
    let opts = crate::maint::gc::GcOptions {
        grace: app.config.gc.grace,
        retention: app.config.retention.clone(),
        actor: "gc".to_string(),
    };
    log::info!(
        "gc: every {}s, grace {}s, {} retention rule(s)",
        interval.as_secs(),
        opts.grace.as_secs(),
        opts.retention.len()
    );
    let app = app.clone();
    let first = interval.min(std::time::Duration::from_secs(10));
    crate::maint::periodic::spawn("gc", first, interval, stop, move || {
        // the summary and the report; the items of the plan only at debug level
        let mut say = |line: &str| match line.starts_with("  ") {
            true => log::debug!("gc:{line}"),
            false => log::info!("{line}"),
        };
        let ok = match crate::maint::gc::run(&app, &opts, false, &mut say) {
            Ok(run) => run.report.is_some_and(|r| r.failures.is_empty()),
            Err(e) => {
                log::error!("gc: {e:#}");
                false
            }
        };
        crate::metrics::job_finished(crate::metrics::JOB_GC, ok);
    });
}
