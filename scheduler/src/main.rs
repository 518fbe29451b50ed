use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = pinq_scheduler::Args::parse();
    pinq_core::telemetry::init(&args.log);
    let shutdown = pinq_core::shutdown::on_signals();
    pinq_scheduler::run(args, shutdown).await
}
