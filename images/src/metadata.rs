//! The StratusLab metadata model: RDF/XML parse and emit (with element order and
//! cardinality checks and the identifier/SHA-1 agreement) and a JSON form via serde.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::checksum::{Algorithm, Checksums};
use crate::error::{Error, Result};
use crate::identifier::Identifier;
use crate::xml::{self, escape_attr, escape_text, Element};

pub const RDF_NS: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#";
pub const DCTERMS_NS: &str = "http://purl.org/dc/terms/";
pub const SLTERMS_NS: &str = "http://mp.stratuslab.eu/slterms#";
pub const SLREQ_NS: &str = "http://mp.stratuslab.eu/slreq#";
pub const DSIG_NS: &str = "http://www.w3.org/2000/09/xmldsig#";
/// `xml:base` of every entry.
pub const MARKETPLACE_BASE: &str = "http://mp.stratuslab.eu/";
/// Validity of an entry without `dcterms:valid`, counted from its creation.
pub const DEFAULT_VALIDITY_DAYS: i64 = 178;
const DATE_FORMAT: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Format a date as in metadata entries (`yyyy-MM-ddTHH:mm:ssZ`, UTC).
pub fn format_date(d: &DateTime<Utc>) -> String {
    d.format(DATE_FORMAT).to_string()
}

/// Parse a metadata date (`yyyy-MM-ddTHH:mm:ssZ`).
pub fn parse_date(s: &str, what: &str) -> Result<DateTime<Utc>> {
    let date = NaiveDateTime::parse_from_str(s.trim(), DATE_FORMAT)
        .map(|n| n.and_utc())
        .map_err(|_| {
            Error::InvalidMetadata(format!(
                "{what} '{s}' is not a date of the form yyyy-MM-ddTHH:mm:ssZ"
            ))
        })?;
    check_year(&date, what)?;
    Ok(date)
}

/// A metadata date has a four-digit year. chrono reads signed years of up to six digits,
/// where the validity arithmetic (creation + 178 days) would overflow.
fn check_year(date: &DateTime<Utc>, what: &str) -> Result<()> {
    if (1..=9999).contains(&date.year()) {
        Ok(())
    } else {
        Err(Error::InvalidMetadata(format!(
            "{what} '{}' is outside the years 0001 to 9999",
            format_date(date)
        )))
    }
}

/// Disk image format (`dcterms:format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Why a qcow2 image must not be used as delivered, if it must not. A qcow2 header
    /// can name other host files — a backing file or an external data file — that the VMM
    /// would then open and show to the guest; an image from outside may only stand alone.
    /// A header marked corrupt is refused too. `header` is the image's first 104 bytes or
    /// more; anything that is not qcow2 is `None`.
    pub fn qcow2_hazard(header: &[u8]) -> Option<String> {
        if Self::detect(header) != ImageFormat::Qcow2 {
            return None;
        }
        let be32 = |at: usize| {
            header
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        };
        let be64 = |at: usize| {
            header
                .get(at..at + 8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        };
        let (Some(version), Some(backing_offset)) = (be32(4), be64(8)) else {
            return Some("truncated qcow2 header".into());
        };
        if backing_offset != 0 {
            return Some("the qcow2 header names a backing file".into());
        }
        if version >= 3 {
            let Some(incompatible) = be64(72) else {
                return Some("truncated qcow2 header".into());
            };
            if incompatible & (1 << 2) != 0 {
                return Some("the qcow2 header names an external data file".into());
            }
            if incompatible & (1 << 1) != 0 {
                return Some("the qcow2 header is marked corrupt".into());
            }
        }
        None
    }

    /// Detect the format from the first bytes of a (decompressed) image.
    pub fn detect(header: &[u8]) -> ImageFormat {
        if header.starts_with(b"QFI\xfb") {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        }
    }
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            o => Err(Error::InvalidMetadata(format!(
                "dcterms:format '{o}' is not raw or qcow2"
            ))),
        }
    }
}

/// Compression of the image at its location (`dcterms:compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gz,
    Bz2,
    Xz,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gz => "gz",
            Compression::Bz2 => "bz2",
            Compression::Xz => "xz",
        }
    }

    /// Detect a compression from magic bytes.
    pub fn detect(header: &[u8]) -> Compression {
        if header.starts_with(&[0x1f, 0x8b]) {
            Compression::Gz
        } else if header.starts_with(b"BZh") {
            Compression::Bz2
        } else if header.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Compression::Xz
        } else {
            Compression::None
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Compression::None),
            "gz" | "gzip" => Ok(Compression::Gz),
            "bz2" | "bzip2" => Ok(Compression::Bz2),
            "xz" => Ok(Compression::Xz),
            o => Err(Error::InvalidMetadata(format!(
                "dcterms:compression '{o}' is not gz, bz2, xz or none"
            ))),
        }
    }
}

/// The endorser: who vouches for the image, as in their certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorser {
    pub email: String,
    pub subject: String,
    pub issuer: String,
}

/// `slreq:endorsement`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    pub created: DateTime<Utc>,
    pub endorser: Endorser,
}

/// One Marketplace metadata entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub identifier: Identifier,
    /// Size of the uncompressed image.
    pub bytes: u64,
    /// Checksums of the uncompressed image (exactly one SHA-1, matching the identifier).
    pub checksums: Checksums,
    pub endorsement: Endorsement,
    /// `dcterms:type` (e.g. `machine` or `disk`).
    #[serde(rename = "type")]
    pub image_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// `dcterms:alternative` (tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternative: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Reason of deprecation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks_bus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmp: Vec<String>,
}

/// Optional single-valued text elements: (namespace, local name, accessor).
type Field = fn(&mut Metadata) -> &mut Option<String>;
const TEXT_FIELDS: &[(&str, &str, Field)] = &[
    (DCTERMS_NS, "title", |m| &mut m.title),
    (DCTERMS_NS, "alternative", |m| &mut m.alternative),
    (DCTERMS_NS, "description", |m| &mut m.description),
    (DCTERMS_NS, "creator", |m| &mut m.creator),
    (DCTERMS_NS, "publisher", |m| &mut m.publisher),
    (SLTERMS_NS, "serial-number", |m| &mut m.serial_number),
    (SLTERMS_NS, "version", |m| &mut m.version),
    (SLTERMS_NS, "deprecated", |m| &mut m.deprecated),
    (SLTERMS_NS, "os", |m| &mut m.os),
    (SLTERMS_NS, "os-version", |m| &mut m.os_version),
    (SLTERMS_NS, "os-arch", |m| &mut m.os_arch),
    (SLTERMS_NS, "kind", |m| &mut m.kind),
    (SLTERMS_NS, "disks-bus", |m| &mut m.disks_bus),
    (SLTERMS_NS, "hypervisor", |m| &mut m.hypervisor),
];
type ListField = fn(&mut Metadata) -> &mut Vec<String>;
const LIST_FIELDS: &[(&str, &str, ListField)] = &[
    (SLTERMS_NS, "location", |m| &mut m.locations),
    (SLTERMS_NS, "inbound-port", |m| &mut m.inbound_ports),
    (SLTERMS_NS, "outbound-port", |m| &mut m.outbound_ports),
    (SLTERMS_NS, "icmp", |m| &mut m.icmp),
];

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidMetadata(msg.into())
}

fn prefix_of(ns: &str) -> &'static str {
    match ns {
        DCTERMS_NS => "dcterms",
        SLTERMS_NS => "slterms",
        SLREQ_NS => "slreq",
        RDF_NS => "rdf",
        _ => "?",
    }
}

fn qname(e: &Element) -> String {
    format!("{}:{}", prefix_of(&e.ns), e.local_name())
}

/// The only child element `{ns}local` of `e`, checking it is there exactly once.
fn single<'a>(e: &'a Element, ns: &str, local: &str) -> Result<&'a Element> {
    let mut it = e
        .child_elements()
        .map(|(_, c)| c)
        .filter(|c| c.is(ns, local));
    let first = it
        .next()
        .ok_or_else(|| invalid(format!("missing {}:{local} in {}", prefix_of(ns), qname(e))))?;
    if it.next().is_some() {
        return Err(invalid(format!(
            "more than one {}:{local} in {}",
            prefix_of(ns),
            qname(e)
        )));
    }
    Ok(first)
}

fn only_children(e: &Element, allowed: &[(&str, &str)]) -> Result<()> {
    for (_, c) in e.child_elements() {
        if !allowed.iter().any(|(ns, l)| c.is(ns, l)) {
            return Err(invalid(format!(
                "unexpected element <{}> in {}",
                c.name,
                qname(e)
            )));
        }
    }
    Ok(())
}

fn text_of(e: &Element) -> Result<String> {
    if e.child_elements().next().is_some() {
        return Err(invalid(format!("{} must contain only text", qname(e))));
    }
    Ok(e.text().trim().to_string())
}

fn non_empty(e: &Element) -> Result<String> {
    let t = text_of(e)?;
    if t.is_empty() {
        return Err(invalid(format!("{} is empty", qname(e))));
    }
    Ok(t)
}

impl Metadata {
    /// Parse an RDF/XML entry (a `ds:Signature` child of `rdf:RDF` is ignored here; use
    /// [`crate::ops::validate`] to check it).
    pub fn from_xml(xml_text: &str) -> Result<Metadata> {
        let doc = xml::parse(xml_text).map_err(|e| invalid(e.to_string()))?;
        Metadata::from_element(&doc.root)
    }

    /// Parse from the `rdf:RDF` element.
    pub fn from_element(root: &Element) -> Result<Metadata> {
        if !root.is(RDF_NS, "RDF") {
            return Err(invalid(format!(
                "document element is <{}>, not rdf:RDF",
                root.name
            )));
        }
        let mut descs = Vec::new();
        for (_, c) in root.child_elements() {
            if c.is(RDF_NS, "Description") {
                descs.push(c);
            } else if !c.is(DSIG_NS, "Signature") {
                return Err(invalid(format!(
                    "unexpected element <{}> in rdf:RDF",
                    c.name
                )));
            }
        }
        let desc = match descs.as_slice() {
            [d] => *d,
            [] => return Err(invalid("missing rdf:Description")),
            _ => return Err(invalid("more than one rdf:Description")),
        };

        const REQUIRED: [&str; 5] = [
            "dcterms:identifier",
            "slreq:bytes",
            "slreq:checksum",
            "slreq:endorsement",
            "dcterms:type",
        ];
        let mut last: Option<usize> = None;
        let mut identifier = None;
        let mut bytes = None;
        let mut checksums = Checksums::default();
        let mut endorsement = None;
        let mut image_type = None;
        let mut m = Metadata::empty_for_parse();
        let mut seen_optional: Vec<String> = Vec::new();

        for (_, c) in desc.child_elements() {
            let q = qname(c);
            if let Some(k) = REQUIRED.iter().position(|r| *r == q) {
                match last {
                    Some(l) if k == l && q == "slreq:checksum" => {}
                    Some(l) if k <= l => {
                        return Err(invalid(format!(
                            "{q} is repeated or out of order (required order: {})",
                            REQUIRED.join(", ")
                        )))
                    }
                    _ => {
                        let expected = last.map_or(0, |l| l + 1);
                        if k != expected {
                            return Err(invalid(format!(
                                "missing {} before {q}",
                                REQUIRED[expected]
                            )));
                        }
                    }
                }
                last = Some(k);
                match k {
                    0 => identifier = Some(non_empty(c)?),
                    1 => {
                        let t = non_empty(c)?;
                        bytes = Some(t.parse::<u64>().map_err(|_| {
                            invalid(format!("slreq:bytes '{t}' is not a non-negative integer"))
                        })?);
                    }
                    2 => {
                        only_children(c, &[(SLREQ_NS, "algorithm"), (SLREQ_NS, "value")])?;
                        let alg: Algorithm =
                            non_empty(single(c, SLREQ_NS, "algorithm")?)?.parse()?;
                        let value = non_empty(single(c, SLREQ_NS, "value")?)?;
                        if checksums.get(alg).is_some() {
                            return Err(invalid(format!("more than one {alg} slreq:checksum")));
                        }
                        match crate::checksum::decode_hex(&value) {
                            Some(b) if b.len() == alg.digest_len() => {}
                            _ => {
                                return Err(invalid(format!(
                                    "{alg} checksum '{value}' is not {} hexadecimal digits",
                                    alg.digest_len() * 2
                                )))
                            }
                        }
                        checksums.insert(alg, &value);
                    }
                    3 => {
                        only_children(c, &[(DCTERMS_NS, "created"), (SLREQ_NS, "endorser")])?;
                        let created = parse_date(
                            &non_empty(single(c, DCTERMS_NS, "created")?)?,
                            "dcterms:created",
                        )?;
                        let e = single(c, SLREQ_NS, "endorser")?;
                        only_children(
                            e,
                            &[
                                (SLREQ_NS, "email"),
                                (SLREQ_NS, "subject"),
                                (SLREQ_NS, "issuer"),
                            ],
                        )?;
                        endorsement = Some(Endorsement {
                            created,
                            endorser: Endorser {
                                email: non_empty(single(e, SLREQ_NS, "email")?)?,
                                subject: non_empty(single(e, SLREQ_NS, "subject")?)?,
                                issuer: non_empty(single(e, SLREQ_NS, "issuer")?)?,
                            },
                        });
                    }
                    _ => image_type = Some(non_empty(c)?),
                }
                continue;
            }
            if let Some((_, _, f)) = LIST_FIELDS.iter().find(|(ns, l, _)| c.is(ns, l)) {
                let v = non_empty(c)?;
                f(&mut m).push(v);
                continue;
            }
            if seen_optional.contains(&q) {
                return Err(invalid(format!("more than one {q}")));
            }
            if let Some((_, _, f)) = TEXT_FIELDS.iter().find(|(ns, l, _)| c.is(ns, l)) {
                *f(&mut m) = Some(text_of(c)?);
            } else if c.is(DCTERMS_NS, "valid") {
                m.valid = Some(parse_date(&non_empty(c)?, "dcterms:valid")?);
            } else if c.is(DCTERMS_NS, "format") {
                m.format = Some(non_empty(c)?.parse()?);
            } else if c.is(DCTERMS_NS, "compression") {
                m.compression = Some(non_empty(c)?.parse()?);
            } else {
                return Err(invalid(format!(
                    "unexpected element <{}> in rdf:Description",
                    c.name
                )));
            }
            seen_optional.push(q);
        }
        if last != Some(4) {
            let missing = last.map_or(0, |l| l + 1);
            return Err(invalid(format!("missing {}", REQUIRED[missing])));
        }
        let identifier_text = identifier.unwrap_or_default();
        m.identifier = identifier_text
            .parse()
            .map_err(|e: Error| invalid(format!("dcterms:identifier: {e}")))?;
        m.bytes = bytes.unwrap_or_default();
        m.checksums = checksums;
        m.endorsement = endorsement.ok_or_else(|| invalid("missing slreq:endorsement"))?;
        m.image_type = image_type.unwrap_or_default();
        if let Some(about) = desc.attr("rdf:about") {
            let want = format!("#{}", m.identifier);
            if about != want && about != format!("{MARKETPLACE_BASE}{want}") {
                return Err(invalid(format!(
                    "rdf:about '{about}' does not match identifier {}",
                    m.identifier
                )));
            }
        }
        m.check()?;
        Ok(m)
    }

    fn empty_for_parse() -> Metadata {
        Metadata {
            identifier: Identifier::from_sha1(&[0; 20]),
            bytes: 0,
            checksums: Checksums::default(),
            endorsement: Endorsement {
                created: DateTime::<Utc>::UNIX_EPOCH,
                endorser: Endorser {
                    email: String::new(),
                    subject: String::new(),
                    issuer: String::new(),
                },
            },
            image_type: String::new(),
            valid: None,
            title: None,
            alternative: None,
            description: None,
            creator: None,
            publisher: None,
            format: None,
            compression: None,
            locations: Vec::new(),
            serial_number: None,
            version: None,
            deprecated: None,
            os: None,
            os_version: None,
            os_arch: None,
            kind: None,
            disks_bus: None,
            hypervisor: None,
            inbound_ports: Vec::new(),
            outbound_ports: Vec::new(),
            icmp: Vec::new(),
        }
    }

    /// A new entry for an image with these size and checksums (SHA-1 required), created now.
    pub fn new(
        bytes: u64,
        checksums: Checksums,
        endorser: Endorser,
        image_type: &str,
    ) -> Result<Metadata> {
        let sha1 = checksums
            .get(Algorithm::Sha1)
            .ok_or_else(|| invalid("a SHA-1 checksum is required"))?;
        let mut m = Metadata::empty_for_parse();
        m.identifier = Identifier::from_sha1_hex(sha1)?;
        m.bytes = bytes;
        m.checksums = checksums;
        m.endorsement = Endorsement {
            created: Utc::now().with_nanosecond_zero(),
            endorser,
        };
        m.image_type = image_type.to_string();
        m.check()?;
        Ok(m)
    }

    /// Check the invariants: exactly one SHA-1 that agrees with the identifier, well-formed
    /// checksums, non-empty required texts.
    pub fn check(&self) -> Result<()> {
        let sha1 = self
            .checksums
            .get(Algorithm::Sha1)
            .ok_or_else(|| invalid("missing SHA-1 slreq:checksum"))?;
        for (alg, v) in self.checksums.iter() {
            match crate::checksum::decode_hex(v) {
                Some(b) if b.len() == alg.digest_len() => {}
                _ => return Err(invalid(format!("{alg} checksum '{v}' is malformed"))),
            }
        }
        let from_sha1 = Identifier::from_sha1_hex(sha1)?;
        if from_sha1 != self.identifier {
            return Err(invalid(format!(
                "identifier {} does not match SHA-1 {sha1} (which gives {from_sha1})",
                self.identifier
            )));
        }
        for (what, v) in [
            ("slreq:email", &self.endorsement.endorser.email),
            ("slreq:subject", &self.endorsement.endorser.subject),
            ("slreq:issuer", &self.endorsement.endorser.issuer),
            ("dcterms:type", &self.image_type),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(format!("{what} is empty")));
            }
        }
        // The JSON form's dates come through serde, not parse_date.
        check_year(&self.endorsement.created, "dcterms:created")?;
        if let Some(valid) = &self.valid {
            check_year(valid, "dcterms:valid")?;
        }
        Ok(())
    }

    /// End of validity: `dcterms:valid`, or creation + 178 days.
    pub fn valid_until(&self) -> DateTime<Utc> {
        self.valid.unwrap_or_else(|| {
            let validity = chrono::Duration::days(DEFAULT_VALIDITY_DAYS);
            let created = self.endorsement.created;
            created
                .checked_add_signed(validity)
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        })
    }

    /// Whether the entry has expired at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.valid_until() < now
    }

    /// Refuse to use an expired or deprecated image; the error says why.
    pub fn check_usable(&self, now: DateTime<Utc>) -> Result<()> {
        if let Some(reason) = &self.deprecated {
            return Err(Error::Deprecated {
                identifier: self.identifier.to_string(),
                reason: reason.clone(),
            });
        }
        if self.is_expired(now) {
            return Err(Error::Expired {
                identifier: self.identifier.to_string(),
                valid: format_date(&self.valid_until()),
            });
        }
        Ok(())
    }

    /// The RDF/XML form (unsigned).
    pub fn to_xml(&self) -> String {
        let mut o = String::new();
        o.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        o.push_str(&format!(
            "<rdf:RDF xmlns:rdf=\"{RDF_NS}\" xmlns:dcterms=\"{DCTERMS_NS}\" xmlns:slterms=\"{SLTERMS_NS}\" xmlns:slreq=\"{SLREQ_NS}\" xml:base=\"{MARKETPLACE_BASE}\">\n"
        ));
        o.push_str("  <rdf:Description rdf:about=\"#");
        escape_attr(self.identifier.as_str(), &mut o);
        o.push_str("\">\n");
        let el = |o: &mut String, indent: usize, name: &str, value: &str| {
            o.push_str(&" ".repeat(indent));
            o.push_str(&format!("<{name}>"));
            escape_text(value, o);
            o.push_str(&format!("</{name}>\n"));
        };
        el(&mut o, 4, "dcterms:identifier", self.identifier.as_str());
        el(&mut o, 4, "slreq:bytes", &self.bytes.to_string());
        for (alg, v) in self.checksums.iter() {
            o.push_str("    <slreq:checksum rdf:parseType=\"Resource\">\n");
            el(&mut o, 6, "slreq:algorithm", alg.name());
            el(&mut o, 6, "slreq:value", v);
            o.push_str("    </slreq:checksum>\n");
        }
        o.push_str("    <slreq:endorsement rdf:parseType=\"Resource\">\n");
        el(
            &mut o,
            6,
            "dcterms:created",
            &format_date(&self.endorsement.created),
        );
        o.push_str("      <slreq:endorser rdf:parseType=\"Resource\">\n");
        let en = &self.endorsement.endorser;
        el(&mut o, 8, "slreq:email", &en.email);
        el(&mut o, 8, "slreq:subject", &en.subject);
        el(&mut o, 8, "slreq:issuer", &en.issuer);
        o.push_str("      </slreq:endorser>\n");
        o.push_str("    </slreq:endorsement>\n");
        el(&mut o, 4, "dcterms:type", &self.image_type);
        if let Some(v) = &self.valid {
            el(&mut o, 4, "dcterms:valid", &format_date(v));
        }
        let mut copy = self.clone();
        for (ns, local, f) in TEXT_FIELDS.iter().take(5) {
            if let Some(v) = f(&mut copy) {
                el(&mut o, 4, &format!("{}:{local}", prefix_of(ns)), v);
            }
        }
        if let Some(f) = self.format {
            el(&mut o, 4, "dcterms:format", f.as_str());
        }
        if let Some(c) = self.compression {
            el(&mut o, 4, "dcterms:compression", c.as_str());
        }
        for (ns, local, f) in LIST_FIELDS.iter().take(1) {
            for v in f(&mut copy).iter() {
                el(&mut o, 4, &format!("{}:{local}", prefix_of(ns)), v);
            }
        }
        for (ns, local, f) in TEXT_FIELDS.iter().skip(5) {
            if let Some(v) = f(&mut copy) {
                el(&mut o, 4, &format!("{}:{local}", prefix_of(ns)), v);
            }
        }
        for (ns, local, f) in LIST_FIELDS.iter().skip(1) {
            for v in f(&mut copy).iter() {
                el(&mut o, 4, &format!("{}:{local}", prefix_of(ns)), v);
            }
        }
        o.push_str("  </rdf:Description>\n");
        o.push_str("</rdf:RDF>\n");
        o
    }

    /// JSON form for our own API.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("metadata serialises")
    }

    /// Parse the JSON form, checking the same invariants as the XML form.
    pub fn from_json(s: &str) -> Result<Metadata> {
        let m: Metadata = serde_json::from_str(s).map_err(|e| invalid(e.to_string()))?;
        m.check()?;
        Ok(m)
    }
}

trait NanosZero {
    fn with_nanosecond_zero(self) -> Self;
}

impl NanosZero for DateTime<Utc> {
    fn with_nanosecond_zero(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}
