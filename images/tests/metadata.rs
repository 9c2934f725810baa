use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use stratus_images::{Algorithm, Compression, Error, Identifier, ImageFormat, Metadata};

const FIXTURE: &str = include_str!("fixtures/ttylinux.xml");

#[test]
fn identifier_reference_test_vector() {
    let id = Identifier::from_sha1_hex("c319bbd5afc0a22ba3eaed0507c39383ec28eeff").unwrap();
    assert_eq!(id.as_str(), "MMZu9WvwKIro-rtBQfDk4PsKO7_");
}

proptest! {
    #[test]
    fn identifier_round_trips(bytes in proptest::array::uniform20(any::<u8>())) {
        let id = Identifier::from_sha1(&bytes);
        prop_assert_eq!(id.as_str().len(), 27);
        prop_assert!(id.as_str().bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        prop_assert_eq!(id.to_sha1(), bytes);
        let reparsed: Identifier = id.as_str().parse().unwrap();
        prop_assert_eq!(&reparsed, &id);
    }

    #[test]
    fn identifier_orders_like_the_integer(a in proptest::array::uniform20(any::<u8>()),
                                          b in proptest::array::uniform20(any::<u8>())) {
        // Digit values compare like the numbers: compare digit by digit.
        let val = |c: u8| "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".find(c as char).unwrap();
        let ia = Identifier::from_sha1(&a);
        let ib = Identifier::from_sha1(&b);
        let da: Vec<usize> = ia.as_str().bytes().map(val).collect();
        let db: Vec<usize> = ib.as_str().bytes().map(val).collect();
        prop_assert_eq!(da.cmp(&db), a.cmp(&b));
    }

    #[test]
    fn random_text_never_panics(s in "[A-Za-z0-9_+/=-]{0,30}") {
        if let Ok(id) = s.parse::<Identifier>() {
            prop_assert_eq!(Identifier::from_sha1(&id.to_sha1()), id);
        }
    }
}

#[test]
fn parses_full_fixture() {
    let m = Metadata::from_xml(FIXTURE).unwrap();
    assert_eq!(m.identifier.as_str(), "MMZu9WvwKIro-rtBQfDk4PsKO7_");
    assert_eq!(m.bytes, 41_943_040);
    assert_eq!(m.checksums.iter().count(), 3);
    assert_eq!(
        m.checksums.get(Algorithm::Md5),
        Some("8ad8757baa8564dc136c1e07507f4a98")
    );
    assert_eq!(
        m.endorsement.created,
        Utc.with_ymd_and_hms(2013, 5, 24, 14, 13, 27).unwrap()
    );
    assert_eq!(m.endorsement.endorser.email, "images@stratuslab.eu");
    assert_eq!(m.image_type, "machine");
    assert_eq!(
        m.description.as_deref(),
        Some("A very small Linux distribution (<10 MB) for tests & demos.")
    );
    assert_eq!(m.format, Some(ImageFormat::Raw));
    assert_eq!(m.compression, Some(Compression::Gz));
    assert_eq!(m.locations.len(), 2);
    assert_eq!(m.inbound_ports, vec!["22", "80"]);
    assert_eq!(m.outbound_ports, vec!["443"]);
    assert_eq!(m.icmp, vec!["8"]);
    assert_eq!(m.os_arch.as_deref(), Some("i486"));
    assert_eq!(m.disks_bus.as_deref(), Some("virtio"));
    assert_eq!(
        m.valid,
        Some(Utc.with_ymd_and_hms(2013, 11, 18, 14, 13, 27).unwrap())
    );
}

#[test]
fn xml_round_trip_is_stable() {
    let m = Metadata::from_xml(FIXTURE).unwrap();
    let xml = m.to_xml();
    assert!(xml.contains("xml:base=\"http://mp.stratuslab.eu/\""));
    assert!(xml.contains("rdf:about=\"#MMZu9WvwKIro-rtBQfDk4PsKO7_\""));
    assert!(xml.contains("&lt;10 MB) for tests &amp; demos"));
    let again = Metadata::from_xml(&xml).unwrap();
    assert_eq!(again, m);
    assert_eq!(again.to_xml(), xml);
    // Required elements come first and in order.
    let pos = |s: &str| xml.find(s).unwrap_or_else(|| panic!("{s} missing"));
    assert!(pos("<dcterms:identifier>") < pos("<slreq:bytes>"));
    assert!(pos("<slreq:bytes>") < pos("<slreq:checksum"));
    assert!(pos("<slreq:checksum") < pos("<slreq:endorsement"));
    assert!(pos("<slreq:endorsement") < pos("<dcterms:type>"));
}

#[test]
fn json_round_trip() {
    let m = Metadata::from_xml(FIXTURE).unwrap();
    let json = m.to_json();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["identifier"], "MMZu9WvwKIro-rtBQfDk4PsKO7_");
    assert_eq!(
        v["checksums"]["SHA-1"],
        "c319bbd5afc0a22ba3eaed0507c39383ec28eeff"
    );
    assert_eq!(v["type"], "machine");
    assert_eq!(v["compression"], "gz");
    assert_eq!(Metadata::from_json(&json).unwrap(), m);
    // The JSON form enforces the identifier/SHA-1 agreement too.
    let bad = json.replace("MMZu9WvwKIro-rtBQfDk4PsKO7_", "AAAu9WvwKIro-rtBQfDk4PsKO7_");
    let e = Metadata::from_json(&bad).unwrap_err().to_string();
    assert!(e.contains("does not match SHA-1"), "{e}");
}

fn expect_invalid(xml: &str, needle: &str) {
    match Metadata::from_xml(xml) {
        Err(Error::InvalidMetadata(msg)) => {
            assert!(
                msg.contains(needle),
                "message '{msg}' should name '{needle}'"
            )
        }
        other => panic!("expected invalid metadata naming '{needle}', got {other:?}"),
    }
}

#[test]
fn rejects_missing_required_elements() {
    let no_bytes = FIXTURE.replace("<slreq:bytes>41943040</slreq:bytes>", "");
    expect_invalid(&no_bytes, "missing slreq:bytes");
    let no_type = FIXTURE.replace("<dcterms:type>machine</dcterms:type>", "");
    expect_invalid(&no_type, "missing dcterms:type");
    let no_email = FIXTURE.replace("<slreq:email>images@stratuslab.eu</slreq:email>", "");
    expect_invalid(&no_email, "slreq:email");
}

#[test]
fn rejects_wrong_order_and_cardinality() {
    // dcterms:type before the endorsement.
    let moved = FIXTURE
        .replace("<dcterms:type>machine</dcterms:type>", "")
        .replace(
            "<slreq:endorsement rdf:parseType=\"Resource\">",
            "<dcterms:type>machine</dcterms:type><slreq:endorsement rdf:parseType=\"Resource\">",
        );
    expect_invalid(&moved, "missing slreq:endorsement before dcterms:type");
    let twice = FIXTURE.replace(
        "<dcterms:type>machine</dcterms:type>",
        "<dcterms:type>machine</dcterms:type><dcterms:type>disk</dcterms:type>",
    );
    expect_invalid(&twice, "dcterms:type is repeated");
    let two_titles = FIXTURE.replace(
        "<dcterms:alternative>",
        "<dcterms:title>again</dcterms:title><dcterms:alternative>",
    );
    expect_invalid(&two_titles, "more than one dcterms:title");
    let two_sha1 = FIXTURE.replace(
        "<slreq:algorithm>MD5</slreq:algorithm>\n      <slreq:value>8ad8757baa8564dc136c1e07507f4a98</slreq:value>",
        "<slreq:algorithm>SHA-1</slreq:algorithm>\n      <slreq:value>c319bbd5afc0a22ba3eaed0507c39383ec28eeff</slreq:value>",
    );
    expect_invalid(&two_sha1, "more than one SHA-1");
}

#[test]
fn rejects_identifier_sha1_disagreement() {
    let bad = FIXTURE.replace(
        "c319bbd5afc0a22ba3eaed0507c39383ec28eeff",
        "c319bbd5afc0a22ba3eaed0507c39383ec28eefe",
    );
    expect_invalid(&bad, "does not match SHA-1");
    let about = FIXTURE.replace("rdf:about=\"#MMZu9", "rdf:about=\"#XMZu9");
    expect_invalid(&about, "rdf:about");
}

#[test]
fn rejects_bad_values_naming_them() {
    expect_invalid(
        &FIXTURE.replace("2013-05-24T14:13:27Z", "24/05/2013"),
        "dcterms:created '24/05/2013'",
    );
    expect_invalid(
        &FIXTURE.replace("<slreq:bytes>41943040", "<slreq:bytes>-4"),
        "slreq:bytes '-4'",
    );
    expect_invalid(
        &FIXTURE.replace("<slreq:algorithm>MD5", "<slreq:algorithm>CRC32"),
        "CRC32",
    );
    expect_invalid(
        &FIXTURE.replace("8ad8757baa8564dc136c1e07507f4a98", "8ad8757b"),
        "MD5 checksum '8ad8757b'",
    );
    expect_invalid(
        &FIXTURE.replace(
            "<slterms:icmp>8</slterms:icmp>",
            "<slterms:colour>red</slterms:colour>",
        ),
        "slterms:colour",
    );
    expect_invalid(
        &FIXTURE.replace("<dcterms:format>raw", "<dcterms:format>vmdk"),
        "vmdk",
    );
    expect_invalid("<rdf:RDF xmlns:rdf=\"urn:x\"/>", "not rdf:RDF");
    expect_invalid("<a><b></a>", "malformed XML");
}

/// Regression: a creation date near chrono's last one, without dcterms:valid, made the
/// validity arithmetic overflow and panic (it aborts the node agent in release builds).
#[test]
fn dates_beyond_four_digit_years_are_refused_and_validity_never_overflows() {
    let far = FIXTURE.replace("2013-05-24T14:13:27Z", "+262142-12-31T00:00:00Z");
    expect_invalid(
        &far,
        "dcterms:created '+262142-12-31T00:00:00Z' is outside the years",
    );
    let json = Metadata::from_xml(FIXTURE).unwrap().to_json();
    let far_json = json.replace("2013-05-24T14:13:27Z", "+262142-12-31T00:00:00Z");
    assert_ne!(far_json, json, "the JSON form carries the creation date");
    match Metadata::from_json(&far_json) {
        Err(Error::InvalidMetadata(msg)) => assert!(msg.contains("dcterms:created"), "{msg}"),
        other => panic!("expected the far creation date refused, got {other:?}"),
    }
    // An entry built in code is not validated: its validity saturates instead.
    let mut m = Metadata::from_xml(FIXTURE).unwrap();
    m.valid = None;
    m.endorsement.created = chrono::DateTime::<Utc>::MAX_UTC;
    assert_eq!(m.valid_until(), chrono::DateTime::<Utc>::MAX_UTC);
    assert!(!m.is_expired(Utc::now()));
}

#[test]
fn expiry_and_deprecation_are_enforced() {
    let mut m = Metadata::from_xml(FIXTURE).unwrap();
    let during = Utc.with_ymd_and_hms(2013, 6, 1, 0, 0, 0).unwrap();
    let after = Utc.with_ymd_and_hms(2014, 1, 1, 0, 0, 0).unwrap();
    m.check_usable(during).unwrap();
    let e = m.check_usable(after).unwrap_err();
    assert!(matches!(e, Error::Expired { .. }));
    assert!(
        e.to_string().contains("expired on 2013-11-18T14:13:27Z"),
        "{e}"
    );
    // Without dcterms:valid, validity is created + 178 days.
    m.valid = None;
    assert_eq!(
        m.valid_until(),
        Utc.with_ymd_and_hms(2013, 11, 18, 14, 13, 27).unwrap()
    );
    m.deprecated = Some("security hole in sshd".into());
    let e = m.check_usable(during).unwrap_err().to_string();
    assert!(e.contains("deprecated: security hole in sshd"), "{e}");
}

#[test]
fn qcow2_headers_that_are_truncated_or_marked_corrupt_are_hazards() {
    let mut v3 = vec![0u8; 104];
    v3[..4].copy_from_slice(b"QFI\xfb");
    v3[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(ImageFormat::qcow2_hazard(&v3), None);
    let mut corrupt = v3.clone();
    corrupt[72..80].copy_from_slice(&2u64.to_be_bytes());
    assert!(ImageFormat::qcow2_hazard(&corrupt)
        .unwrap()
        .contains("corrupt"));
    assert!(ImageFormat::qcow2_hazard(&v3[..20])
        .unwrap()
        .contains("truncated"));
    assert!(ImageFormat::qcow2_hazard(&v3[..6])
        .unwrap()
        .contains("truncated"));
    assert_eq!(
        ImageFormat::qcow2_hazard(b"\x7fELF and then some raw bytes"),
        None
    );
}
