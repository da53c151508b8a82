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
        std::process::exit(1);
    }
}
