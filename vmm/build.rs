//! Links libiscsi (Debian: libiscsi-dev). A statically linked VMM (the nested harness's
//! `+crt-static` build) also needs the libraries libiscsi's iSER transport pulls in, which
//! a shared libiscsi would have brought along by itself.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=iscsi");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if features.split(',').any(|f| f == "crt-static") {
        for lib in ["rdmacm", "ibverbs", "nl-route-3", "nl-3", "pthread"] {
            println!("cargo:rustc-link-lib={lib}");
        }
    }
}
