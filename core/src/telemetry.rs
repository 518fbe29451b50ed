//! Logging setup shared by every binary.

use tracing_subscriber::EnvFilter;

use crate::config::LogArgs;

/// Installs the global `tracing` subscriber. Logs go to stderr; stdout is left to the
/// binaries for what they print on purpose.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests that build several services in one process) is harmless.
    let _ = if args.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
