//! The contextualizer on what users hand it: a `--context-file` (the same text also as a
//! `--context` argument and as `--cloud-init` pairs; a first line `#KEY` stands for the
//! instance's SSH key), turned into a validated context, its `context.sh`, its cloud-init
//! YAML, and (when it carries StratusLab's base64+gzip user data or keys) the context
//! images that decode them.
//!
//! Beyond not panicking: `context.sh` is sourced by a root shell, so a POSIX shell must
//! read back exactly the values that went in, with no expansion anywhere; the YAML
//! quoting must give printable ASCII only (PyYAML refuses the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_contextualizer::{
    build_context_image, parse_cloud_init_pairs, parse_context_arg, parse_context_file,
    render_context_sh, render_default_user_data, render_meta_data, render_meta_js,
    yaml_double_quote, Context, ContextMethod, AUTHORIZED_KEYS_KEY, CONTEXT_SH_HEADER,
    USER_DATA_KEY,
};

/// Reads `context.sh` the way a POSIX shell does: `KEY="..."` lines, where inside double
/// quotes a backslash escapes only `\`, `"`, `$`, backquote and newline. An unescaped `$`
/// or backquote would be an expansion: the caller fails on `None`.
fn shell_assignments(script: &str) -> Option<Vec<(String, String)>> {
    let body = script.strip_prefix(CONTEXT_SH_HEADER)?.strip_prefix('\n')?;
    let mut chars = body.chars().peekable();
    let mut out = Vec::new();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    c @ ('\\' | '"' | '$' | '`') => value.push(c),
                    // A line continuation: the shell drops both characters.
                    '\n' => {}
                    c => {
                        value.push('\\');
                        value.push(c);
                    }
                },
                '"' => break,
                '$' | '`' => return None,
                c => value.push(c),
            }
        }
        if chars.next() != Some('\n') {
            return None;
        }
        out.push((key, value));
    }
    Some(out)
}

fn check_yaml_quote(value: &str) {
    let quoted = yaml_double_quote(value);
    assert!(
        quoted.len() >= 2 && quoted.bytes().all(|b| (b' '..=b'~').contains(&b)),
        "YAML scalar {quoted:?} is not printable ASCII"
    );
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_context_arg(&text);
    let _ = parse_cloud_init_pairs(&text);
    let Ok(pairs) = parse_context_file(data) else {
        return;
    };
    // A comment on the first line stands for the instance's SSH key (a file cannot hold
    // one, and the target has only the one input).
    let key = text.lines().next().and_then(|l| l.strip_prefix('#'));
    let mut ctx = Context::new("i-fuzz", "vm-fuzz").with_pairs(pairs);
    ctx.public_key = key.map(str::to_string);
    let _ = ctx.requested_method();
    if ctx.validate().is_err() {
        return;
    }

    let script = render_context_sh(&ctx);
    let mut expected = vec![
        (
            "PUBLIC_KEY".to_string(),
            ctx.public_key.clone().unwrap_or_default(),
        ),
        ("TARGET".to_string(), "hdd".to_string()),
    ];
    expected.extend(
        ctx.pairs
            .iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v.clone())),
    );
    let read_back = shell_assignments(&script);
    assert_eq!(
        read_back.as_ref(),
        Some(&expected),
        "context.sh does not read back as written:\n{script}"
    );
    for (_, value) in &ctx.pairs {
        check_yaml_quote(value);
    }

    let keys: Vec<String> = ctx.public_key.iter().cloned().collect();
    let _ = render_meta_data(&ctx, &keys);
    let _ = render_default_user_data(&keys);
    let _ = render_meta_js(ctx.get(USER_DATA_KEY), &ctx.instance_id, &keys);
    // Only these keys make an image builder decode anything (base64, then gzip); images
    // of plain text take milliseconds and would find nothing the checks above miss.
    if ctx.get(USER_DATA_KEY).is_some() || ctx.get(AUTHORIZED_KEYS_KEY).is_some() {
        let _ = build_context_image(&ctx, ContextMethod::NoCloud);
        let _ = build_context_image(&ctx, ContextMethod::CloudInit);
    }
});
