//! cloud-init NoCloud seed (`cidata`), which stock Ubuntu and Debian cloud
//! images read without any change to the image.

use std::fmt::Write as _;

use crate::context::StaticNetwork;
use crate::image::{build_iso, ImageFile};
use crate::quote::yaml_double_quote;
use crate::userdata::{authorized_keys, user_data};
use crate::{Context, ContextError};

pub const NOCLOUD_LABEL: &str = "cidata";

/// `meta-data`. The keys also go in `public-keys` so that they reach the
/// image's default user even when the user data is the user's own script.
pub fn render_meta_data(ctx: &Context, keys: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "instance-id: {}", yaml_double_quote(&ctx.instance_id));
    let _ = writeln!(out, "local-hostname: {}", yaml_double_quote(&ctx.hostname));
    if !keys.is_empty() {
        out.push_str("public-keys:\n");
        for key in keys {
            let _ = writeln!(out, "  - {}", yaml_double_quote(key));
        }
    }
    out
}

/// The `#cloud-config` used when the user gave no user data.
pub fn render_default_user_data(keys: &[String]) -> String {
    let mut out = String::from("#cloud-config\n");
    if keys.is_empty() {
        // A bare header parses to null, which some cloud-init versions warn about.
        out.push_str("{}\n");
    } else {
        out.push_str("ssh_authorized_keys:\n");
        for key in keys {
            let _ = writeln!(out, "  - {}", yaml_double_quote(key));
        }
    }
    out
}

/// Network config version 2. Interfaces are matched by MAC and renamed, and the
/// default routes use explicit prefixes, which every cloud-init renderer
/// (netplan, ifupdown, networkd, sysconfig) understands.
pub fn render_network_config(net: &StaticNetwork) -> String {
    let mut out = String::from("version: 2\nethernets:\n");
    for iface in &net.interfaces {
        let name = yaml_double_quote(&iface.name);
        let _ = writeln!(out, "  {name}:");
        out.push_str("    match:\n");
        let _ = writeln!(
            out,
            "      macaddress: {}",
            yaml_double_quote(&iface.mac.to_ascii_lowercase())
        );
        let _ = writeln!(out, "    set-name: {name}");
        out.push_str("    dhcp4: false\n    dhcp6: false\n    addresses:\n");
        for addr in &iface.addresses {
            let _ = writeln!(out, "      - {}", yaml_double_quote(&addr.to_string()));
        }
        let routes: Vec<(&str, String)> = iface
            .gateway4
            .map(|gw| ("0.0.0.0/0", gw.to_string()))
            .into_iter()
            .chain(iface.gateway6.map(|gw| ("::/0", gw.to_string())))
            .collect();
        if !routes.is_empty() {
            out.push_str("    routes:\n");
            for (to, via) in routes {
                let _ = writeln!(out, "      - to: {}", yaml_double_quote(to));
                let _ = writeln!(out, "        via: {}", yaml_double_quote(&via));
            }
        }
        if !iface.nameservers.is_empty() || !iface.search.is_empty() {
            out.push_str("    nameservers:\n");
            if !iface.nameservers.is_empty() {
                out.push_str("      addresses:\n");
                for ns in &iface.nameservers {
                    let _ = writeln!(out, "        - {}", yaml_double_quote(&ns.to_string()));
                }
            }
            if !iface.search.is_empty() {
                out.push_str("      search:\n");
                for domain in &iface.search {
                    let _ = writeln!(out, "        - {}", yaml_double_quote(domain));
                }
            }
        }
    }
    out
}

pub(crate) fn build(ctx: &Context) -> Result<Vec<u8>, ContextError> {
    let keys = authorized_keys(ctx)?;
    let user_data = match user_data(ctx)? {
        Some(ud) => ud.bytes,
        None => render_default_user_data(&keys).into_bytes(),
    };
    let mut files = vec![
        ImageFile::new("meta-data", render_meta_data(ctx, &keys), 0o644),
        ImageFile::new("user-data", user_data, 0o644),
    ];
    if let Some(net) = &ctx.network {
        files.push(ImageFile::new(
            "network-config",
            render_network_config(net),
            0o644,
        ));
    }
    build_iso(NOCLOUD_LABEL, &files)
}
