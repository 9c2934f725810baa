//! `stratus-image-fetch`: download one image (`http(s)://` or `file://`), decompressing it
//! and verifying its size and checksums; an interrupted download is resumed. Shows a
//! progress bar when stderr is a terminal.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stratus_images::download::{self, Expected};
use stratus_images::{Algorithm, Compression};

#[derive(Debug, Parser)]
#[command(name = "stratus-image-fetch", version)]
struct Args {
    /// Location of the image.
    url: String,
    /// Where to write the decompressed image.
    dest: PathBuf,
    /// Expected size of the decompressed image, in bytes.
    #[arg(long)]
    bytes: Option<u64>,
    /// Expected checksum of the decompressed image, ALGORITHM=HEX (MD5, SHA-1, SHA-256,
    /// SHA-512); repeatable.
    #[arg(long = "checksum")]
    checksums: Vec<String>,
    /// Compression at the location (none, gz, bz2, xz); detected when not given.
    #[arg(long)]
    compression: Option<Compression>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let mut expected = Expected {
        bytes: args.bytes,
        compression: args.compression,
        ..Expected::default()
    };
    for c in &args.checksums {
        let (alg, hex) = c
            .split_once('=')
            .with_context(|| format!("--checksum '{c}': expected ALGORITHM=HEX"))?;
        let alg: Algorithm = alg.parse()?;
        expected.checksums.insert(alg, hex);
    }
    let bar = stratus_images::progress::terminal_bar(&args.url);
    let mut on_progress: Box<dyn FnMut(download::Progress)> = match &bar {
        Some(b) => Box::new(stratus_images::progress::drive(b.clone())),
        None => Box::new(|_| {}),
    };
    let result = download::download(&args.url, &args.dest, &expected, &mut on_progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let d = result.with_context(|| format!("cannot fetch {}", args.url))?;
    println!(
        "{}: {} bytes, from {}, {} {}",
        d.path.display(),
        d.bytes,
        d.compression,
        Algorithm::Sha1,
        d.checksums.get(Algorithm::Sha1).unwrap_or("")
    );
    Ok(())
}
