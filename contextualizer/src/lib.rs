//! stratus-contextualizer: turns a VM's context (SSH key, key/value pairs,
//! user data, static addressing) into the disk image the node agent attaches.
//!
//! Three formats, chosen by [`ContextMethod`]:
//! - `one` (default): HEPiX/OpenNebula ISO9660 CD labelled `_STRATUSLAB` with
//!   `context.sh` and the `init.sh`/`prolog.sh`/`epilog.sh` scripts;
//! - `cloud-init`: StratusLab's 1,024,000-byte VFAT disk labelled
//!   `_CLOUD_INIT` with `meta.js` and `root/.ssh/authorized_keys`;
//! - `nocloud`: a cloud-init NoCloud seed (ISO9660, label `cidata`) that stock
//!   distribution cloud images read.
//!
//! Size limits: gzipped user data may be at most
//! [`STRATUSLAB_MAX_GZIPPED_USER_DATA`] (16384) bytes for StratusLab's
//! `cloud-init` method and for [`prepare_context`]. NoCloud has no gzipped
//! limit; for every method decoded user data may be at most
//! [`MAX_USER_DATA`] (1 MiB).

mod context;
mod error;
mod hepix;
mod image;
mod nocloud;
mod prepare;
mod quote;
mod stratus_cloud_init;
mod userdata;

use std::path::Path;

pub use context::{
    parse_context_arg, parse_context_file, validate_key, Context, ContextMethod, IpCidr,
    StaticInterface, StaticNetwork, GENERATED_KEYS, MAX_CONTEXT_BYTES, MAX_CONTEXT_VALUE,
};
pub use error::ContextError;
pub use hepix::{
    render_context_sh, CONTEXT_SH_HEADER, CONTEXT_TARGET, EPILOG_SH, INIT_SH, ONE_LABEL, PROLOG_SH,
};
pub use image::CLOUD_INIT_DISK_BYTES;
pub use nocloud::{
    render_default_user_data, render_meta_data, render_network_config, NOCLOUD_LABEL,
};
pub use prepare::{
    parse_cloud_init_pairs, prepare_context, prepare_context_parts, CloudInitPart, PreparedContext,
};
pub use quote::{shell_double_quote, yaml_double_quote};
pub use stratus_cloud_init::{render_meta_js, CLOUD_INIT_LABEL};
pub use userdata::{
    AUTHORIZED_KEYS_KEY, MAX_USER_DATA, STRATUSLAB_MAX_GZIPPED_USER_DATA, USER_DATA_KEY,
};

/// The image bytes for `ctx` in the format of `method`, without touching disk.
pub fn build_context_image(ctx: &Context, method: ContextMethod) -> Result<Vec<u8>, ContextError> {
    ctx.validate()?;
    match method {
        ContextMethod::One => hepix::build(ctx),
        ContextMethod::CloudInit => stratus_cloud_init::build(ctx),
        ContextMethod::NoCloud => nocloud::build(ctx),
    }
}

/// Writes the context disk for `ctx` to `path`. The image is built in memory
/// and then written through a temporary file in the same directory, so on
/// any error `path` is left as it was.
pub fn write_context_disk(
    ctx: &Context,
    method: ContextMethod,
    path: &Path,
) -> Result<(), ContextError> {
    let bytes = build_context_image(ctx, method)?;
    image::write_atomically(path, &bytes)?;
    tracing::info!(
        method = %method,
        path = %path.display(),
        bytes = bytes.len(),
        instance = %ctx.instance_id,
        "wrote context disk"
    );
    Ok(())
}
