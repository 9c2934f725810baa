//! Benchmark helpers: a tiny PVH guest both VMMs can boot, process timing by console
//! markers, medians, and VMM memory overhead from /proc.

pub mod agent;
pub mod blk;
pub mod cloud;
pub mod download;
pub mod guest;
pub mod measure;
