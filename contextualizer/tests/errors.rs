//! Bad contexts fail with errors that name the offending item, and never leave
//! a half-written disk behind.

mod common;

use stratus_contextualizer::{
    build_context_image, parse_context_arg, parse_context_file, write_context_disk, Context,
    ContextError, ContextMethod, StaticInterface, StaticNetwork, MAX_CONTEXT_BYTES,
    MAX_CONTEXT_VALUE,
};

#[test]
fn methods_parse_and_unknown_ones_are_named() {
    assert_eq!("one".parse::<ContextMethod>().unwrap(), ContextMethod::One);
    assert_eq!(
        "cloud-init".parse::<ContextMethod>().unwrap(),
        ContextMethod::CloudInit
    );
    assert_eq!(
        "nocloud".parse::<ContextMethod>().unwrap(),
        ContextMethod::NoCloud
    );
    assert_eq!(ContextMethod::default(), ContextMethod::One);
    for m in [
        ContextMethod::One,
        ContextMethod::CloudInit,
        ContextMethod::NoCloud,
    ] {
        assert_eq!(m.to_string().parse::<ContextMethod>().unwrap(), m);
    }
    let ctx = Context::new("i-1", "vm1").with_pair("context_method", "cloud-init");
    assert_eq!(
        ctx.requested_method().unwrap(),
        Some(ContextMethod::CloudInit)
    );
    assert_eq!(Context::new("i-1", "vm1").requested_method().unwrap(), None);
    let ctx = Context::new("i-1", "vm1").with_pair("CONTEXT_METHOD", "ec2");
    assert!(ctx
        .requested_method()
        .unwrap_err()
        .to_string()
        .contains("`ec2`"));
    let err = "hepix".parse::<ContextMethod>().unwrap_err();
    assert!(err.to_string().contains("`hepix`"), "{err}");
}

#[test]
fn context_arguments_and_files_parse_and_reject_bad_keys() {
    assert_eq!(
        parse_context_arg("a=1#B_2=x=y#").unwrap(),
        vec![("a".into(), "1".into()), ("B_2".into(), "x=y".into())]
    );
    for bad in ["1abc", "a-b", "", "é"] {
        let err = parse_context_arg(&format!("{bad}=v")).unwrap_err();
        assert!(
            matches!(&err, ContextError::InvalidKey { key } if key == bad),
            "{bad}: {err}"
        );
    }
    let err = parse_context_arg("novalue").unwrap_err();
    assert!(err.to_string().contains("`novalue`"), "{err}");

    let file = b"# comment\nCONTEXT_METHOD=cloud-init\r\n\nX=a b\n";
    assert_eq!(
        parse_context_file(file).unwrap(),
        vec![
            ("CONTEXT_METHOD".into(), "cloud-init".into()),
            ("X".into(), "a b".into())
        ]
    );
    let err = parse_context_file(b"A=1\nbroken line\n").unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let err = parse_context_file(b"A=\xff\n").unwrap_err();
    assert!(matches!(err, ContextError::NotUtf8 { .. }), "{err}");
}

const ALL: [ContextMethod; 3] = [
    ContextMethod::One,
    ContextMethod::CloudInit,
    ContextMethod::NoCloud,
];

fn assert_refused(ctx: &Context, expect: impl Fn(&ContextError) -> bool) {
    assert_refused_by(&ALL, ctx, expect)
}

fn assert_refused_by(
    methods: &[ContextMethod],
    ctx: &Context,
    expect: impl Fn(&ContextError) -> bool,
) {
    let dir = tempfile::tempdir().unwrap();
    for &method in methods {
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"old").unwrap();
        let err = write_context_disk(ctx, method, &path).unwrap_err();
        assert!(expect(&err), "{method}: unexpected error {err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"old",
            "{method}: disk changed"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left"
        );
    }
}

#[test]
fn invalid_contexts_are_refused_before_anything_is_written() {
    let base = || Context::new("i-1", "vm1");
    assert_refused(
        &base().with_pair("bad-key", "v"),
        |e| matches!(e, ContextError::InvalidKey { key } if key == "bad-key"),
    );
    assert_refused(&base().with_pair("foo", "1").with_pair("FOO", "2"), |e| {
        matches!(e, ContextError::DuplicateKey { key, .. } if key == "FOO")
            && e.to_string().contains("`foo`")
    });
    assert_refused(
        &base().with_pair("public_key", "x"),
        |e| matches!(e, ContextError::ReservedKey { key, .. } if key == "public_key"),
    );
    assert_refused(&base().with_pair("PATH", "/tmp"), |e| {
        matches!(e, ContextError::ReservedKey { .. })
    });
    // Read-only in bash: assigning one ends a POSIX-mode bash before the key is installed.
    for key in ["uid", "EUID", "BASH_VERSINFO"] {
        assert_refused(
            &base().with_pair(key, "0"),
            |e| matches!(e, ContextError::ReservedKey { key: k, .. } if k == key),
        );
    }
    let at_limit = "v".repeat(MAX_CONTEXT_VALUE);
    build_context_image(
        &base().with_pair("BIG", at_limit.as_str()),
        ContextMethod::One,
    )
    .expect("a value at the limit is taken");
    assert_refused(
        &base().with_pair("BIG", format!("{at_limit}v")),
        |e| matches!(e, ContextError::ValueTooLong { key, len } if key == "BIG" && *len == MAX_CONTEXT_VALUE + 1),
    );
    let many = (0..MAX_CONTEXT_BYTES / MAX_CONTEXT_VALUE + 1).fold(base(), |ctx, i| {
        ctx.with_pair(format!("K{i}"), at_limit.as_str())
    });
    assert_refused(
        &many,
        |e| matches!(e, ContextError::ContextTooLarge { len } if *len > MAX_CONTEXT_BYTES),
    );
    assert_refused(
        &base().with_pair("NUL", "a\0b"),
        |e| matches!(e, ContextError::NulInValue { key } if key == "NUL"),
    );
    assert_refused(
        &Context::new("i-1", "bad_host!"),
        |e| matches!(e, ContextError::InvalidHostname(h) if h == "bad_host!"),
    );
    assert_refused(&Context::new("", "vm"), |e| {
        matches!(e, ContextError::InvalidInstanceId(_))
    });
    let net = StaticNetwork {
        interfaces: vec![StaticInterface::new("eth0", "not-a-mac")],
    };
    assert_refused(
        &base().with_network(net),
        |e| matches!(e, ContextError::InvalidNetwork(m) if m.contains("not-a-mac")),
    );
    // The `one` method carries no user data, so only the cloud-init ones care.
    assert_refused_by(
        &[ContextMethod::CloudInit, ContextMethod::NoCloud],
        &base()
            .with_user_data("x")
            .with_pair("CLOUD_INIT_USER_DATA", "H4sI"),
        |e| matches!(e, ContextError::ConflictingUserData),
    );
}

#[test]
fn user_data_is_refused_where_the_method_has_no_place_for_it() {
    let ctx = Context::new("i-1", "vm1").with_user_data("#cloud-config\n");
    let err = build_context_image(&ctx, ContextMethod::One).unwrap_err();
    assert!(matches!(err, ContextError::UserDataWithoutPlace), "{err}");
    for method in [ContextMethod::CloudInit, ContextMethod::NoCloud] {
        build_context_image(&ctx, method).unwrap();
    }
}

#[test]
fn undecodable_cloud_init_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let ctx = Context::new("i-1", "vm1").with_pair("CLOUD_INIT_USER_DATA", "!!!");
    let err = write_context_disk(&ctx, ContextMethod::NoCloud, &path).unwrap_err();
    assert!(
        matches!(&err, ContextError::InvalidBase64 { key, .. } if key == "CLOUD_INIT_USER_DATA"),
        "{err}"
    );
    // Valid base64 that is not gzip.
    let ctx = Context::new("i-1", "vm1").with_pair("CLOUD_INIT_USER_DATA", "aGVsbG8=");
    let err = write_context_disk(&ctx, ContextMethod::CloudInit, &path).unwrap_err();
    assert!(matches!(err, ContextError::InvalidGzip { .. }), "{err}");
    let ctx = Context::new("i-1", "vm1").with_pair("CLOUD_INIT_AUTHORIZED_KEYS", "/w==");
    let err = write_context_disk(&ctx, ContextMethod::CloudInit, &path).unwrap_err();
    assert!(matches!(err, ContextError::NotUtf8 { .. }), "{err}");
    assert!(!path.exists());
}

#[test]
fn unwritable_target_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/disk.iso");
    let err =
        write_context_disk(&Context::new("i-1", "vm1"), ContextMethod::One, &path).unwrap_err();
    assert!(matches!(err, ContextError::Write { .. }), "{err}");
    assert!(err.to_string().contains("no/such/dir/disk.iso"), "{err}");
}

#[test]
fn a_new_disk_replaces_the_old_one_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.iso");
    std::fs::write(&path, vec![0xAA; 4 * 1024 * 1024]).unwrap();
    write_context_disk(&Context::new("i-1", "vm1"), ContextMethod::One, &path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len < 1024 * 1024, "old bytes survived: {len}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
