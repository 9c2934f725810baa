//! Commands that need no service: prepare-context, copy-config, hash-password, and the
//! installation helpers (man pages, `stratus-*` links).

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory};
use stratus_contextualizer::{prepare_context_parts, CloudInitPart};

use crate::config;
use crate::session::{self, Session};
use crate::{Cli, Common};

#[derive(Args, Debug)]
pub struct PrepareContextArgs {
    /// `mime,file` pairs: ssh,KEY.pub  x-shellscript,run.sh  cloud-config,conf.yaml …
    pub pairs: Vec<String>,
    /// Where to write the context file.
    #[arg(short, long, value_name = "FILE", default_value = "cloud-init.txt")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct CopyConfigArgs {
    /// Where to write it (default ~/.stratuslab/stratuslab-user.cfg).
    pub destination: Option<PathBuf>,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct HashPasswordArgs {}

pub fn prepare_context(common: &Common, args: PrepareContextArgs) -> anyhow::Result<ExitCode> {
    let parts: Vec<CloudInitPart> = args
        .pairs
        .iter()
        .map(|p| CloudInitPart::parse(p))
        .collect::<Result<_, _>>()?;
    let session = Session::load(common)?;
    let (key, _) = session.public_key_file(None)?;
    let default_key = key.exists().then_some(key.as_path());
    let prepared = prepare_context_parts(&parts, default_key)?;
    let text = prepared.to_string();
    let to_a_stream = std::fs::metadata(&args.output).is_ok_and(|m| !m.is_file());
    if to_a_stream {
        // `-o /dev/stdout` or a pipe: nothing to rename over.
        std::fs::write(&args.output, text)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
    } else {
        // User data often carries credentials for the guest's scripts.
        write_private(&args.output, text.as_bytes(), true)?;
    }
    if common.quiet == 0 {
        println!(" :: Context written to {}", args.output.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn copy_config(common: &Common, args: CopyConfigArgs) -> anyhow::Result<ExitCode> {
    let dest = match args.destination {
        Some(d) => d,
        None => session::home()?.join(config::DEFAULT_FILE),
    };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if !args.force && std::fs::symlink_metadata(&dest).is_ok() {
        bail!(
            "{} exists already: edit it, or give --force to replace it",
            dest.display()
        );
    }
    // The file will hold a password.
    write_private(&dest, config::REFERENCE.as_bytes(), args.force)?;
    if common.quiet == 0 {
        println!(" :: Configuration template written to {}", dest.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `dest` as a new file only its owner may read, renamed over the old one if
/// `replace` (never written through a link or into a file someone holds open).
fn write_private(dest: &Path, contents: &[u8], replace: bool) -> anyhow::Result<()> {
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(contents)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    if replace {
        tmp.persist(dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
    } else {
        // Not over a file that appeared meanwhile.
        tmp.persist_noclobber(dest).map_err(|e| {
            anyhow::anyhow!(
                "{} exists already: edit it, or give --force to replace it ({})",
                dest.display(),
                e.error
            )
        })?;
    }
    Ok(())
}

pub fn hash_password(_common: &Common, _args: HashPasswordArgs) -> anyhow::Result<ExitCode> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password again: ")?;
        if first != again {
            bail!("the two passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    println!("{}", stratus_orchestrator::users::hash_password(&password)?);
    Ok(ExitCode::SUCCESS)
}

pub fn man_pages(dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let root = Cli::command();
    let write = |name: &str, command: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(command.display_name(name.to_owned())).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))
    };
    write("stratus", root.clone())?;
    for sub in root.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write(&format!("stratus-{}", sub.get_name()), sub.clone())?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn install_links(dir: &Path) -> anyhow::Result<ExitCode> {
    let program = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("cannot find this program's path")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names = crate::command_names()
        .into_iter()
        .map(|n| format!("stratus-{n}"));
    for name in std::iter::once("stratus".to_owned()).chain(names) {
        let link = dir.join(&name);
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&link)
                .with_context(|| format!("cannot replace {}", link.display()))?,
            // This program itself, or a file of someone else's: left alone.
            Ok(_) if std::fs::canonicalize(&link).ok().as_ref() == Some(&program) => continue,
            Ok(_) => bail!("{} exists and is not a link: not replaced", link.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot look at {}", link.display())),
        }
        std::os::unix::fs::symlink(&program, &link)
            .with_context(|| format!("cannot make {}", link.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
