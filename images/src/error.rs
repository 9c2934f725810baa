use std::path::PathBuf;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error of `stratus-images`; each message names the offending item.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid identifier '{value}': {reason}")]
    InvalidIdentifier { value: String, reason: String },
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    #[error("malformed XML: {0}")]
    Xml(String),
    #[error("invalid signature: {0}")]
    Signature(String),
    #[error("invalid certificate: {0}")]
    Certificate(String),
    #[error("invalid key: {0}")]
    Key(String),
    #[error("the endorser's certificate ({subject}) is not trusted: {reason}")]
    UntrustedEndorser { subject: String, reason: String },
    #[error("endorser {field} '{in_entry}' does not match the certificate's '{in_certificate}'")]
    EndorserMismatch {
        field: &'static str,
        in_entry: String,
        in_certificate: String,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("download of {url} failed: HTTP status {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("download of {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("decompression ({compression}) of {url} failed: {reason}")]
    Decompression {
        url: String,
        compression: String,
        reason: String,
    },
    #[error(
        "{url} sent more than {limit} bytes for an image of {image_bytes} bytes: \
         not this image"
    )]
    TooMuchData {
        url: String,
        limit: u64,
        image_bytes: u64,
    },
    #[error("size mismatch for {url}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{algorithm} checksum mismatch for {url}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        url: String,
        algorithm: String,
        expected: String,
        actual: String,
    },
    #[error("unsupported image location '{0}'")]
    UnsupportedLocation(String),
    #[error("no usable location for image {identifier}: {reasons}")]
    NoUsableLocation { identifier: String, reasons: String },
    #[error("image {identifier} refused by site policy rule {rule} ({value})")]
    PolicyRefused {
        identifier: String,
        rule: String,
        value: String,
    },
    #[error("invalid policy file {path}: {reason}")]
    InvalidPolicy { path: String, reason: String },
    #[error("image {identifier} expired on {valid}")]
    Expired { identifier: String, valid: String },
    #[error("image {identifier} is deprecated: {reason}")]
    Deprecated { identifier: String, reason: String },
    #[error("image {image} cannot be booted directly: {reason}")]
    NotBootable { image: String, reason: String },
    #[error("image {identifier} is refused: {reason}")]
    UnsafeImage { identifier: String, reason: String },
    #[error("the download of image {identifier}, shared by concurrent requests, failed: {source}")]
    SharedDownloadFailed {
        identifier: String,
        #[source]
        source: std::sync::Arc<Error>,
    },
}

impl Error {
    /// An image refused for what it is or what its metadata says (the request's fault, not
    /// a server's or this host's).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::PolicyRefused { .. }
                | Error::Expired { .. }
                | Error::Deprecated { .. }
                | Error::NotBootable { .. }
                | Error::UnsafeImage { .. }
                | Error::InvalidMetadata(_)
                | Error::UnsupportedLocation(_)
        )
    }

    /// The error itself, or for a download shared with a concurrent request, the error
    /// that download met: what callers tell apart (a refused image, a failed server).
    pub fn root(&self) -> &Error {
        match self {
            Error::SharedDownloadFailed { source, .. } => source.root(),
            e => e,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
