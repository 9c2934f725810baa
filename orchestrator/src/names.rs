//! Names administrators give: users' and nodes'. They appear in URL paths (the API's, the
//! console's) and in the CLI's tables.

/// 1 to 64 ASCII letters, digits and the `punctuation` given, and not dots alone: `.` and
/// `..` in a URL's path are the directory itself and its parent.
pub fn valid(name: &str, punctuation: &[char]) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || punctuation.contains(&c))
        && !name.chars().all(|c| c == '.')
}
