//! Instance types: StratusLab's seven, plus those the site defines (a site type with one
//! of StratusLab's names replaces it).

use serde::{Deserialize, Serialize};

use crate::config::InstanceTypeConfig;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceType {
    pub name: String,
    pub cpu: u8,
    pub ram_mib: u64,
    pub swap_mib: u64,
}

/// StratusLab's default type.
pub const DEFAULT_TYPE: &str = "m1.small";

const STRATUSLAB: &[(&str, u8, u64, u64)] = &[
    ("t1.micro", 1, 512, 512),
    ("m1.small", 1, 1536, 1536),
    ("m1.medium", 1, 3072, 3072),
    ("m1.large", 2, 6144, 6144),
    ("m1.xlarge", 4, 8192, 8192),
    ("c1.medium", 2, 1536, 1536),
    ("c1.xlarge", 4, 6144, 6144),
];

/// Largest values a run request may ask for with `--cpu/--ram/--swap`.
pub const MAX_CPU: u8 = 64;
pub const MAX_RAM_MIB: u64 = 1024 * 1024;
pub const MAX_SWAP_MIB: u64 = 1024 * 1024;

pub fn all(site: &[InstanceTypeConfig]) -> Vec<InstanceType> {
    let mut types: Vec<InstanceType> = STRATUSLAB
        .iter()
        .map(|&(name, cpu, ram_mib, swap_mib)| InstanceType {
            name: name.into(),
            cpu,
            ram_mib,
            swap_mib,
        })
        .collect();
    for t in site {
        let new = InstanceType {
            name: t.name.clone(),
            cpu: t.cpu,
            ram_mib: t.ram_mib,
            swap_mib: t.swap_mib,
        };
        match types.iter_mut().find(|e| e.name == t.name) {
            Some(existing) => *existing = new,
            None => types.push(new),
        }
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratuslab_types_and_site_types() {
        let types = all(&[
            InstanceTypeConfig {
                name: "m1.small".into(),
                cpu: 2,
                ram_mib: 2048,
                swap_mib: 0,
            },
            InstanceTypeConfig {
                name: "g1.huge".into(),
                cpu: 8,
                ram_mib: 32768,
                swap_mib: 0,
            },
        ]);
        assert_eq!(types.len(), 8);
        let small = types.iter().find(|t| t.name == DEFAULT_TYPE).unwrap();
        assert_eq!((small.cpu, small.ram_mib), (2, 2048));
        let micro = types.iter().find(|t| t.name == "t1.micro").unwrap();
        assert_eq!((micro.cpu, micro.ram_mib, micro.swap_mib), (1, 512, 512));
    }
}
