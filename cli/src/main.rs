use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = pinq_cli::Cli::parse();
    pinq_cli::run(cli).await
}
