//! XML-DSig signing and validation, cross-checked with xmlsec1 both ways.
mod common;

use chrono::Utc;
use common::{run, run_status, Pki};
use stratus_images::dsig::{HashAlg, SignOptions};
use stratus_images::xml::C14nMethod;
use stratus_images::{ops, Error, Metadata};

const FIXTURE: &str = include_str!("fixtures/ttylinux.xml");
const SIGNED_FIXTURE: &str = include_str!("fixtures/ttylinux-signed.xml");

fn entry_for(pki: &Pki) -> Metadata {
    let mut m = Metadata::from_xml(FIXTURE).unwrap();
    m.endorsement.endorser = ops::endorser_of(&pki.signer()).unwrap();
    m.endorsement.created = Utc::now();
    m
}

fn xmlsec_verify(pki: &Pki, signed: &str, name: &str) -> (bool, String) {
    let path = pki.dir.join(name);
    std::fs::write(&path, signed).unwrap();
    run_status(
        "xmlsec1",
        &[
            "--verify",
            "--trusted-pem",
            pki.ca_cert.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
        &pki.dir,
    )
}

#[test]
fn endorser_comes_from_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let e = ops::endorser_of(&pki.signer()).unwrap();
    assert_eq!(e.email, "jane@stratuslab.eu");
    assert_eq!(
        e.subject,
        "emailAddress=jane@stratuslab.eu,CN=Jane Endorser,O=StratusLab,C=EU"
    );
    assert_eq!(e.issuer, "CN=StratusLab Test CA,O=StratusLab,C=EU");
}

#[test]
fn xmlsec1_accepts_what_we_sign() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let signer = pki.signer();
    let m = entry_for(&pki);
    let variants = [
        ("default", SignOptions::default()),
        (
            "sha1-inclusive",
            SignOptions {
                hash: HashAlg::Sha1,
                c14n: C14nMethod::Inclusive {
                    with_comments: false,
                },
            },
        ),
        (
            "sha512-exclusive",
            SignOptions {
                hash: HashAlg::Sha512,
                c14n: C14nMethod::Exclusive {
                    with_comments: false,
                    inclusive_prefixes: vec![],
                },
            },
        ),
    ];
    for (name, opts) in variants {
        let signed = ops::sign(&m, &signer, &opts).unwrap();
        let (ok, out) = xmlsec_verify(&pki, &signed, &format!("{name}.xml"));
        assert!(ok, "xmlsec1 rejected our {name} signature: {out}");
        assert!(out.contains("OK"), "{out}");
        let v = ops::validate(&signed).unwrap();
        assert_eq!(v.signature.hash, opts.hash);
        assert_eq!(v.metadata.identifier, m.identifier);

        // Tampering is caught by both implementations.
        let tampered = signed.replace("<slreq:bytes>41943040", "<slreq:bytes>41943041");
        let (ok, _) = xmlsec_verify(&pki, &tampered, &format!("{name}-tampered.xml"));
        assert!(!ok, "xmlsec1 accepted a tampered entry");
        match ops::validate(&tampered) {
            Err(Error::Signature(msg)) => assert!(msg.contains("digest mismatch"), "{msg}"),
            other => panic!("tampered entry: {other:?}"),
        }
    }
}

fn template(m: &Metadata, exclusive: bool) -> String {
    let sig = if exclusive {
        "<ds:Signature xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\">\n\
         <ds:SignedInfo>\n\
         <ds:CanonicalizationMethod Algorithm=\"http://www.w3.org/2001/10/xml-exc-c14n#\"/>\n\
         <ds:SignatureMethod Algorithm=\"http://www.w3.org/2001/04/xmldsig-more#rsa-sha256\"/>\n\
         <ds:Reference URI=\"\">\n<ds:Transforms>\n\
         <ds:Transform Algorithm=\"http://www.w3.org/2000/09/xmldsig#enveloped-signature\"/>\n\
         <ds:Transform Algorithm=\"http://www.w3.org/2001/10/xml-exc-c14n#\"/>\n\
         </ds:Transforms>\n\
         <ds:DigestMethod Algorithm=\"http://www.w3.org/2001/04/xmlenc#sha256\"/>\n\
         <ds:DigestValue/>\n</ds:Reference>\n</ds:SignedInfo>\n<ds:SignatureValue/>\n\
         <ds:KeyInfo><ds:X509Data><ds:X509Certificate/></ds:X509Data></ds:KeyInfo>\n\
         </ds:Signature>\n"
    } else {
        "<Signature xmlns=\"http://www.w3.org/2000/09/xmldsig#\">\n  <SignedInfo>\n\
         <CanonicalizationMethod Algorithm=\"http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments\"/>\n\
         <SignatureMethod Algorithm=\"http://www.w3.org/2000/09/xmldsig#rsa-sha1\"/>\n\
         <Reference URI=\"\">\n<Transforms>\n\
         <Transform Algorithm=\"http://www.w3.org/2000/09/xmldsig#enveloped-signature\"/>\n\
         </Transforms>\n\
         <DigestMethod Algorithm=\"http://www.w3.org/2000/09/xmldsig#sha1\"/>\n\
         <DigestValue/>\n</Reference>\n  </SignedInfo>\n<SignatureValue/>\n\
         <KeyInfo>\n<X509Data>\n<X509Certificate/>\n</X509Data>\n</KeyInfo>\n</Signature>\n"
    };
    // A comment inside the entry: URI="" must drop it from the digest.
    m.to_xml()
        .replace(
            "  </rdf:Description>",
            "  <!-- built by the test -->\n  </rdf:Description>",
        )
        .replace("</rdf:RDF>", &format!("{sig}</rdf:RDF>"))
}

#[test]
fn we_accept_what_xmlsec1_signs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let m = entry_for(&pki);
    for (name, exclusive, hash) in [
        ("incl-sha1", false, HashAlg::Sha1),
        ("exc-sha256", true, HashAlg::Sha256),
    ] {
        let tmpl = dir.path().join(format!("{name}-tmpl.xml"));
        std::fs::write(&tmpl, template(&m, exclusive)).unwrap();
        let out = dir.path().join(format!("{name}-signed.xml"));
        let keyspec = format!("{},{}", pki.key.display(), pki.cert.display());
        run(
            "xmlsec1",
            &[
                "--sign",
                "--privkey-pem",
                &keyspec,
                "--output",
                out.to_str().unwrap(),
                tmpl.to_str().unwrap(),
            ],
            dir.path(),
        );
        let signed = std::fs::read_to_string(&out).unwrap();
        assert!(signed.contains("SignatureValue>"), "{signed}");
        let v = ops::validate(&signed).unwrap_or_else(|e| panic!("{name}: {e}\n{signed}"));
        assert_eq!(v.signature.hash, hash);
        assert_eq!(v.metadata, Metadata::from_xml(&m.to_xml()).unwrap());
        // Changing any signed byte breaks it.
        let tampered = signed.replace(
            "ttylinux-9.7-i486-base</dcterms:title>",
            "ttylinux-9.8</dcterms:title>",
        );
        assert!(
            ops::validate(&tampered).is_err(),
            "{name}: tampered entry accepted"
        );
    }
}

#[test]
fn validates_the_committed_signed_example() {
    // Signed with xmlsec1 (RSA-SHA1, inclusive C14N with comments) as in 2013 catalogues.
    let v = ops::validate(SIGNED_FIXTURE).unwrap();
    assert_eq!(
        v.metadata.identifier.as_str(),
        "MMZu9WvwKIro-rtBQfDk4PsKO7_"
    );
    assert_eq!(v.signature.hash, HashAlg::Sha1);
    assert_eq!(
        v.signature.identity.email.as_deref(),
        Some("images@stratuslab.eu")
    );
    let tampered = SIGNED_FIXTURE.replace("<slterms:os-arch>i486", "<slterms:os-arch>x86_64");
    assert!(matches!(ops::validate(&tampered), Err(Error::Signature(_))));
}

#[test]
fn endorser_must_match_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let signer = pki.signer();
    let m = entry_for(&pki);
    // Sign documents whose endorser elements differ from the certificate.
    let cases = [
        (
            "email",
            m.to_xml().replace(
                "jane@stratuslab.eu</slreq:email>",
                "mallory@example.org</slreq:email>",
            ),
        ),
        (
            "subject",
            m.to_xml().replace("CN=Jane Endorser", "CN=Mallory"),
        ),
        (
            "issuer",
            m.to_xml().replace("CN=StratusLab Test CA", "CN=Other CA"),
        ),
    ];
    for (field, xml) in cases {
        let signed = signer.sign(&xml, &SignOptions::default()).unwrap();
        match ops::validate(&signed) {
            Err(Error::EndorserMismatch { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected endorser mismatch, got {other:?}"),
        }
    }
    // Other spellings of the same DN are accepted (OpenSSL slash form, spaces, order).
    let xml = m.to_xml().replace(
        "emailAddress=jane@stratuslab.eu,CN=Jane Endorser,O=StratusLab,C=EU",
        "/C=EU/O=StratusLab/CN=Jane Endorser/emailAddress=jane@stratuslab.eu",
    );
    let signed = signer.sign(&xml, &SignOptions::default()).unwrap();
    ops::validate(&signed).unwrap();
}

#[test]
fn unsigned_and_wrong_key_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let m = entry_for(&pki);
    match ops::validate(&m.to_xml()) {
        Err(Error::Signature(msg)) => assert!(msg.contains("not signed"), "{msg}"),
        other => panic!("{other:?}"),
    }
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::new(other_dir.path());
    let e = stratus_images::dsig::Signer::from_pem(
        &std::fs::read_to_string(&other.key).unwrap(),
        &std::fs::read_to_string(&pki.cert).unwrap(),
    )
    .err()
    .expect("mismatched key and certificate");
    assert!(e.to_string().contains("does not belong"), "{e}");
    // A signature whose certificate was swapped for another one fails.
    let signed = ops::sign(&m, &pki.signer(), &SignOptions::default()).unwrap();
    let b64 = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
    };
    let swapped = signed.replace(&b64(&pki.cert), &b64(&other.cert));
    assert_ne!(swapped, signed);
    match ops::validate(&swapped) {
        Err(Error::Signature(msg)) => assert!(msg.contains("does not verify"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn deprecation_is_a_newer_signed_entry() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let signer = pki.signer();
    let m = entry_for(&pki);
    let signed = ops::sign(&m, &signer, &SignOptions::default()).unwrap();
    let original = ops::validate(&signed).unwrap().metadata;
    let dep = ops::deprecate(
        &original,
        "replaced by a newer release",
        &signer,
        &SignOptions::default(),
        Utc::now(),
    )
    .unwrap();
    let (ok, out) = xmlsec_verify(&pki, &dep, "deprecated.xml");
    assert!(ok, "{out}");
    let d = ops::validate(&dep).unwrap().metadata;
    assert_eq!(d.deprecated.as_deref(), Some("replaced by a newer release"));
    assert!(d.endorsement.created > original.endorsement.created);
    assert_eq!(d.identifier, original.identifier);
    let e = d.check_usable(Utc::now()).unwrap_err().to_string();
    assert!(e.contains("deprecated: replaced by a newer release"), "{e}");
}
