use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = pinq_api::Args::parse();
    pinq_core::telemetry::init(&args.log);
    let shutdown = pinq_core::shutdown::on_signals();
    let server = pinq_api::Server::build(args).await?;
    server.run_until_stopped(shutdown).await
}
