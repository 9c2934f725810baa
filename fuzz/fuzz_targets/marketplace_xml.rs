//! Marketplace metadata as it comes off the network: the XML parser, canonicalisation
//! (what a signature covers), `Metadata::from_xml` and the XML-DSig check.
//!
//! Beyond not panicking: canonical XML read back canonicalises to itself (the signature
//! check depends on canonicalisation being a function of the document, not of its
//! spelling), and an entry that parses writes out, as XML and as JSON, to an entry that
//! parses back equal.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use stratus_images::dsig::{self, Verified};
use stratus_images::xml::{self, C14nMethod};
use stratus_images::Metadata;

/// A real signed entry's certificate, to match fuzzed endorser names against.
static SIGNED: LazyLock<Option<Verified>> = LazyLock::new(|| {
    dsig::verify(include_str!(
        "../../images/tests/fixtures/ttylinux-signed.xml"
    ))
    .ok()
});

fn methods() -> [C14nMethod; 4] {
    [
        C14nMethod::Inclusive {
            with_comments: false,
        },
        C14nMethod::Inclusive {
            with_comments: true,
        },
        C14nMethod::Exclusive {
            with_comments: false,
            inclusive_prefixes: Vec::new(),
        },
        C14nMethod::Exclusive {
            with_comments: true,
            inclusive_prefixes: vec!["#default".into(), "rdf".into()],
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(doc) = xml::parse(&text) {
        let signature = xml::find_path(&doc.root, dsig::DSIG_NS, "Signature");
        for method in methods() {
            let Ok(canonical) = xml::canonicalize(&doc, &[], signature.as_deref(), &method, true)
            else {
                continue;
            };
            if let C14nMethod::Inclusive {
                with_comments: false,
            } = method
            {
                let again = xml::parse(&canonical).expect("canonical XML parses");
                let twice = xml::canonicalize(&again, &[], None, &method, true)
                    .expect("canonical XML canonicalises");
                assert_eq!(twice, canonical, "canonicalisation is idempotent");
            }
            if let Some(path) = &signature {
                let _ = xml::canonicalize(&doc, path, None, &method, true);
            }
        }
    }
    if let Ok(metadata) = Metadata::from_xml(&text) {
        let _ = metadata.check();
        let again = Metadata::from_xml(&metadata.to_xml()).expect("written XML parses");
        assert_eq!(again, metadata, "XML round trip");
        if metadata.check().is_ok() {
            let again = Metadata::from_json(&metadata.to_json()).expect("written JSON parses");
            assert_eq!(again, metadata, "JSON round trip");
        }
        if let Some(signed) = &*SIGNED {
            let tbs = &signed.certificate.tbs_certificate;
            let endorser = &metadata.endorsement.endorser;
            let _ = dsig::dn_matches(&endorser.subject, &tbs.subject);
            let _ = dsig::dn_matches(&endorser.issuer, &tbs.issuer);
        }
    }
    // Parses once more, finds the signature, checks digest and RSA signature.
    let _ = stratus_images::ops::validate(&text);
});
