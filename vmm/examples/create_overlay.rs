//! Makes a qcow2 overlay the way the node agent does for a VM's root disk:
//! `create_overlay OVERLAY BACKING raw|qcow2`. Used by the nested test harness.

use stratus_vmm::devices::virtio::block::io::qcow2::create_overlay;
use stratus_vmm::devices::virtio::block::io::ImageFormat;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [overlay, backing, format] = args.as_slice() else {
        anyhow::bail!("usage: create_overlay OVERLAY BACKING raw|qcow2");
    };
    let format: ImageFormat = format.parse().map_err(anyhow::Error::msg)?;
    create_overlay(overlay.as_ref(), backing.as_ref(), format)?;
    Ok(())
}
