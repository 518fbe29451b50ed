//! `pinq completions SHELL`: prints a completion script for the whole command line.

use clap::CommandFactory;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  pinq completions bash > /etc/bash_completion.d/pinq
  pinq completions zsh > \"${fpath[1]}/_pinq\"
  pinq completions fish > ~/.config/fish/completions/pinq.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "pinq", &mut std::io::stdout());
    Ok(())
}
