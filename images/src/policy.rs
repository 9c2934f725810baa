//! Site policy: white and black lists of endorsers, checksums and identifiers.
//!
//! File format (INI-like; `#` and `;` start comments; an optional `[policy]` header):
//! ```text
//! whitelist_endorsers = images@stratuslab.eu, CN=Jane Doe,O=Lab
//! blacklist_endorsers =
//! whitelist_checksums =
//! blacklist_checksums = 0123abcd...
//! whitelist_identifiers =
//! blacklist_identifiers = MMZu9WvwKIro-rtBQfDk4PsKO7_
//! ```
//! Values are separated by whitespace, or by `;` for endorsers (whose subjects contain
//! commas). An endorser matches by email (case-insensitive) or subject (in any DN form). A checksum
//! matches any checksum of the entry. A black list always refuses; a non-empty white list
//! refuses everything it does not name.

use std::path::Path;

use crate::error::{Error, Result};
use crate::metadata::Metadata;

/// A site policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub whitelist_endorsers: Vec<String>,
    pub blacklist_endorsers: Vec<String>,
    pub whitelist_checksums: Vec<String>,
    pub blacklist_checksums: Vec<String>,
    pub whitelist_identifiers: Vec<String>,
    pub blacklist_identifiers: Vec<String>,
}

impl Policy {
    /// Parse policy text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Policy> {
        let mut p = Policy::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                if line != "[policy]" {
                    return Err(Error::InvalidPolicy {
                        path: origin.into(),
                        reason: format!("line {}: unknown section {line}", n + 1),
                    });
                }
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| Error::InvalidPolicy {
                path: origin.into(),
                reason: format!("line {}: expected key = value", n + 1),
            })?;
            let key = key.trim();
            let endorsers = |v: &str| -> Vec<String> {
                v.split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            };
            let words = |v: &str| -> Vec<String> {
                v.split(|c: char| c.is_whitespace() || c == ',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            };
            match key {
                "whitelist_endorsers" => p.whitelist_endorsers.extend(endorsers(value)),
                "blacklist_endorsers" => p.blacklist_endorsers.extend(endorsers(value)),
                "whitelist_checksums" => p.whitelist_checksums.extend(words(value)),
                "blacklist_checksums" => p.blacklist_checksums.extend(words(value)),
                "whitelist_identifiers" => p.whitelist_identifiers.extend(words(value)),
                "blacklist_identifiers" => p.blacklist_identifiers.extend(words(value)),
                other => {
                    return Err(Error::InvalidPolicy {
                        path: origin.into(),
                        reason: format!("line {}: unknown key '{other}'", n + 1),
                    })
                }
            }
        }
        Ok(p)
    }

    /// Load a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Policy::parse(&text, &path.display().to_string())
    }

    /// Accept or refuse an entry; the error names the rule and the matching value.
    pub fn check(&self, m: &Metadata) -> Result<()> {
        let id = m.identifier.to_string();
        let en = &m.endorsement.endorser;
        // As `ops::validate` matched them with the certificate: the entry may write its
        // subject in any DN form and its email with spaces around it.
        let endorser_is = |s: &String| {
            s.eq_ignore_ascii_case(en.email.trim()) || crate::dsig::same_dn(s, &en.subject)
        };
        let refuse = |rule: &str, value: &str| Error::PolicyRefused {
            identifier: id.clone(),
            rule: rule.into(),
            value: value.into(),
        };
        if let Some(s) = self.blacklist_endorsers.iter().find(|s| endorser_is(s)) {
            return Err(refuse("blacklist_endorsers", s));
        }
        if !self.whitelist_endorsers.is_empty() && !self.whitelist_endorsers.iter().any(endorser_is)
        {
            return Err(refuse("whitelist_endorsers", &en.email));
        }
        let has_sum = |s: &String| m.checksums.iter().any(|(_, v)| v.eq_ignore_ascii_case(s));
        if let Some(s) = self.blacklist_checksums.iter().find(|s| has_sum(s)) {
            return Err(refuse("blacklist_checksums", s));
        }
        if !self.whitelist_checksums.is_empty() && !self.whitelist_checksums.iter().any(has_sum) {
            return Err(refuse(
                "whitelist_checksums",
                m.checksums.get(crate::Algorithm::Sha1).unwrap_or(""),
            ));
        }
        if self.blacklist_identifiers.contains(&id) {
            return Err(refuse("blacklist_identifiers", &id));
        }
        if !self.whitelist_identifiers.is_empty() && !self.whitelist_identifiers.contains(&id) {
            return Err(refuse("whitelist_identifiers", &id));
        }
        Ok(())
    }
}
