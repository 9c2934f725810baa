//! One command's settings (options, environment, configuration file) and the services it
//! talks to.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::Service;
use crate::config::{self, Source, UserConfig};
use crate::Common;

pub struct Session<'a> {
    pub common: &'a Common,
    pub file: UserConfig,
}

/// The user's home directory, for `~` and the default file locations.
pub fn home() -> anyhow::Result<PathBuf> {
    match config::process_env("HOME")? {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h)),
        _ => bail!("HOME is not set: cannot find ~/.stratuslab"),
    }
}

/// `~/x` → `$HOME/x`.
pub fn expand(path: &str) -> anyhow::Result<PathBuf> {
    Ok(match path.strip_prefix("~/") {
        Some(rest) => home()?.join(rest),
        None => PathBuf::from(path),
    })
}

impl<'a> Session<'a> {
    pub fn load(common: &'a Common) -> anyhow::Result<Session<'a>> {
        let (path, explicit) = match &common.config {
            Some(p) => (p.clone(), true),
            None => match config::process_env("STRATUSLAB_CONFIG")? {
                Some(p) => (expand(&p)?, true),
                None => (home()?.join(config::DEFAULT_FILE), false),
            },
        };
        let file = UserConfig::load(
            &path,
            explicit,
            common.section.as_deref(),
            &config::process_env,
        )?;
        Ok(Session { common, file })
    }

    /// A setting by StratusLab's precedence; `key` is the file's key, its variable is
    /// `STRATUSLAB_<KEY>`.
    pub fn setting(&self, key: &str, option: Option<&str>) -> anyhow::Result<Option<String>> {
        let env_name = format!("STRATUSLAB_{}", key.to_ascii_uppercase());
        let found = config::resolve(option, &env_name, &self.file, key, &config::process_env)?;
        if let Some((value, source)) = &found {
            let shown = if key == "password" { "…" } else { value };
            tracing::info!(key, value = shown, ?source, "setting");
        }
        Ok(found.map(|(v, _)| v).filter(|v| !v.is_empty()))
    }

    fn required(&self, key: &str, option: Option<&str>, flag: &str) -> anyhow::Result<String> {
        self.setting(key, option)?.with_context(|| {
            format!(
                "no {key}: give {flag}, set STRATUSLAB_{} or put {key} in {}",
                key.to_ascii_uppercase(),
                self.file_name()
            )
        })
    }

    fn file_name(&self) -> String {
        match &self.file.path {
            Some(p) => p.display().to_string(),
            None => format!("~/{}", config::DEFAULT_FILE),
        }
    }

    pub fn timeout(&self) -> anyhow::Result<Duration> {
        let text = self
            .setting("endpoint_timeout", self.common.endpoint_timeout.as_deref())?
            .unwrap_or_else(|| "5".into());
        let seconds: u64 = text
            .trim()
            .parse()
            .ok()
            .filter(|s| (1..=3600).contains(s))
            .with_context(|| {
                format!("endpoint_timeout '{text}' is not a number of seconds from 1 to 3600")
            })?;
        Ok(Duration::from_secs(seconds))
    }

    /// The orchestrator, as the configured user.
    pub fn cloud(&self) -> anyhow::Result<Service> {
        let endpoint = self.required("endpoint", self.common.endpoint.as_deref(), "--endpoint")?;
        self.as_user_at(&endpoint)
    }

    /// The persistent disk service, as the configured user: `pdisk_endpoint` when set (a
    /// StratusLab site may publish it apart), else the orchestrator, which serves it.
    pub fn pdisk(&self) -> anyhow::Result<Service> {
        match self.setting("pdisk_endpoint", self.common.pdisk_endpoint.as_deref())? {
            Some(endpoint) => self.as_user_at(&endpoint),
            None => self.cloud(),
        }
    }

    fn as_user_at(&self, endpoint: &str) -> anyhow::Result<Service> {
        let credentials = self.credentials()?;
        let option = self
            .common
            .ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let ca_file = match self.setting("ca_file", option.as_deref())? {
            Some(file) => Some(expand(&file)?),
            None => None,
        };
        let service = Service::new(
            endpoint,
            Some(credentials),
            self.timeout()?,
            ca_file.as_deref(),
        )?;
        if let Some(host) = cleartext_host(service.endpoint()) {
            eprintln!(
                "  [WARNING] the password goes to {host} unencrypted (http://): anyone on the \
                 way can read it; use an https:// endpoint"
            );
        }
        Ok(service)
    }

    /// The Marketplace (anonymous: its reads are public and its uploads signed).
    pub fn marketplace(&self) -> anyhow::Result<Service> {
        let endpoint = self.required(
            "marketplace_endpoint",
            self.common.marketplace_endpoint.as_deref(),
            "--marketplace-endpoint",
        )?;
        // A Marketplace is often another site's: the system's roots, not the cloud's CA.
        Ok(Service::new(&endpoint, None, self.timeout()?, None)?)
    }

    /// The Marketplace as an uploader: with the upload token from `--marketplace-token-file`
    /// (or `marketplace_token_file`).
    pub fn marketplace_uploader(&self) -> anyhow::Result<Service> {
        let option = self
            .common
            .marketplace_token_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let file = expand(&self.required(
            "marketplace_token_file",
            option.as_deref(),
            "--marketplace-token-file",
        )?)?;
        let token = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read the upload token {}", file.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            !token.is_empty(),
            "the upload token file {} is empty",
            file.display()
        );
        Ok(self.marketplace()?.with_bearer(token))
    }

    fn credentials(&self) -> anyhow::Result<(String, String)> {
        let user = self.required("username", self.common.username.as_deref(), "-u/--username")?;
        let password = match self.setting("password", self.common.password.as_deref())? {
            Some(p) => p,
            None => {
                if !std::io::stdin().is_terminal() {
                    bail!(
                        "no password for {user}: give -p/--password, set STRATUSLAB_PASSWORD \
                         or put password in {}",
                        self.file_name()
                    );
                }
                rpassword::prompt_password(format!("Password for {user}: "))
                    .context("cannot read the password from the terminal")?
            }
        };
        Ok((user, password))
    }

    /// The SSH public key file: `--key`, `STRATUSLAB_KEY`, `user_public_key_file`,
    /// then `~/.ssh/id_rsa.pub`.
    pub fn public_key_file(&self, option: Option<&Path>) -> anyhow::Result<(PathBuf, Source)> {
        if let Some(p) = option {
            return Ok((p.to_owned(), Source::CommandLine));
        }
        if let Some(p) = config::process_env("STRATUSLAB_KEY")? {
            return Ok((expand(&p)?, Source::Environment));
        }
        if let Some(p) = self.file.get("user_public_key_file") {
            return Ok((expand(p)?, Source::File));
        }
        Ok((home()?.join(".ssh/id_rsa.pub"), Source::Default))
    }

    /// The signer from `--pem-cert`/`--pem-key` (or `pem_certificate`/`pem_key`).
    pub fn signer(&self) -> anyhow::Result<stratus_images::dsig::Signer> {
        let path = |key: &str, option: &Option<PathBuf>, flag: &str| -> anyhow::Result<PathBuf> {
            let option = option.as_ref().map(|p| p.to_string_lossy().into_owned());
            expand(&self.required(key, option.as_deref(), flag)?)
        };
        let cert = path("pem_certificate", &self.common.pem_cert, "--pem-cert")?;
        let key = path("pem_key", &self.common.pem_key, "--pem-key")?;
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        stratus_images::dsig::Signer::from_pem(&read(&key)?, &read(&cert)?)
            .with_context(|| format!("cannot use {} with {}", cert.display(), key.display()))
    }
}

/// The host of an `http://` endpoint that is not this machine (loopback: nothing crosses a
/// network), to which credentials would travel in the clear.
fn cleartext_host(endpoint: &str) -> Option<String> {
    let url = reqwest::Url::parse(endpoint).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let host = url.host_str()?;
    let address = host.trim_start_matches('[').trim_end_matches(']');
    let local = host.eq_ignore_ascii_case("localhost")
        || address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!local).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::cleartext_host;

    #[test]
    fn only_passwords_leaving_the_machine_in_the_clear_are_warned_of() {
        assert_eq!(
            cleartext_host("http://cloud.example.org:8443"),
            Some("cloud.example.org".into())
        );
        assert_eq!(
            cleartext_host("http://198.18.0.1/"),
            Some("198.18.0.1".into())
        );
        for local in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
            "https://cloud.example.org",
        ] {
            assert_eq!(cleartext_host(local), None, "{local}");
        }
    }
}
