//! The virtio-blk device: configuration space, features, and its worker's lifecycle.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::event_handler::BlockWorker;
use super::io::{DiskError, DiskImage};
use super::*;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_ID_BLOCK,
};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Returned by GET_ID (the guest's /sys/block/vdX/serial); at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
}

pub struct VirtioBlock {
    disk: Arc<DiskImage>,
    serial: Vec<u8>,
    features: u64,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl VirtioBlock {
    pub fn new(config: &BlockConfig) -> Result<Self, DiskError> {
        let disk = DiskImage::open(&config.path, config.read_only)?;
        let mut features = VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_F_RING_INDIRECT_DESC;
        if config.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        Ok(VirtioBlock {
            disk: Arc::new(disk),
            serial: config.serial.clone().unwrap_or_default().into_bytes(),
            features,
            worker: None,
        })
    }

    /// struct virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry, blk_size.
    fn config_space(&self) -> [u8; 24] {
        let mut cfg = [0u8; 24];
        cfg[0..8].copy_from_slice(&(self.disk.size() >> SECTOR_SHIFT).to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        cfg
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn available_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.is_empty() {
            return Err(ActivateError::QueueCount {
                enabled: 0,
                needed: 1,
            });
        }
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker = BlockWorker {
            mem: ctx.mem,
            disk: self.disk.clone(),
            serial: self.serial.clone(),
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            kill: kill.try_clone().map_err(ActivateError::Worker)?,
        };
        let handle = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker.run())
            .map_err(ActivateError::Worker)?;
        self.worker = Some((kill, handle));
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((kill, handle)) = self.worker.take() {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }
}

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        self.reset();
    }
}
