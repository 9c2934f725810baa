//! The metadata operations behind `stratus-build-metadata`, `-sign-metadata`,
//! `-validate-metadata` and `-deprecate-metadata`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use chrono::{DateTime, Utc};

use crate::checksum::MultiHasher;
use crate::dsig::{self, SignOptions, Signer, Verified};
use crate::error::{Error, Result};
use crate::metadata::{Compression, Endorser, ImageFormat, Metadata};

/// Facts measured on an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFacts {
    /// Size of the decompressed image.
    pub bytes: u64,
    pub checksums: crate::Checksums,
    /// Compression of the input as detected from its magic bytes.
    pub compression: Compression,
    /// Format of the decompressed image (from its header).
    pub format: ImageFormat,
}

/// Wrap a reader in the decompressor for `compression`.
pub fn decompressor<'a>(
    r: impl BufRead + Send + 'a,
    compression: Compression,
) -> Box<dyn Read + Send + 'a> {
    match compression {
        Compression::None => Box::new(r),
        Compression::Gz => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Bz2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(r)),
    }
}

/// Measure an image read from `r`, decompressing it (gz, bz2, xz detected by magic bytes):
/// size and all checksums of the decompressed content, in one pass.
pub fn measure(r: impl Read + Send) -> std::io::Result<ImageFacts> {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let compression = Compression::detect(r.fill_buf()?);
    let mut d = BufReader::with_capacity(256 * 1024, decompressor(r, compression));
    let format = ImageFormat::detect(d.fill_buf()?);
    let mut h = MultiHasher::new();
    std::io::copy(&mut d, &mut h)?;
    let (bytes, checksums) = h.finish();
    Ok(ImageFacts {
        bytes,
        checksums,
        compression,
        format,
    })
}

/// Build an (unsigned) entry for the image file at `path`: size, checksums, format and
/// compression are measured; the endorser and type are given.
pub fn build(path: &Path, endorser: Endorser, image_type: &str) -> Result<Metadata> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let facts = measure(f).map_err(|e| Error::io(path, e))?;
    let mut m = Metadata::new(facts.bytes, facts.checksums, endorser, image_type)?;
    m.format = Some(facts.format);
    m.compression = Some(facts.compression);
    tracing::info!(identifier = %m.identifier, bytes = m.bytes, "built metadata");
    Ok(m)
}

/// Endorser fields taken from the signer's certificate.
pub fn endorser_of(signer: &Signer) -> Result<Endorser> {
    let id = signer.identity()?;
    let email = id.email.ok_or_else(|| {
        Error::Certificate(format!(
            "certificate {} has no email address (subject emailAddress or subjectAltName)",
            id.subject
        ))
    })?;
    Ok(Endorser {
        email,
        subject: id.subject,
        issuer: id.issuer,
    })
}

/// Sign an entry: the endorser elements are set from the certificate, then an enveloped
/// signature is added. Returns the signed RDF/XML.
pub fn sign(meta: &Metadata, signer: &Signer, opts: &SignOptions) -> Result<String> {
    let mut m = meta.clone();
    m.endorsement.endorser = endorser_of(signer)?;
    m.check()?;
    signer.sign(&m.to_xml(), opts)
}

/// Sign an RDF/XML entry (see [`sign`]).
pub fn sign_xml(xml: &str, signer: &Signer, opts: &SignOptions) -> Result<String> {
    sign(&Metadata::from_xml(xml)?, signer, opts)
}

/// A validated, signed entry.
#[derive(Clone, Debug)]
pub struct Validated {
    pub metadata: Metadata,
    pub signature: Verified,
}

/// Validate a signed entry: metadata rules, the signature, and that the certificate's
/// subject, issuer and email match the endorser elements.
pub fn validate(xml: &str) -> Result<Validated> {
    let metadata = Metadata::from_xml(xml)?;
    let signature = dsig::verify(xml)?;
    let en = &metadata.endorsement.endorser;
    let tbs = &signature.certificate.tbs_certificate;
    if !dsig::dn_matches(&en.subject, &tbs.subject) {
        return Err(Error::EndorserMismatch {
            field: "subject",
            in_entry: en.subject.clone(),
            in_certificate: signature.identity.subject.clone(),
        });
    }
    if !dsig::dn_matches(&en.issuer, &tbs.issuer) {
        return Err(Error::EndorserMismatch {
            field: "issuer",
            in_entry: en.issuer.clone(),
            in_certificate: signature.identity.issuer.clone(),
        });
    }
    let cert_email = signature.identity.email.clone().unwrap_or_default();
    if !cert_email.eq_ignore_ascii_case(en.email.trim()) {
        return Err(Error::EndorserMismatch {
            field: "email",
            in_entry: en.email.clone(),
            in_certificate: cert_email,
        });
    }
    tracing::info!(identifier = %metadata.identifier, endorser = %en.email, "validated metadata");
    Ok(Validated {
        metadata,
        signature,
    })
}

/// [`validate`], and the signature's certificate chains to one of the site's trusted CAs
/// and is valid at `now`: what a Marketplace must check before it stores an entry.
pub fn validate_trusted(
    xml: &str,
    trusted: &dsig::TrustedCas,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Validated> {
    let validated = validate(xml)?;
    trusted.check(&validated.signature, now)?;
    Ok(validated)
}

/// A signed deprecation of `meta`: the same entry with `slterms:deprecated` set to
/// `reason` and a creation date after the original's (so it supersedes it).
pub fn deprecate(
    meta: &Metadata,
    reason: &str,
    signer: &Signer,
    opts: &SignOptions,
    now: DateTime<Utc>,
) -> Result<String> {
    if reason.trim().is_empty() {
        return Err(Error::InvalidMetadata(
            "a deprecation needs a reason".into(),
        ));
    }
    let mut m = meta.clone();
    m.deprecated = Some(reason.trim().to_string());
    let after = meta.endorsement.created + chrono::Duration::seconds(1);
    let now = chrono::DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
    m.endorsement.created = if now > after { now } else { after };
    sign(&m, signer, opts)
}
