//! The virtio-blk device: configuration space, features, and its workers' lifecycle.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::counters::BlockCounters;
use super::io::iscsi::{IscsiSource, IscsiUrl};
use super::io::rbd::{RbdName, RbdSource};
use super::io::{
    create_engine, io_uring_supported, CacheMode, DiskError, DiskFile, ImageFormat, IoEngine,
    Topology,
};
use super::worker::{QueueWorker, QueueWorkerParts};
use super::*;
use crate::devices::rate_limiter::{RateLimit, RateLimiter};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// How the VMM API names the disk; `disk<N>` when not given.
    #[serde(default)]
    pub id: Option<String>,
    /// A file or host block device; empty for a network disk.
    #[serde(default)]
    pub path: PathBuf,
    /// An iSCSI LUN instead of `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<IscsiSource>,
    /// A Ceph RBD image instead of `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdSource>,
    /// Image format; never guessed from the file (see `ImageFormat`).
    #[serde(default)]
    pub format: ImageFormat,
    #[serde(default)]
    pub read_only: bool,
    /// Returned by GET_ID (the guest's /sys/block/vdX/serial); at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub cache: CacheMode,
    /// `None` picks io_uring where the kernel allows it, else the synchronous engine.
    #[serde(default)]
    pub engine: Option<IoEngine>,
    #[serde(default)]
    pub rate_limit: RateLimit,
}

impl BlockConfig {
    /// The disk as logs and the API show it: the file's path, or the URL (no secret).
    pub fn source_name(&self) -> PathBuf {
        if let Some(source) = &self.rbd {
            return PathBuf::from(format!("rbd:{}", source.image));
        }
        match &self.iscsi {
            Some(source) => match IscsiUrl::parse(&source.url) {
                Ok(url) => PathBuf::from(url.display()),
                Err(_) => PathBuf::from("iscsi://(invalid)"),
            },
            None => self.path.clone(),
        }
    }

    /// What two disks must not share: the canonical file, or the LUN.
    pub fn identity(&self) -> Result<PathBuf, DiskError> {
        if let Some(source) = &self.rbd {
            // The image itself (a snapshot is another image's past: it may be shared).
            let name = RbdName::parse(&source.image)?;
            let conf = source.conf.as_deref().map(|c| c.display().to_string());
            return Ok(PathBuf::from(format!(
                "rbd:{}@{}",
                name.display(),
                conf.unwrap_or_default()
            )));
        }
        match &self.iscsi {
            Some(source) => Ok(PathBuf::from(IscsiUrl::parse(&source.url)?.identity())),
            None => std::fs::canonicalize(&self.path).map_err(|source| DiskError::Open {
                path: self.path.clone(),
                source,
            }),
        }
    }

    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            id: None,
            path: path.into(),
            iscsi: None,
            rbd: None,
            format: ImageFormat::Raw,
            read_only: false,
            serial: None,
            cache: CacheMode::default(),
            engine: None,
            rate_limit: RateLimit::default(),
        }
    }
}

pub struct VirtioBlock {
    disk: Arc<DiskFile>,
    serial: Arc<[u8]>,
    engine: IoEngine,
    num_queues: u16,
    features: u64,
    workers: Vec<JoinHandle<()>>,
    kill: Option<EventFd>,
    /// Always present (unlimited costs one atomic load per request), so the VMM API can
    /// change the limits at run time.
    limiter: RateLimiter,
    counters: Arc<BlockCounters>,
}

impl VirtioBlock {
    /// `num_queues` request queues (one per vCPU lets every CPU submit without sharing).
    pub fn new(config: &BlockConfig, num_queues: u16) -> Result<Self, DiskError> {
        let disk = DiskFile::open_config(config)?;
        let max_queues = disk.max_queues();
        let engine = match config.engine {
            Some(engine) => engine,
            None if io_uring_supported() => IoEngine::IoUring,
            None => IoEngine::Sync,
        };
        // Fail at start-up, not when the guest first touches the disk (a network disk
        // logged in once when it was opened).
        if !disk.is_network() {
            drop(create_engine(engine, &disk, u32::from(QUEUE_SIZE))?);
        }
        let mut features = VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_MQ
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        // The disk may be read-only when the configuration did not say so (a snapshot).
        if disk.read_only() {
            features |= VIRTIO_BLK_F_RO;
        }
        if disk.can_discard() {
            features |= VIRTIO_BLK_F_DISCARD;
        }
        if disk.can_write_zeroes() {
            features |= VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if disk.topology() != Topology::default() {
            features |= VIRTIO_BLK_F_TOPOLOGY;
        }
        Ok(VirtioBlock {
            disk: Arc::new(disk),
            serial: config
                .serial
                .clone()
                .unwrap_or_default()
                .into_bytes()
                .into(),
            engine,
            num_queues: num_queues.clamp(1, max_queues),
            features,
            workers: Vec::new(),
            kill: None,
            limiter: RateLimiter::new(config.rate_limit),
            counters: Arc::new(BlockCounters::default()),
        })
    }

    /// The disk's I/O counters (all queues, since the device was created).
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Whether the guest may not write (configured so, or an RBD snapshot).
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    pub fn engine(&self) -> IoEngine {
        self.engine
    }

    /// A handle on the limiter all queues share, for changing its limits at run time.
    pub fn rate_limiter(&self) -> RateLimiter {
        self.limiter.clone()
    }

    /// struct virtio_blk_config up to write_zeroes_may_unmap.
    fn config_space(&self) -> [u8; 60] {
        let mut cfg = [0u8; 60];
        let put32 = |cfg: &mut [u8; 60], at: usize, v: u32| {
            cfg[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        let topology = self.disk.topology();
        cfg[0..8].copy_from_slice(&(self.disk.size() >> SECTOR_SHIFT).to_le_bytes());
        put32(&mut cfg, 8, SIZE_MAX);
        put32(&mut cfg, 12, SEG_MAX);
        put32(&mut cfg, 20, topology.logical_block_size);
        cfg[24] = topology.physical_block_exp;
        // min_io_size in logical blocks: one physical block.
        cfg[26..28].copy_from_slice(&(1u16 << topology.physical_block_exp.min(15)).to_le_bytes());
        cfg[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        // Meaningful only with the features, which are offered exactly when these are Some.
        let ranges = self.disk.range_requests();
        put32(&mut cfg, 36, ranges.discard.unwrap_or(0));
        put32(&mut cfg, 40, MAX_DISCARD_SEGMENTS);
        // Discards are cheapest in whole host pages (or blocks, when larger).
        let block_sectors = topology.logical_block_size >> SECTOR_SHIFT;
        put32(&mut cfg, 44, block_sectors.max(8));
        put32(&mut cfg, 48, ranges.write_zeroes.unwrap_or(0));
        put32(&mut cfg, 52, MAX_DISCARD_SEGMENTS);
        cfg[56] = u8::from(self.disk.can_discard()); // write_zeroes_may_unmap
        cfg
    }

    fn start_workers(&mut self, ctx: ActivateContext, kill: &EventFd) -> Result<(), ActivateError> {
        for (index, (queue, queue_event)) in
            ctx.queues.into_iter().zip(ctx.queue_events).enumerate()
        {
            let engine = create_engine(self.engine, &self.disk, u32::from(QUEUE_SIZE))
                .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
            let worker = QueueWorker::new(QueueWorkerParts {
                mem: ctx.mem.clone(),
                disk: self.disk.clone(),
                serial: self.serial.clone(),
                queue,
                queue_index: index as u16,
                queue_event,
                interrupt: ctx.interrupt.clone(),
                kill: kill.try_clone().map_err(ActivateError::Worker)?,
                engine,
                limiter: Some(self.limiter.clone()),
                counters: self.counters.clone(),
            })
            .map_err(ActivateError::Worker)?;
            let handle = std::thread::Builder::new()
                .name(format!("virtio-blk-q{index}"))
                .spawn(move || {
                    crate::seccomp::confine_or_abort(crate::seccomp::ThreadKind::BlockWorker);
                    worker.run()
                })
                .map_err(ActivateError::Worker)?;
            self.workers.push(handle);
        }
        Ok(())
    }

    fn stop_workers(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.write(1);
        }
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.num_queues as usize]
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
        self.kill = Some(kill.try_clone().map_err(ActivateError::Worker)?);
        let started = self.start_workers(ctx, &kill);
        if started.is_err() {
            // Workers already running would otherwise serve a device the guest was told
            // failed.
            self.stop_workers();
        }
        started
    }
    fn reset(&mut self) {
        self.stop_workers();
    }
}

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        self.stop_workers();
    }
}
