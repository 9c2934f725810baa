//! The block device's worker thread: waits on queue notifications and serves requests.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::io::DiskImage;
use super::request::{execute, parse};
use super::{SECTOR_SHIFT, VIRTIO_BLK_S_IOERR};
use crate::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use crate::memory::GuestMemoryMmap;

pub struct BlockWorker {
    pub mem: GuestMemoryMmap,
    pub disk: Arc<DiskImage>,
    pub serial: Vec<u8>,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub kill: EventFd,
}

const KILL_TOKEN: u64 = u64::MAX;

impl BlockWorker {
    /// Serves every available request on queue `index`; returns how many were completed.
    pub fn process_queue(&mut self, index: usize) -> usize {
        let sectors = self.disk.size() >> SECTOR_SHIFT;
        let read_only = self.disk.read_only();
        let mem = &self.mem;
        let Some(queue) = self.queues.get_mut(index) else {
            return 0;
        };
        let mut completed = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (status_addr, status, len) = match parse(chain, mem, sectors, read_only) {
                Ok(request) => {
                    let (status, len) = execute(&request, mem, &self.disk, &self.serial);
                    (Some(request.status), status, len)
                }
                Err((error, status_addr)) => {
                    tracing::warn!("refusing virtio-blk request: {error}");
                    (status_addr, VIRTIO_BLK_S_IOERR, 0)
                }
            };
            let used_len = match status_addr {
                Some(addr) if mem.write_obj(status, addr).is_ok() => len + 1,
                _ => 0,
            };
            if let Err(e) = queue.add_used(mem, head, used_len) {
                tracing::error!("cannot complete virtio-blk request {head}: {e:?}");
                break;
            }
            completed += 1;
        }
        if completed > 0 && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt
                .trigger(VirtioInterruptType::Queue(index as u16));
        }
        completed
    }

    pub fn run(mut self) {
        let epoll = match self.register() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-blk worker cannot set up epoll: {e}");
                return;
            }
        };
        let mut events = vec![EpollEvent::default(); self.queue_events.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk worker epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == KILL_TOKEN {
                    return;
                }
                let index = token as usize;
                if let Some(e) = self.queue_events.get(index) {
                    let _ = e.read();
                }
                self.process_queue(index);
            }
        }
    }

    fn register(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (i, e) in self.queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        Ok(epoll)
    }
}
