use clap::{CommandFactory, FromArgMatches};

fn main() {
    // `imgsrv --version` also names the SQLite bundled into the binary (what a
    // security review asks first).
    let long_version: &'static str = Box::leak(imgsrv::catalog::versions().into_boxed_str());
    let matches = imgsrv::cli::Cli::command()
        .long_version(long_version)
        .get_matches();
    let cli = imgsrv::cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let default_level = if matches!(cli.command, imgsrv::cli::Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp_millis()
        .init();
    if let Err(e) = imgsrv::cli::run(cli) {
        eprintln!("error: {}", imgsrv::errors::render(&e));
        // verify/pull: 1 verification failed, 2 could not run; others: 1.
        let code = e
            .downcast_ref::<imgsrv::verify::VerifyError>()
            .map_or(1, |v| v.exit_code());
        std::process::exit(code);
    }
}
