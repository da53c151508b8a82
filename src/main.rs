use clap::Parser;

fn main() {
    let cli = imgsrv::cli::Cli::parse();
    let default_level = if matches!(cli.command, imgsrv::cli::Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp_millis()
        .init();
    if let Err(e) = imgsrv::cli::run(cli) {
        eprintln!("error: {e:#}");
        // verify/pull: 1 verification failed, 2 could not run; others: 1.
        let code = e
            .downcast_ref::<imgsrv::verify::VerifyError>()
            .map_or(1, |v| v.exit_code());
        std::process::exit(code);
    }
}
