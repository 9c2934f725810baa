//! Writes a context disk, for the nested harness and for trying the formats by hand.
//!
//! usage: context_disk <one|cloud-init|nocloud> <out> <instance-id> <hostname> <public-key>
//!        [KEY=VALUE ...]

use std::path::Path;
use std::process::ExitCode;

use stratus_contextualizer::{write_context_disk, Context, ContextMethod};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: context_disk <method> <out> <instance-id> <hostname> <public-key> [KEY=VALUE ...]");
        return ExitCode::from(2);
    }
    let method: ContextMethod = match args[0].parse() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("[ERROR] {e}");
            return ExitCode::from(1);
        }
    };
    let mut pairs = Vec::new();
    for pair in &args[5..] {
        match pair.split_once('=') {
            Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
            None => {
                eprintln!("[ERROR] context pair '{pair}' is not KEY=VALUE");
                return ExitCode::from(1);
            }
        }
    }
    let ctx = Context::new(args[2].as_str(), args[3].as_str())
        .with_public_key(args[4].as_str())
        .with_pairs(pairs);
    match write_context_disk(&ctx, method, Path::new(&args[1])) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[ERROR] {e}");
            ExitCode::from(1)
        }
    }
}
