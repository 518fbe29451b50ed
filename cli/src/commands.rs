//! The subcommands that talk to the pinq API (and `pinq completions`), flattened into
//! [`crate::Command`]. Each group lives in its own module; this one only wires them.

use crate::client::{Client, ClientArgs};
use crate::{batch, bench, completions, jobs, monitor, pins, resources, status};

#[derive(Debug, clap::Subcommand)]
pub enum Ops {
    /// Show the API, workers, queue depth, job counts and backend health.
    Status(WithClient<status::StatusArgs>),
    /// Submit batches, follow them, list, cancel and re-drive them.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Batch(WithClient<batch::BatchCommand, true>),
    /// List jobs, show why one failed, retry or cancel one.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Jobs(WithClient<jobs::JobsCommand, true>),
    /// The pin index: what pinq believes each backend holds.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Pins(WithClient<pins::PinsCommand, true>),
    /// List, add, remove and health-check IPFS backends.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Backends(WithClient<resources::BackendsCommand, true>),
    /// The worker fleet, from heartbeats.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Workers(WithClient<resources::WorkersCommand, true>),
    /// List cron schedules, run one now, enable or disable one.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Schedules(WithClient<resources::SchedulesCommand, true>),
    /// Stress test: submit N operations as fast as the API takes them and measure.
    Bench(WithClient<bench::BenchArgs>),
    /// Live view of throughput, latency, queue depth, workers and backends.
    Monitor(WithClient<monitor::MonitorArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
}

/// A command's own arguments plus the API connection flags. `SUB` says whether `T` is a
/// subcommand enum (`pinq batch submit …`) or a flat argument struct (`pinq status`).
#[derive(Debug, Clone)]
pub struct WithClient<T, const SUB: bool = false> {
    pub client: ClientArgs,
    pub inner: T,
}

// clap derive cannot take a const-generic switch between `flatten` and `subcommand`, so
// the two shapes are written out by hand below.
mod wiring {
    use clap::{ArgMatches, Args, Command, FromArgMatches, Subcommand};

    use super::WithClient;
    use crate::client::ClientArgs;

    impl<T: Args> FromArgMatches for WithClient<T, false> {
        fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
            Ok(WithClient {
                client: ClientArgs::from_arg_matches(m)?,
                inner: T::from_arg_matches(m)?,
            })
        }
        fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
            *self = Self::from_arg_matches(m)?;
            Ok(())
        }
    }
    impl<T: Args> Args for WithClient<T, false> {
        fn augment_args(cmd: Command) -> Command {
            T::augment_args(ClientArgs::augment_args(cmd))
        }
        fn augment_args_for_update(cmd: Command) -> Command {
            Self::augment_args(cmd)
        }
    }

    impl<T: Subcommand> FromArgMatches for WithClient<T, true> {
        fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
            Ok(WithClient {
                client: ClientArgs::from_arg_matches(m)?,
                inner: T::from_arg_matches(m)?,
            })
        }
        fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
            *self = Self::from_arg_matches(m)?;
            Ok(())
        }
    }
    impl<T: Subcommand> Args for WithClient<T, true> {
        fn augment_args(cmd: Command) -> Command {
            T::augment_subcommands(ClientArgs::augment_args(cmd))
        }
        fn augment_args_for_update(cmd: Command) -> Command {
            Self::augment_args(cmd)
        }
    }
}

pub async fn run(ops: Ops) -> anyhow::Result<()> {
    match ops {
        Ops::Status(a) => status::run(&Client::new(&a.client)?, a.inner).await,
        Ops::Batch(a) => batch::run(&Client::new(&a.client)?, a.inner).await,
        Ops::Jobs(a) => jobs::run(&Client::new(&a.client)?, a.inner).await,
        Ops::Pins(a) => pins::run(&Client::new(&a.client)?, a.inner).await,
        Ops::Backends(a) => resources::backends(&Client::new(&a.client)?, a.inner).await,
        Ops::Workers(a) => resources::workers(&Client::new(&a.client)?, a.inner).await,
        Ops::Schedules(a) => resources::schedules(&Client::new(&a.client)?, a.inner).await,
        Ops::Bench(a) => bench::run(&Client::new(&a.client)?, a.inner).await,
        Ops::Monitor(a) => monitor::run(&Client::new(&a.client)?, a.inner).await,
        Ops::Completions(a) => completions::run(a),
    }
}
