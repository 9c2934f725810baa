//! The Marketplace commands: list-images, search-image, show-image, build-metadata,
//! sign-metadata, validate-metadata, upload-metadata, deprecate-metadata.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use stratus_images::dsig::SignOptions;
use stratus_images::{ops, Endorser, Metadata};

use crate::client::{ClientError, Service};
use crate::output::{batch_exit, print_json};
use crate::session::Session;
use crate::Common;

#[derive(Args, Debug)]
pub struct ListArgs {
    /// valid (default), expired, deprecated or all.
    #[arg(long, default_value = "valid")]
    pub status: String,
    /// Only entries endorsed by this email address.
    #[arg(long, value_name = "EMAIL")]
    pub endorser: Option<String>,
    /// Only this operating system.
    #[arg(long)]
    pub os: Option<String>,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Words to find in titles, descriptions and operating systems.
    pub text: String,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The image's Marketplace identifier.
    pub identifier: String,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The image file (compressed or not).
    pub image: PathBuf,
    /// machine (a bootable disk) or disk (data).
    #[arg(long = "type", default_value = "machine")]
    pub image_type: String,
    /// Where the image can be downloaded from (repeatable).
    #[arg(long, value_name = "URL")]
    pub location: Vec<String>,
    #[arg(long)]
    pub title: Option<String>,
    #[arg(long)]
    pub comment: Option<String>,
    #[arg(long)]
    pub author: Option<String>,
    #[arg(long)]
    pub os: Option<String>,
    #[arg(long)]
    pub os_version: Option<String>,
    #[arg(long)]
    pub os_arch: Option<String>,
    #[arg(long)]
    pub image_version: Option<String>,
    /// The endorser's email when no certificate is configured (signing replaces it).
    #[arg(long, value_name = "EMAIL")]
    pub email: Option<String>,
    /// Where to write the entry (default: standard output).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// The entry (RDF/XML).
    pub file: PathBuf,
    /// Where to write the signed entry (default: replace the file).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Signed entries.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UploadArgs {
    /// Signed entries.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeprecateArgs {
    /// The image's Marketplace identifier.
    pub identifier: String,
    /// Why users should not use it any more.
    #[arg(short, long)]
    pub reason: String,
}

/// `GET /metadata`; the Marketplace's 404 for an empty result is an empty list here.
fn query_marketplace(market: &Service, query: &[(&str, &str)]) -> anyhow::Result<Vec<Metadata>> {
    match market.get_with::<Vec<Metadata>>("/metadata", query) {
        Ok(list) => Ok(list),
        Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn image_table(entries: &[Metadata]) -> String {
    if entries.is_empty() {
        return "No image to show\n".into();
    }
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|m| {
            let os = [
                m.os.as_deref(),
                m.os_version.as_deref(),
                m.os_arch.as_deref(),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
            let mut title = m.title.clone().unwrap_or_default();
            if let Some(reason) = &m.deprecated {
                title = format!("[deprecated: {reason}] {title}");
            }
            [
                m.identifier.to_string(),
                os,
                m.endorsement.endorser.email.clone(),
                stratus_images::metadata::format_date(&m.endorsement.created),
                title,
            ]
        })
        .collect();
    crate::output::table(
        ["identifier", "os", "endorser", "created", "title"],
        [0; 5],
        &rows,
    )
}

fn list_query<'a>(args: &'a ListArgs, q: Option<&'a str>) -> Vec<(&'static str, &'a str)> {
    let mut query = vec![("status", args.status.as_str())];
    if let Some(e) = &args.endorser {
        query.push(("email", e));
    }
    if let Some(os) = &args.os {
        query.push(("os", os));
    }
    if let Some(q) = q {
        query.push(("q", q));
    }
    query
}

fn show_list(common: &Common, entries: Vec<Metadata>) -> anyhow::Result<ExitCode> {
    if common.json {
        print_json(&entries)?;
    } else if common.quiet > 0 {
        for m in &entries {
            println!("{}", m.identifier);
        }
    } else {
        print!("{}", image_table(&entries));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(common: &Common, args: ListArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let entries = query_marketplace(&session.marketplace()?, &list_query(&args, None))?;
    show_list(common, entries)
}

pub fn search(common: &Common, args: SearchArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let entries = query_marketplace(
        &session.marketplace()?,
        &list_query(&args.list, Some(&args.text)),
    )?;
    show_list(common, entries)
}

pub fn show(common: &Common, args: ShowArgs) -> anyhow::Result<ExitCode> {
    args.identifier
        .parse::<stratus_images::Identifier>()
        .with_context(|| {
            format!(
                "'{}' is not a Marketplace image identifier",
                args.identifier
            )
        })?;
    let session = Session::load(common)?;
    let entries = query_marketplace(
        &session.marketplace()?,
        &[("identifier", &args.identifier), ("status", "all")],
    )?;
    let Some(newest) = entries.into_iter().max_by_key(|m| m.endorsement.created) else {
        bail!("the Marketplace has no image {}", args.identifier);
    };
    if common.json {
        print_json(&newest)?;
        return Ok(ExitCode::SUCCESS);
    }
    let field = |k: &str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            println!("{k:<14}{v}");
        }
    };
    field("identifier", Some(newest.identifier.to_string()));
    field("title", newest.title.clone());
    field("description", newest.description.clone());
    field("type", Some(newest.image_type.clone()));
    field("os", newest.os.clone());
    field("os-version", newest.os_version.clone());
    field("os-arch", newest.os_arch.clone());
    field("version", newest.version.clone());
    field("bytes", Some(newest.bytes.to_string()));
    field("format", newest.format.map(|f| f.as_str().to_owned()));
    field("endorser", Some(newest.endorsement.endorser.email.clone()));
    field(
        "created",
        Some(stratus_images::metadata::format_date(
            &newest.endorsement.created,
        )),
    );
    field(
        "valid",
        Some(stratus_images::metadata::format_date(&newest.valid_until())),
    );
    field("deprecated", newest.deprecated.clone());
    for l in &newest.locations {
        field("location", Some(l.clone()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to `path` through a temporary file, so an interrupted command never
/// leaves half an entry.
fn write_whole(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn build(common: &Common, args: BuildArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let endorser = match &args.email {
        Some(email) => Endorser {
            email: email.clone(),
            subject: format!("EMAILADDRESS={email}"),
            issuer: "unsigned".into(),
        },
        None => ops::endorser_of(&session.signer().context(
            "build-metadata takes the endorser from your certificate (--pem-cert/--pem-key) \
             or from --email",
        )?)?,
    };
    let mut m = ops::build(&args.image, endorser, &args.image_type)?;
    m.locations = args.location.clone();
    m.title = args.title.clone();
    m.description = args.comment.clone();
    m.creator = args.author.clone();
    m.os = args.os.clone();
    m.os_version = args.os_version.clone();
    m.os_arch = args.os_arch.clone();
    m.version = args.image_version.clone();
    m.check()?;
    let text = if common.json { m.to_json() } else { m.to_xml() };
    match &args.output {
        Some(path) => write_whole(path, &text)?,
        None => print!("{text}"),
    }
    if common.quiet == 0 && args.output.is_some() {
        eprintln!(" :: Built metadata for image {}", m.identifier);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sign(common: &Common, args: SignArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let signer = session.signer()?;
    let xml = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let signed = ops::sign_xml(&xml, &signer, &SignOptions::default())
        .with_context(|| format!("cannot sign {}", args.file.display()))?;
    let out = args.output.as_ref().unwrap_or(&args.file);
    write_whole(out, &signed)?;
    if common.quiet == 0 {
        println!(" :: Signed {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn validate(common: &Common, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut invalid = 0;
    for file in &args.files {
        let result = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))
            .and_then(|xml| Ok(ops::validate(&xml)?));
        match result {
            Ok(v) => {
                if common.quiet == 0 {
                    println!(
                        "{}: valid (image {}, endorser {})",
                        file.display(),
                        v.metadata.identifier,
                        v.metadata.endorsement.endorser.email
                    );
                }
            }
            Err(e) => {
                eprintln!("  [ERROR] {}: {e:#}", file.display());
                invalid += 1;
            }
        }
    }
    Ok(batch_exit(invalid))
}

fn upload_signed(market: &Service, xml: String) -> Result<Option<String>, ClientError> {
    market.post_document("/metadata", "application/rdf+xml", xml)
}

pub fn upload(common: &Common, args: UploadArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let market = session.marketplace_uploader()?;
    for file in &args.files {
        let xml = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        // Checked here first, so a broken entry is explained without a round trip.
        ops::validate(&xml).with_context(|| format!("{} is not a valid entry", file.display()))?;
        let location = upload_signed(&market, xml)
            .with_context(|| format!("the Marketplace refused {}", file.display()))?;
        if common.quiet == 0 {
            println!(
                "UPLOADED {} {}{}",
                file.display(),
                market.endpoint(),
                location.unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn deprecate(common: &Common, args: DeprecateArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let signer = session.signer()?;
    let me = ops::endorser_of(&signer)?;
    let market = session.marketplace_uploader()?;
    let entries = query_marketplace(
        &market,
        &[
            ("identifier", &args.identifier),
            ("email", &me.email),
            ("status", "all"),
        ],
    )?;
    let Some(latest) = entries.into_iter().max_by_key(|m| m.endorsement.created) else {
        bail!(
            "the Marketplace has no entry for image {} endorsed by {}",
            args.identifier,
            me.email
        );
    };
    let xml = ops::deprecate(
        &latest,
        &args.reason,
        &signer,
        &SignOptions::default(),
        chrono::Utc::now(),
    )?;
    upload_signed(&market, xml)?;
    if common.quiet == 0 {
        println!("DEPRECATED {}", args.identifier);
    }
    Ok(ExitCode::SUCCESS)
}
