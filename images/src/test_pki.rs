//! Throw-away endorser PKIs for tests and benchmarks, made with `openssl` (which must be
//! installed): a CA — what a Marketplace is told to trust — and an X.509 v3 personal
//! certificate it issued to one endorser, as grid CAs issue them.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum TestPkiError {
    #[error("cannot run openssl (install Debian's openssl): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("openssl {args} failed: {stderr}")]
    Openssl { args: String, stderr: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The files of one PKI, all in `dir`.
#[derive(Clone, Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA's certificate (`ca.pem`; its key is `ca.key`).
    pub ca_cert: PathBuf,
    /// The endorser's key and certificate (`endorser.key`, `endorser.pem`).
    pub key: PathBuf,
    pub cert: PathBuf,
}

impl TestPki {
    /// A CA `<organisation> Test CA` and a certificate it issued to `name` <`email`>, valid
    /// for `days`, in `dir` (which must exist).
    pub fn make(
        dir: &Path,
        organisation: &str,
        name: &str,
        email: &str,
        days: u32,
    ) -> Result<TestPki, TestPkiError> {
        let ext = dir.join("endorser.ext");
        std::fs::write(
            &ext,
            format!(
                "basicConstraints = critical, CA:FALSE\n\
                 keyUsage = critical, digitalSignature, nonRepudiation\n\
                 extendedKeyUsage = emailProtection, clientAuth\n\
                 subjectAltName = email:{email}\n"
            ),
        )
        .map_err(|source| TestPkiError::Write { path: ext, source })?;
        let days = days.to_string();
        let ca_subject = format!("/C=EU/O={organisation}/CN={organisation} Test CA");
        let subject = format!("/C=EU/O={organisation}/CN={name}/emailAddress={email}");
        for args in [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                &days,
                "-subj",
                &ca_subject,
            ][..],
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "endorser.key",
                "-out",
                "endorser.csr",
                "-subj",
                &subject,
            ],
            &[
                "x509",
                "-req",
                "-in",
                "endorser.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "endorser.pem",
                "-days",
                &days,
                "-extfile",
                "endorser.ext",
            ],
        ] {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .map_err(TestPkiError::Spawn)?;
            if !out.status.success() {
                return Err(TestPkiError::Openssl {
                    args: args.join(" "),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        Ok(TestPki {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.pem"),
            key: dir.join("endorser.key"),
            cert: dir.join("endorser.pem"),
        })
    }

    /// The endorser's signer.
    pub fn signer(&self) -> crate::Result<crate::dsig::Signer> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| crate::Error::io(p, e));
        crate::dsig::Signer::from_pem(&read(&self.key)?, &read(&self.cert)?)
    }
}
