//! `stratus-images`: StratusLab image metadata, Marketplace identifiers, checksums,
//! XML-DSig signatures, image download with on-the-fly decompression, site policy and the
//! host image cache.
//!
//! Main entry points:
//! - [`Identifier`]: the 27-character Marketplace identifier derived from an image's SHA-1;
//! - [`checksum::MultiHasher`]: MD5, SHA-1, SHA-256 and SHA-512 in one streaming pass;
//! - [`Metadata`]: the metadata model, with RDF/XML ([`Metadata::from_xml`],
//!   [`Metadata::to_xml`]) and JSON (serde) forms;
//! - [`ops`]: `build`, `sign`, `validate`, `deprecate` operations;
//! - [`dsig`]: enveloped XML-DSig signing and verification;
//! - [`download`]: fetch an image from `http(s)://` or `file://`, decompressing and verifying;
//! - [`progress`]: a terminal progress bar driven by download progress events;
//! - [`policy::Policy`]: site white/black lists;
//! - [`cache::ImageCache`]: per-host image cache with shared concurrent downloads;
//! - [`boot`]: find the kernel, initrd and root UUID inside a disk image for direct boot;
//! - `marketplace`: the Marketplace REST server (axum + SQLite; feature `marketplace-server`).

pub mod boot;
pub mod cache;
pub mod checksum;
pub mod download;
pub mod dsig;
mod error;
pub mod identifier;
#[cfg(feature = "marketplace-server")]
pub mod marketplace;
pub mod metadata;
pub mod ops;
pub mod policy;
pub mod progress;
pub mod test_pki;
pub mod xml;

pub use checksum::{Algorithm, Checksums};
pub use error::{Error, Result};
pub use identifier::Identifier;
pub use metadata::{Compression, Endorsement, Endorser, ImageFormat, Metadata};
