use clap::Parser;

use stratus_jailer::{run, Cli, Command};

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(spec) => match run::run(&spec) {
            Ok(status) => run::mirror(status),
            Err(e) => {
                eprintln!("stratus-jailer: VM {}: {e}", spec.id);
                std::process::exit(run::SETUP_FAILED);
            }
        },
        Command::Enter(spec) => {
            if let Err(e) = stratus_jailer::enter::enter(&spec) {
                eprintln!("stratus-jailer: {e}");
                std::process::exit(1);
            }
        }
    }
}
