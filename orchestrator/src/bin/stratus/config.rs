//! The user's configuration, as StratusLab read it: an INI file
//! (`~/.stratuslab/stratuslab-user.cfg`) whose `[default]` section is overlaid by the
//! selected section, then `STRATUSLAB_<KEY>` environment variables, then command-line
//! options. Values follow Python's ConfigParser: `%%` is a literal `%` and `%(key)s` the
//! value of another key of the same section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where StratusLab kept the file, below the home directory.
pub const DEFAULT_FILE: &str = ".stratuslab/stratuslab-user.cfg";

/// The environment variable choosing the section (before `selected_section`).
pub const SECTION_ENV: &str = "STRATUSLAB_USER_CONFIG_SECTION";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid INI")]
    Syntax {
        path: PathBuf,
        #[source]
        source: ini::ParseError,
    },
    #[error("the configuration file {0} has no [default] section")]
    NoDefault(PathBuf),
    #[error("the configuration file {path} has no section [{section}] (selected by {by})")]
    NoSection {
        path: PathBuf,
        section: String,
        by: &'static str,
    },
    #[error("in the configuration file {path}, [{section}] {key}: {problem}")]
    Value {
        path: PathBuf,
        section: String,
        key: String,
        problem: String,
    },
    #[error("the environment variable {name} is not valid UTF-8")]
    Env { name: String },
}

/// Where a setting came from (shown with `-vv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    Environment,
    File,
    Default,
}

/// The merged file sections: `[default]` overlaid with the active section.
#[derive(Clone, Debug, Default)]
pub struct UserConfig {
    pub path: Option<PathBuf>,
    values: BTreeMap<String, String>,
    instance_types: BTreeMap<String, String>,
}

/// An instance type's vCPUs, RAM (MiB) and swap (MiB).
pub type TypeSizes = (u8, u64, u64);

impl UserConfig {
    /// Loads `path`. A missing file is an error only when the user named it (`explicit`):
    /// everything can also come from the environment and the command line.
    pub fn load(
        path: &Path,
        explicit: bool,
        section_option: Option<&str>,
        env: &dyn Fn(&str) -> Result<Option<String>, ConfigError>,
    ) -> Result<UserConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(UserConfig::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let options = ini::ParseOption {
            enabled_quote: false,
            enabled_escape: false,
            ..Default::default()
        };
        let file =
            ini::Ini::load_from_str_opt(&text, options).map_err(|source| ConfigError::Syntax {
                path: path.to_owned(),
                source,
            })?;
        let raw_section = |name: &str| -> Option<BTreeMap<String, String>> {
            let props = file.section(Some(name))?;
            Some(
                props
                    .iter()
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect(),
            )
        };
        let default = raw_section("default").ok_or_else(|| ConfigError::NoDefault(path.into()))?;
        let (chosen, by) = match section_option {
            Some(s) => (Some(s.to_owned()), "-S/--user-config-section"),
            None => match env(SECTION_ENV)? {
                Some(s) if !s.is_empty() => (Some(s), SECTION_ENV),
                _ => (
                    default.get("selected_section").cloned(),
                    "selected_section in [default]",
                ),
            },
        };
        let mut merged = default.clone();
        if let Some(name) = chosen.as_deref().filter(|n| *n != "default") {
            let section = raw_section(name).ok_or_else(|| ConfigError::NoSection {
                path: path.into(),
                section: name.into(),
                by,
            })?;
            merged.extend(section);
        }
        let section_name = chosen.clone().unwrap_or_else(|| "default".into());
        let mut values = BTreeMap::new();
        for key in merged.keys() {
            let value = interpolate(&merged, key, 0).map_err(|problem| ConfigError::Value {
                path: path.into(),
                section: section_name.clone(),
                key: key.clone(),
                problem,
            })?;
            values.insert(key.clone(), value);
        }
        let instance_types = raw_section("instance_types").unwrap_or_default();
        Ok(UserConfig {
            path: Some(path.to_owned()),
            values,
            instance_types,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Every type of the user's own, by name.
    pub fn instance_types(&self) -> Result<Vec<(String, TypeSizes)>, ConfigError> {
        let mut types = Vec::new();
        for name in self.instance_types.keys() {
            if let Some(sizes) = self.instance_type(name)? {
                types.push((name.clone(), sizes));
            }
        }
        Ok(types)
    }

    /// The user's own type `name` from `[instance_types]` (`name = cpu, ram_mib, swap_mib`).
    pub fn instance_type(&self, name: &str) -> Result<Option<TypeSizes>, ConfigError> {
        let Some(text) = self.instance_types.get(&name.to_ascii_lowercase()) else {
            return Ok(None);
        };
        let bad = || ConfigError::Value {
            path: self.path.clone().unwrap_or_default(),
            section: "instance_types".into(),
            key: name.into(),
            problem: format!("'{text}' is not 'cpu, ram_mib, swap_mib'"),
        };
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let [cpu, ram, swap] = fields[..] else {
            return Err(bad());
        };
        Ok(Some((
            cpu.parse().map_err(|_| bad())?,
            ram.parse().map_err(|_| bad())?,
            swap.parse().map_err(|_| bad())?,
        )))
    }
}

/// ConfigParser's basic interpolation of one value.
fn interpolate(
    values: &BTreeMap<String, String>,
    key: &str,
    depth: usize,
) -> Result<String, String> {
    if depth > 10 {
        return Err("%(…)s references nest too deep (a loop?)".into());
    }
    let raw = &values[key];
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw.as_str();
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('%') {
            out.push('%');
            rest = after;
        } else if let Some(after) = rest.strip_prefix('(') {
            let Some((name, tail)) = after.split_once(")s") else {
                return Err("a '%(' is not closed by ')s'; write '%%' for a literal '%'".into());
            };
            let name = name.to_ascii_lowercase();
            if !values.contains_key(&name) {
                return Err(format!("%({name})s names no key of this section"));
            }
            out.push_str(&interpolate(values, &name, depth + 1)?);
            rest = tail;
        } else {
            return Err("a '%' must be doubled ('%%') or start '%(key)s'".into());
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// One setting resolved by StratusLab's precedence: option > environment > file.
pub fn resolve(
    option: Option<&str>,
    env_name: &str,
    file: &UserConfig,
    key: &str,
    env: &dyn Fn(&str) -> Result<Option<String>, ConfigError>,
) -> Result<Option<(String, Source)>, ConfigError> {
    if let Some(v) = option {
        return Ok(Some((v.to_owned(), Source::CommandLine)));
    }
    if let Some(v) = env(env_name)? {
        return Ok(Some((v, Source::Environment)));
    }
    Ok(file.get(key).map(|v| (v.to_owned(), Source::File)))
}

/// The process environment, with non-UTF-8 values refused rather than ignored.
pub fn process_env(name: &str) -> Result<Option<String>, ConfigError> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::Env { name: name.into() }),
    }
}

/// The reference file `stratus-copy-config` writes: every key, commented.
pub const REFERENCE: &str = r#"# The Stratus (StratusLab) user configuration.
#
# [default] is always read first; the section named by -S/--user-config-section, by
# STRATUSLAB_USER_CONFIG_SECTION or by selected_section below is laid over it, so one file
# can hold several clouds. Every key can also be given in the environment as
# STRATUSLAB_<KEY> (e.g. STRATUSLAB_ENDPOINT) or as a command-line option (--endpoint);
# the command line wins over the environment, which wins over this file.
#
# A '%' in a value must be doubled ('%%'); '%(key)s' stands for another key's value.

[default]

# The section laid over [default].
#selected_section = my-cloud

# Seconds to wait for a service before giving up.
#endpoint_timeout = 5

# The orchestrator (the cloud's entry point).
#endpoint = http://cloud.example.org:8775
# For an https:// endpoint whose certificate your site's own CA signs: that CA's PEM
# bundle (otherwise the system's trusted roots).
#ca_file = ~/.stratuslab/site-ca.pem

# The persistent disk service (part of the orchestrator in Stratus).
#pdisk_endpoint = http://cloud.example.org:8775

# The Marketplace the images are described in.
#marketplace_endpoint = http://marketplace.example.org:8780
# The Marketplace's upload token (a file), for stratus-upload-metadata and
# stratus-deprecate-metadata.
#marketplace_token_file = ~/.stratuslab/marketplace-token

# Your account on the cloud. Without password, the commands ask for it.
#username = alice
#password = secret

# The SSH public key put into your machines (option --key, env STRATUSLAB_KEY);
# stratus-connect-instance uses the private key beside it (the same name without .pub).
#user_public_key_file = ~/.ssh/id_rsa.pub

# How machines receive their context: one (HEPiX CD, the default), cloud-init or nocloud.
#default_context_method = one

# Your certificate and key (PEM) for signing Marketplace metadata
# (options --pem-cert and --pem-key).
#pem_certificate = ~/.stratuslab/usercert.pem
#pem_key = ~/.stratuslab/userkey.pem

#[my-cloud]
#endpoint = http://cloud.example.org:8775
#marketplace_endpoint = http://marketplace.example.org:8780
#username = alice
#password = secret

# Your own instance types, as "cpu, ram_mib, swap_mib"; the cloud must know them too.
#[instance_types]
#m1.huge = 8, 16384, 16384
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        text: &str,
        section: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<UserConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.cfg");
        std::fs::write(&path, text).unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        UserConfig::load(&path, true, section, &|n| Ok(env.get(n).cloned()))
    }

    #[test]
    fn the_selected_section_is_laid_over_default() {
        let text = "[default]\nselected_section = b\nendpoint = http://a\nusername = u\n\
                    [b]\nendpoint = http://b\n[c]\nendpoint = http://c\n";
        let c = load(text, None, &[]).unwrap();
        assert_eq!(c.get("endpoint"), Some("http://b"));
        assert_eq!(c.get("username"), Some("u"));
        let c = load(text, None, &[(SECTION_ENV, "c")]).unwrap();
        assert_eq!(c.get("endpoint"), Some("http://c"));
        let c = load(text, Some("default"), &[(SECTION_ENV, "c")]).unwrap();
        assert_eq!(c.get("endpoint"), Some("http://a"));
        let e = load(text, Some("nope"), &[]).unwrap_err().to_string();
        assert!(
            e.ends_with("has no section [nope] (selected by -S/--user-config-section)"),
            "{e}"
        );
    }

    #[test]
    fn percent_signs_follow_configparser() {
        let text = "[default]\npassword = 50%%off\nhost = h\nendpoint = http://%(host)s:1\n\
                    Name = \"Quoted # not a comment\"\n";
        let c = load(text, None, &[]).unwrap();
        assert_eq!(c.get("password"), Some("50%off"));
        assert_eq!(c.get("endpoint"), Some("http://h:1"));
        assert_eq!(c.get("name"), Some("\"Quoted # not a comment\""));
        let e = load("[default]\npassword = 50%off\n", None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[default] password: a '%' must be doubled"),
            "{e}"
        );
        let e = load("[default]\na = %(b)s\nb = %(a)s\n", None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nest too deep"), "{e}");
    }

    #[test]
    fn a_file_without_default_is_refused_and_a_missing_default_file_is_not() {
        let e = load("[x]\na = 1\n", None, &[]).unwrap_err().to_string();
        assert!(e.ends_with("has no [default] section"), "{e}");
        let c = UserConfig::load(Path::new("/nonexistent/user.cfg"), false, None, &|_| {
            Ok(None)
        })
        .unwrap();
        assert_eq!(c.get("endpoint"), None);
        let e = UserConfig::load(Path::new("/nonexistent/user.cfg"), true, None, &|_| {
            Ok(None)
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("cannot read the configuration file"), "{e}");
    }

    #[test]
    fn option_beats_environment_beats_file() {
        let c = load("[default]\nendpoint = http://file\n", None, &[]).unwrap();
        let env = |n: &str| Ok((n == "STRATUSLAB_ENDPOINT").then(|| "http://env".to_owned()));
        let none = |_: &str| Ok(None);
        let r = |o, e: &dyn Fn(&str) -> Result<Option<String>, ConfigError>| {
            resolve(o, "STRATUSLAB_ENDPOINT", &c, "endpoint", e).unwrap()
        };
        assert_eq!(
            r(Some("http://cli"), &env),
            Some(("http://cli".into(), Source::CommandLine))
        );
        assert_eq!(
            r(None, &env),
            Some(("http://env".into(), Source::Environment))
        );
        assert_eq!(r(None, &none), Some(("http://file".into(), Source::File)));
        let empty = UserConfig::default();
        assert_eq!(
            resolve(None, "STRATUSLAB_ENDPOINT", &empty, "endpoint", &none).unwrap(),
            None
        );
    }

    #[test]
    fn users_define_their_own_types() {
        let c = load(
            "[default]\n[instance_types]\nm1.huge = 8, 16384, 0\nbad = 1, 2\n",
            None,
            &[],
        )
        .unwrap();
        assert_eq!(c.instance_type("m1.huge").unwrap(), Some((8, 16384, 0)));
        assert_eq!(c.instance_type("m1.small").unwrap(), None);
        let e = c.instance_type("bad").unwrap_err().to_string();
        assert!(
            e.ends_with("[instance_types] bad: '1, 2' is not 'cpu, ram_mib, swap_mib'"),
            "{e}"
        );
    }

    #[test]
    fn the_reference_file_parses_and_sets_nothing() {
        let c = load(REFERENCE, None, &[]).unwrap();
        assert_eq!(c.values.len(), 0, "{:?}", c.values);
    }
}
