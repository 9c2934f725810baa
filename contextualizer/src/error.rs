use std::path::PathBuf;

/// Everything that can go wrong while turning a context into a disk.
///
/// Each message names the offending item so that the user (or the node agent's
/// log reader) can fix the request without reading this crate.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("unknown context method `{0}`: expected one of `one`, `cloud-init`, `nocloud`")]
    UnknownMethod(String),

    #[error("invalid context key `{key}`: a key must match [A-Za-z_][A-Za-z0-9_]*")]
    InvalidKey { key: String },

    #[error("context key `{key}` is given twice (as `{first}` and `{second}`); keys are upper-cased, so they clash")]
    DuplicateKey {
        key: String,
        first: String,
        second: String,
    },

    #[error("context key `{key}` is reserved: {reason}")]
    ReservedKey { key: String, reason: &'static str },

    #[error("context entry `{entry}` is not of the form KEY=VALUE")]
    MalformedEntry { entry: String },

    #[error("line {line} of the context file is not of the form KEY=VALUE: `{text}`")]
    MalformedContextLine { line: usize, text: String },

    #[error(
        "the value of context key `{key}` contains a NUL byte, which a shell variable cannot hold"
    )]
    NulInValue { key: String },

    #[error(
        "the value of context key `{key}` is {len} bytes; values are limited to {} bytes (the guest passes them to SCRIPT_EXEC in its environment)",
        crate::context::MAX_CONTEXT_VALUE
    )]
    ValueTooLong { key: String, len: usize },

    #[error(
        "the context is {len} bytes; it is limited to {} bytes (the guest passes it to SCRIPT_EXEC in its environment)",
        crate::context::MAX_CONTEXT_BYTES
    )]
    ContextTooLarge { len: usize },

    #[error("the context method `one` (the HEPiX CD) has no place for user data: use the `cloud-init` or `nocloud` method")]
    UserDataWithoutPlace,

    #[error("{what} is not UTF-8 text")]
    NotUtf8 { what: String },

    #[error("cloud-init pair `{pair}` is not of the form `mime,file`")]
    MalformedPair { pair: String },

    #[error("cloud-init pair `{pair}`: `{mime}` is not a usable MIME type (letters, digits and `.+-_` only, optionally `type/subtype`)")]
    InvalidMimeType { pair: String, mime: String },

    #[error("cloud-init pair `{pair}`: the file name `{name}` contains control characters")]
    InvalidFileName { pair: String, name: String },

    #[error("cloud-init pairs `{first}` and `{second}` both send a file named `{name}`, and cloud-init would keep only one: rename one of them")]
    DuplicatePartName {
        name: String,
        first: String,
        second: String,
    },

    #[error("cannot read `{path}`{origin}: {source}")]
    ReadFile {
        path: PathBuf,
        /// Where the path came from, e.g. " (from pair `ssh,key.pub`)"; may be empty.
        origin: String,
        #[source]
        source: std::io::Error,
    },

    #[error("pseudo-type `none` makes `{file}` the whole user data, so it cannot be combined with `{other}`")]
    NoneCombined { file: String, other: String },

    #[error("gzipped user data is {size} bytes; {method} accepts at most {limit} bytes")]
    UserDataTooLarge {
        size: usize,
        limit: usize,
        method: &'static str,
    },

    #[error("{what} expands to more than {limit} bytes, the most a context disk carries")]
    DecodedTooLarge { what: String, limit: usize },

    #[error("context key `{key}` is not valid base64: {reason}")]
    InvalidBase64 { key: String, reason: String },

    #[error("context key `{key}` does not hold gzip data: {source}")]
    InvalidGzip {
        key: String,
        #[source]
        source: std::io::Error,
    },

    #[error("user data is given twice: both as the instance's user data and as context key `CLOUD_INIT_USER_DATA`; keep one")]
    ConflictingUserData,

    #[error(
        "invalid instance id `{0}`: it must be non-empty printable text without control characters"
    )]
    InvalidInstanceId(String),

    #[error("invalid hostname `{0}`: use letters, digits and `-`, in dot-separated labels of at most 63 characters (253 in all)")]
    InvalidHostname(String),

    #[error("invalid static network: {0}")]
    InvalidNetwork(String),

    #[error("the context does not fit in the {size}-byte {kind} disk: {source}")]
    DiskFull {
        kind: &'static str,
        size: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("building the {kind} image failed: {source}")]
    ImageBuild {
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write context disk `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
