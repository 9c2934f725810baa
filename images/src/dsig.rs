//! Enveloped XML-DSig (RSA with SHA-1/SHA-256/SHA-512, X.509 certificate in `KeyInfo`)
//! over whole documents (`Reference URI=""`), compatible with `xmlsec1`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use x509_cert::der::{Decode, DecodePem, Encode, Tag, Tagged};
use x509_cert::name::Name;
use x509_cert::Certificate;

use crate::error::{Error, Result};
use crate::xml::{self, C14nMethod, Element};

pub const DSIG_NS: &str = "http://www.w3.org/2000/09/xmldsig#";
pub const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";
const EMAIL_OID: &str = "1.2.840.113549.1.9.1";

/// Hash used for both the reference digest and the RSA signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlg {
    pub fn digest_uri(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "http://www.w3.org/2000/09/xmldsig#sha1",
            HashAlg::Sha256 => "http://www.w3.org/2001/04/xmlenc#sha256",
            HashAlg::Sha512 => "http://www.w3.org/2001/04/xmlenc#sha512",
        }
    }

    pub fn signature_uri(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "http://www.w3.org/2000/09/xmldsig#rsa-sha1",
            HashAlg::Sha256 => "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
            HashAlg::Sha512 => "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512",
        }
    }

    fn from_digest_uri(u: &str) -> Option<HashAlg> {
        [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512]
            .into_iter()
            .find(|h| h.digest_uri() == u)
    }

    fn from_signature_uri(u: &str) -> Option<HashAlg> {
        [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512]
            .into_iter()
            .find(|h| h.signature_uri() == u)
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha1 => Sha1::digest(data).to_vec(),
            HashAlg::Sha256 => Sha256::digest(data).to_vec(),
            HashAlg::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn pkcs1(self) -> Pkcs1v15Sign {
        match self {
            HashAlg::Sha1 => Pkcs1v15Sign::new::<Sha1>(),
            HashAlg::Sha256 => Pkcs1v15Sign::new::<Sha256>(),
            HashAlg::Sha512 => Pkcs1v15Sign::new::<Sha512>(),
        }
    }
}

/// How to sign.
#[derive(Clone, Debug)]
pub struct SignOptions {
    pub hash: HashAlg,
    /// Canonicalisation of `SignedInfo`.
    pub c14n: C14nMethod,
}

impl Default for SignOptions {
    /// RSA-SHA256, inclusive C14N with comments (as StratusLab's signer used).
    fn default() -> Self {
        SignOptions {
            hash: HashAlg::Sha256,
            c14n: C14nMethod::Inclusive {
                with_comments: true,
            },
        }
    }
}

/// Identity fields of an X.509 certificate, as written in endorser elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    /// Subject DN in RFC 4514 form (most specific first, e.g. `CN=Jane,O=Lab,C=FR`).
    pub subject: String,
    /// Issuer DN in RFC 4514 form.
    pub issuer: String,
    /// Email from the subject's emailAddress or a subjectAltName rfc822Name.
    pub email: Option<String>,
}

/// An RSA key with its certificate.
pub struct Signer {
    key: RsaPrivateKey,
    cert: Certificate,
    cert_der: Vec<u8>,
}

impl Signer {
    /// From a PEM private key (PKCS#8 or PKCS#1, unencrypted) and a PEM certificate.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Signer> {
        let key = RsaPrivateKey::from_pkcs8_pem(key_pem)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(key_pem))
            .map_err(|e| {
                Error::Key(format!(
                    "not an unencrypted PEM RSA private key (PKCS#8 or PKCS#1): {e}"
                ))
            })?;
        let cert = Certificate::from_pem(cert_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("not a PEM X.509 certificate: {e}")))?;
        let cert_der = cert
            .to_der()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let public = cert_public_key(&cert)?;
        if public.n() != key.n() || public.e() != key.e() {
            return Err(Error::Key(
                "the private key does not belong to the certificate".into(),
            ));
        }
        Ok(Signer {
            key,
            cert,
            cert_der,
        })
    }

    /// Identity of the signer's certificate.
    pub fn identity(&self) -> Result<CertIdentity> {
        cert_identity(&self.cert)
    }

    /// Sign a document: an enveloped `Signature` becomes the last child of the document
    /// element.
    pub fn sign(&self, document: &str, opts: &SignOptions) -> Result<String> {
        let doc = xml::parse(document)?;
        if xml::find_path(&doc.root, DSIG_NS, "Signature").is_some() {
            return Err(Error::Signature("the document is already signed".into()));
        }
        let end_tag = format!("</{}", doc.root.name);
        let at = document
            .rfind(&end_tag)
            .ok_or_else(|| Error::Xml(format!("no end tag {end_tag}>")))?;
        let cert_b64 = B64.encode(&self.cert_der);
        let build = |digest: &str, value: &str| -> String {
            let mut s = String::new();
            s.push_str(&format!("<Signature xmlns=\"{DSIG_NS}\">\n<SignedInfo>\n"));
            s.push_str(&format!(
                "<CanonicalizationMethod Algorithm=\"{}\"/>\n",
                opts.c14n.uri()
            ));
            s.push_str(&format!(
                "<SignatureMethod Algorithm=\"{}\"/>\n",
                opts.hash.signature_uri()
            ));
            s.push_str("<Reference URI=\"\">\n<Transforms>\n");
            s.push_str(&format!("<Transform Algorithm=\"{ENVELOPED}\"/>\n"));
            s.push_str("</Transforms>\n");
            s.push_str(&format!(
                "<DigestMethod Algorithm=\"{}\"/>\n",
                opts.hash.digest_uri()
            ));
            s.push_str(&format!("<DigestValue>{digest}</DigestValue>\n"));
            s.push_str("</Reference>\n</SignedInfo>\n");
            s.push_str(&format!("<SignatureValue>{value}</SignatureValue>\n"));
            s.push_str("<KeyInfo>\n<X509Data>\n");
            s.push_str(&format!("<X509Certificate>{cert_b64}</X509Certificate>\n"));
            s.push_str("</X509Data>\n</KeyInfo>\n</Signature>\n");
            format!("{}{}{}", &document[..at], s, &document[at..])
        };
        // The digest covers the document without the Signature element (enveloped).
        let draft = build("", "");
        let ddoc = xml::parse(&draft)?;
        let sig_path = xml::find_path(&ddoc.root, DSIG_NS, "Signature")
            .ok_or_else(|| Error::Signature("signature element lost".into()))?;
        let canon = xml::canonicalize(
            &ddoc,
            &[],
            Some(&sig_path),
            &C14nMethod::Inclusive {
                with_comments: false,
            },
            false,
        )?;
        let digest = B64.encode(opts.hash.hash(canon.as_bytes()));
        let with_digest = build(&digest, "");
        let sdoc = xml::parse(&with_digest)?;
        let mut si_path = sig_path.clone();
        let sig_el = sdoc.root.at_path(&sig_path).expect("signature path");
        let (si_idx, _) = sig_el
            .child_elements()
            .find(|(_, e)| e.is(DSIG_NS, "SignedInfo"))
            .expect("SignedInfo present");
        si_path.push(si_idx);
        let si_canon = xml::canonicalize(&sdoc, &si_path, None, &opts.c14n, true)?;
        let sig = self
            .key
            .sign(opts.hash.pkcs1(), &opts.hash.hash(si_canon.as_bytes()))
            .map_err(|e| Error::Signature(format!("RSA signing failed: {e}")))?;
        tracing::debug!(hash = ?opts.hash, c14n = opts.c14n.uri(), "signed document");
        Ok(build(&digest, &B64.encode(sig)))
    }
}

fn cert_public_key(cert: &Certificate) -> Result<RsaPublicKey> {
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| Error::Certificate(e.to_string()))?;
    RsaPublicKey::from_public_key_der(&spki)
        .map_err(|e| Error::Certificate(format!("certificate key is not RSA: {e}")))
}

fn attr_name(oid: &str) -> String {
    match oid {
        "2.5.4.3" => "CN".into(),
        "2.5.4.6" => "C".into(),
        "2.5.4.7" => "L".into(),
        "2.5.4.8" => "ST".into(),
        "2.5.4.9" => "STREET".into(),
        "2.5.4.10" => "O".into(),
        "2.5.4.11" => "OU".into(),
        "0.9.2342.19200300.100.1.25" => "DC".into(),
        "0.9.2342.19200300.100.1.1" => "UID".into(),
        EMAIL_OID => "emailAddress".into(),
        o => o.to_string(),
    }
}

fn canonical_attr_type(t: &str) -> String {
    let t = t.trim().to_ascii_lowercase();
    match t.as_str() {
        "e" | "email" | "emailaddress" | EMAIL_OID => "emailaddress".into(),
        "s" | "st" => "st".into(),
        "2.5.4.3" => "cn".into(),
        "2.5.4.6" => "c".into(),
        "2.5.4.7" => "l".into(),
        "2.5.4.8" => "st".into(),
        "2.5.4.10" => "o".into(),
        "2.5.4.11" => "ou".into(),
        _ => t,
    }
}

/// The attributes of a name as (type, value), in certificate (least specific first) order.
fn name_attrs(name: &Name) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            let value = match atv.value.tag() {
                Tag::PrintableString
                | Tag::Utf8String
                | Tag::Ia5String
                | Tag::TeletexString
                | Tag::VisibleString => String::from_utf8_lossy(atv.value.value()).into_owned(),
                _ => format!(
                    "#{}",
                    crate::checksum::encode_hex(&atv.value.to_der().unwrap_or_default())
                ),
            };
            out.push((attr_name(&atv.oid.to_string()), value));
        }
    }
    Ok(out)
}

fn escape_dn_value(v: &str) -> String {
    let mut s = String::new();
    for (i, c) in v.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == v.chars().count() && c == ' ')
        {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// RFC 4514 form of a name (most specific first).
pub fn format_dn(name: &Name) -> Result<String> {
    let attrs = name_attrs(name)?;
    Ok(attrs
        .iter()
        .rev()
        .map(|(t, v)| format!("{t}={}", escape_dn_value(v)))
        .collect::<Vec<_>>()
        .join(","))
}

/// Split a DN string in RFC 4514 (`CN=a,O=b`), OpenSSL (`C = FR, O = b`) or slash
/// (`/C=FR/O=b`) form into normalised (type, value) pairs in written order.
fn parse_dn(s: &str) -> Vec<(String, String)> {
    let s = s.trim();
    let (sep, body) = if let Some(rest) = s.strip_prefix('/') {
        ('/', rest)
    } else {
        (',', s)
    };
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep || (sep == ',' && c == '+') {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((t, v)) => (canonical_attr_type(t), v.trim().to_lowercase()),
            None => (String::new(), p.trim().to_lowercase()),
        })
        .collect()
}

/// Whether two DN strings name the same DN, however each is written (RFC 4514, OpenSSL or
/// slash form, either order, values in any case).
pub fn same_dn(a: &str, b: &str) -> bool {
    let (a, b) = (parse_dn(a), parse_dn(b));
    !a.is_empty() && (a == b || a.iter().rev().eq(b.iter()))
}

/// Whether a DN string names `name` (either order, case-insensitive values).
pub fn dn_matches(text: &str, name: &Name) -> bool {
    let Ok(attrs) = name_attrs(name) else {
        return false;
    };
    let cert: Vec<(String, String)> = attrs
        .into_iter()
        .map(|(t, v)| (canonical_attr_type(&t), v.trim().to_lowercase()))
        .collect();
    let written = parse_dn(text);
    let reversed: Vec<_> = cert.iter().rev().cloned().collect();
    written == cert || written == reversed
}

/// Subject, issuer and email of a certificate.
pub fn cert_identity(cert: &Certificate) -> Result<CertIdentity> {
    let tbs = &cert.tbs_certificate;
    let mut email = name_attrs(&tbs.subject)?
        .into_iter()
        .find(|(t, _)| t == "emailAddress")
        .map(|(_, v)| v);
    if email.is_none() {
        for ext in tbs.extensions.iter().flatten() {
            if ext.extn_id.to_string() == "2.5.29.17" {
                if let Ok(san) =
                    x509_cert::ext::pkix::SubjectAltName::from_der(ext.extn_value.as_bytes())
                {
                    for g in san.0 {
                        if let x509_cert::ext::pkix::name::GeneralName::Rfc822Name(m) = g {
                            email = Some(m.to_string());
                            break;
                        }
                    }
                }
            }
        }
    }
    Ok(CertIdentity {
        subject: format_dn(&tbs.subject)?,
        issuer: format_dn(&tbs.issuer)?,
        email,
    })
}

/// A successfully verified signature.
#[derive(Clone, Debug)]
pub struct Verified {
    pub certificate: Certificate,
    /// The signing certificate as it came (DER), and the other certificates of the
    /// signature's `X509Data` (intermediates towards a CA).
    pub certificate_der: Vec<u8>,
    pub chain_der: Vec<Vec<u8>>,
    pub identity: CertIdentity,
    pub hash: HashAlg,
    pub c14n: String,
}

fn algorithm_of<'a>(e: &'a Element, what: &str) -> Result<&'a str> {
    e.attr("Algorithm")
        .ok_or_else(|| Error::Signature(format!("{what} has no Algorithm")))
}

fn child<'a>(e: &'a Element, local: &str) -> Result<(usize, &'a Element)> {
    e.child_elements()
        .find(|(_, c)| c.is(DSIG_NS, local))
        .ok_or_else(|| Error::Signature(format!("missing ds:{local} in ds:{}", e.local_name())))
}

fn c14n_of(e: &Element) -> Result<C14nMethod> {
    let uri = algorithm_of(e, &format!("ds:{}", e.local_name()))?;
    let mut m = C14nMethod::from_uri(uri)
        .ok_or_else(|| Error::Signature(format!("unsupported canonicalisation '{uri}'")))?;
    if let C14nMethod::Exclusive {
        inclusive_prefixes, ..
    } = &mut m
    {
        if let Some((_, inc)) = e
            .child_elements()
            .find(|(_, c)| c.is(xml::EXC_C14N, "InclusiveNamespaces"))
        {
            *inclusive_prefixes = inc
                .attr("PrefixList")
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect();
        }
    }
    Ok(m)
}

fn b64_decode(text: &str, what: &str) -> Result<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    B64.decode(clean)
        .map_err(|e| Error::Signature(format!("{what} is not base64: {e}")))
}

/// Verify the enveloped signature of a document with the certificate in its `KeyInfo`.
/// The signature must cover the whole document (`Reference URI=""` with the
/// enveloped-signature transform).
pub fn verify(document: &str) -> Result<Verified> {
    let doc = xml::parse(document)?;
    let sig_path = xml::find_path(&doc.root, DSIG_NS, "Signature")
        .ok_or_else(|| Error::Signature("the document is not signed (no ds:Signature)".into()))?;
    let sig = doc.root.at_path(&sig_path).expect("found path");
    // Only one signature is allowed.
    let mut probe = doc.clone();
    remove_at(&mut probe.root, &sig_path);
    if xml::find_path(&probe.root, DSIG_NS, "Signature").is_some() {
        return Err(Error::Signature("more than one ds:Signature".into()));
    }
    let (si_idx, si) = child(sig, "SignedInfo")?;
    let (_, cm) = child(si, "CanonicalizationMethod")?;
    let si_c14n = c14n_of(cm)?;
    let (_, sm) = child(si, "SignatureMethod")?;
    let sm_uri = algorithm_of(sm, "ds:SignatureMethod")?;
    let sig_hash = HashAlg::from_signature_uri(sm_uri)
        .ok_or_else(|| Error::Signature(format!("unsupported signature method '{sm_uri}'")))?;
    let refs: Vec<&Element> = si
        .child_elements()
        .map(|(_, e)| e)
        .filter(|e| e.is(DSIG_NS, "Reference"))
        .collect();
    let reference = match refs.as_slice() {
        [r] => *r,
        _ => {
            return Err(Error::Signature(format!(
                "expected exactly one ds:Reference, found {}",
                refs.len()
            )))
        }
    };
    match reference.attr("URI") {
        Some("") => {}
        other => {
            return Err(Error::Signature(format!(
                "ds:Reference URI must be \"\" (whole document), found {other:?}"
            )))
        }
    }
    let mut enveloped = false;
    let mut ref_c14n = C14nMethod::Inclusive {
        with_comments: false,
    };
    if let Ok((_, transforms)) = child(reference, "Transforms") {
        for (_, t) in transforms.child_elements() {
            let uri = algorithm_of(t, "ds:Transform")?;
            if uri == ENVELOPED {
                enveloped = true;
            } else if C14nMethod::from_uri(uri).is_some() {
                ref_c14n = c14n_of(t)?;
            } else {
                return Err(Error::Signature(format!("unsupported transform '{uri}'")));
            }
        }
    }
    if !enveloped {
        return Err(Error::Signature(
            "ds:Reference lacks the enveloped-signature transform".into(),
        ));
    }
    let (_, dm) = child(reference, "DigestMethod")?;
    let dm_uri = algorithm_of(dm, "ds:DigestMethod")?;
    let digest_hash = HashAlg::from_digest_uri(dm_uri)
        .ok_or_else(|| Error::Signature(format!("unsupported digest method '{dm_uri}'")))?;
    let (_, dv) = child(reference, "DigestValue")?;
    let expected_digest = b64_decode(&dv.text(), "ds:DigestValue")?;

    // Key and certificate.
    let (_, ki) = child(sig, "KeyInfo")?;
    let (_, xd) = child(ki, "X509Data")?;
    let mut ders = xd
        .child_elements()
        .filter(|(_, c)| c.is(DSIG_NS, "X509Certificate"))
        .map(|(_, c)| b64_decode(&c.text(), "ds:X509Certificate"));
    let cert_der = ders
        .next()
        .ok_or_else(|| Error::Signature("missing ds:X509Certificate in ds:X509Data".into()))??;
    let chain_der = ders.collect::<Result<Vec<_>>>()?;
    let certificate = Certificate::from_der(&cert_der)
        .map_err(|e| Error::Certificate(format!("ds:X509Certificate: {e}")))?;
    let public = cert_public_key(&certificate)?;

    // Reference digest: URI="" drops comments, the enveloped transform drops the Signature.
    let canon = xml::canonicalize(&doc, &[], Some(&sig_path), &ref_c14n, false)?;
    let actual_digest = digest_hash.hash(canon.as_bytes());
    if actual_digest != expected_digest {
        return Err(Error::Signature(format!(
            "digest mismatch: the signed content was modified (expected {}, computed {})",
            B64.encode(&expected_digest),
            B64.encode(&actual_digest)
        )));
    }
    let (_, sv) = child(sig, "SignatureValue")?;
    let sig_bytes = b64_decode(&sv.text(), "ds:SignatureValue")?;
    let mut si_path = sig_path.clone();
    si_path.push(si_idx);
    let si_canon = xml::canonicalize(&doc, &si_path, None, &si_c14n, true)?;
    public
        .verify(
            sig_hash.pkcs1(),
            &sig_hash.hash(si_canon.as_bytes()),
            &sig_bytes,
        )
        .map_err(|_| {
            Error::Signature("ds:SignatureValue does not verify with the certificate's key".into())
        })?;
    let identity = cert_identity(&certificate)?;
    tracing::debug!(subject = %identity.subject, "signature verified");
    Ok(Verified {
        certificate,
        certificate_der: cert_der,
        chain_der,
        identity,
        hash: sig_hash,
        c14n: si_c14n.uri().to_string(),
    })
}

fn remove_at(root: &mut Element, path: &[usize]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut e = root;
    for i in parents {
        e = match &mut e.children[*i] {
            xml::Node::Element(c) => c,
            _ => return,
        };
    }
    e.children.remove(*last);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_parsing_forms() {
        let a = parse_dn("CN=Jane Doe,O=Lab\\, Inc,C=FR");
        assert_eq!(
            a,
            vec![
                ("cn".into(), "jane doe".into()),
                ("o".into(), "lab, inc".into()),
                ("c".into(), "fr".into())
            ]
        );
        assert_eq!(parse_dn("/C=FR/O=Lab, Inc/CN=Jane Doe").len(), 3);
        assert_eq!(parse_dn("C = FR, E = a@b")[1].0, "emailaddress");
    }

    #[test]
    fn escaping_dn_values() {
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
        assert_eq!(escape_dn_value("#x "), "\\#x\\ ");
    }
}

/// ExtendedKeyUsage id-kp-emailProtection (1.3.6.1.5.5.7.3.4): an endorser's certificate
/// that lists purposes must list this one.
const EMAIL_PROTECTION: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x04];

/// The certificate authorities a site trusts to vouch for endorsers (StratusLab's sites
/// trusted the grid's IGTF CAs). A signature proves nothing about who made it unless its
/// certificate chains to one of them: anyone can make a certificate naming anyone.
#[derive(Clone, Debug)]
pub struct TrustedCas {
    certificates: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl TrustedCas {
    /// The CA certificates of a PEM bundle (`origin` names it in errors).
    pub fn from_pem(pem: &str, origin: &str) -> Result<TrustedCas> {
        use rustls_pki_types::pem::PemObject;
        let certificates = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate(format!("{origin}: {e}")))?;
        if certificates.is_empty() {
            return Err(Error::Certificate(format!(
                "{origin} holds no CA certificate"
            )));
        }
        for c in &certificates {
            webpki::anchor_from_trusted_cert(c).map_err(|e| {
                Error::Certificate(format!("{origin}: a certificate that cannot be a CA: {e}"))
            })?;
        }
        Ok(TrustedCas { certificates })
    }

    pub fn load(path: &std::path::Path) -> Result<TrustedCas> {
        let pem = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Whether the signature's certificate chains to one of these CAs (through the
    /// signature's other certificates) and every certificate on the way is valid at `now`.
    pub fn check(&self, verified: &Verified, now: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let anchors: Vec<_> = self
            .certificates
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        let untrusted = |reason: String| Error::UntrustedEndorser {
            subject: verified.identity.subject.clone(),
            reason,
        };
        let end_entity =
            rustls_pki_types::CertificateDer::from(verified.certificate_der.as_slice());
        let end_entity = webpki::EndEntityCert::try_from(&end_entity).map_err(|e| {
            untrusted(format!(
                "it cannot be read as an X.509 v3 certificate ({e})"
            ))
        })?;
        let intermediates: Vec<_> = verified
            .chain_der
            .iter()
            .map(|d| rustls_pki_types::CertificateDer::from(d.as_slice()))
            .collect();
        let time = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now.timestamp()).unwrap_or(0),
        ));
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                time,
                webpki::KeyUsage::required_if_present(EMAIL_PROTECTION),
                None,
                None,
            )
            .map(|_| ())
            .map_err(|e| untrusted(explain_untrusted(&e)))
    }
}

fn explain_untrusted(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => {
            "it was not issued by a CA this site trusts (the Marketplace's trusted CA bundle)"
                .into()
        }
        // A CA with a trusted CA's name but another key: a forgery.
        webpki::Error::InvalidSignatureForPublicKey => {
            "it was not issued by a CA this site trusts (its issuer has a trusted CA's name \
             but not its key)"
                .into()
        }
        webpki::Error::CertExpired { .. } => "it (or a CA certificate above it) has expired".into(),
        webpki::Error::CertNotValidYet { .. } => "it is not valid yet".into(),
        webpki::Error::CaUsedAsEndEntity => "it is a CA certificate, not an endorser's".into(),
        webpki::Error::UnsupportedCertVersion => {
            "it is an X.509 v1 certificate; endorsers need v3 certificates".into()
        }
        other => format!("{other:?}"),
    }
}
