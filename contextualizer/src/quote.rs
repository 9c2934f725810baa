//! Quoting for the two text formats the guest parses: POSIX shell and YAML.

/// Quotes `value` for `KEY="value"` in a POSIX shell script.
///
/// Inside double quotes only `\`, `"`, `$` and backquote are special, so
/// escaping exactly those keeps any value (newlines included) as data. Because
/// every backslash is doubled, a value can never end a line with a lone `\`,
/// which the shell would read as a line continuation.
pub fn shell_double_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes `value` as a YAML double-quoted scalar made only of printable ASCII.
///
/// Everything else goes through escapes because PyYAML (cloud-init's parser)
/// rejects raw C1 control characters and some other code points anywhere in
/// the stream, even inside quotes.
pub fn yaml_double_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_escapes_only_the_four_specials() {
        assert_eq!(shell_double_quote("a b"), "\"a b\"");
        assert_eq!(
            shell_double_quote("$(x) `y` \"z\" \\"),
            "\"\\$(x) \\`y\\` \\\"z\\\" \\\\\""
        );
        assert_eq!(shell_double_quote("l1\nl2"), "\"l1\nl2\"");
    }

    #[test]
    fn yaml_quote_is_ascii_and_escaped() {
        assert_eq!(
            yaml_double_quote("é\u{85}\n\"\\"),
            "\"\\u00E9\\u0085\\n\\\"\\\\\""
        );
        assert_eq!(yaml_double_quote("\u{1F600}"), "\"\\U0001F600\"");
    }
}
