//! Builds a Marketplace entry for a disk image, signs it with an endorser's key and
//! certificate, and posts it to a Marketplace; prints the image's identifier. Used by the
//! nested end-to-end run (`tests/nested/cloud_in_l1.sh`).
//!
//! publish_image IMAGE LOCATION-URL MARKETPLACE-URL KEY.pem CERT.pem UPLOAD-TOKEN-FILE

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, location, marketplace, key, cert, token_file] = args.as_slice() else {
        bail!(
            "usage: publish_image IMAGE LOCATION-URL MARKETPLACE-URL KEY.pem CERT.pem UPLOAD-TOKEN-FILE"
        );
    };
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading {token_file}"))?
        .trim()
        .to_owned();
    let signer = stratus_images::dsig::Signer::from_pem(
        &std::fs::read_to_string(key).with_context(|| format!("reading {key}"))?,
        &std::fs::read_to_string(cert).with_context(|| format!("reading {cert}"))?,
    )?;
    let endorser = stratus_images::ops::endorser_of(&signer)?;
    let mut entry = stratus_images::ops::build(image.as_ref(), endorser, "machine")?;
    entry.locations = vec![location.clone()];
    let xml = stratus_images::ops::sign(&entry, &signer, &Default::default())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let response = stratus_orchestrator::tls::client(None)?
            .post(format!("{}/metadata", marketplace.trim_end_matches('/')))
            .header("content-type", "application/rdf+xml")
            .bearer_auth(&token)
            .body(xml)
            .send()
            .await
            .context("posting the entry")?;
        if !response.status().is_success() {
            bail!(
                "the Marketplace refused the entry ({}): {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    })?;
    println!("{}", entry.identifier);
    Ok(())
}
