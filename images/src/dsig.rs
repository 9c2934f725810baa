//! dsig
