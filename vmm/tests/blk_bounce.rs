//! A hostile guest against the O_DIRECT bounce path (cache=none): requests whose buffers
//! O_DIRECT cannot take are copied through a bounce buffer. A review made a 64 MiB guest
//! grow the VMM by 2 GiB with two requests whose descriptors all alias the same misaligned
//! guest pages. The bounce now holds one piece of a request at a time within a per-queue
//! budget, and segments are bounded by SIZE_MAX. Its own test binary: it measures the
//! process's peak memory.

mod blk_common;

use blk_common::chain;
use blk_common::guest::{Chain, Guest, DATA, HEADER, R, STATUS, W};
use stratus_vmm::devices::virtio::block::io::CacheMode;
use stratus_vmm::devices::virtio::block::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

/// A sparse disk of `mib` MiB opened with cache=none (on a real filesystem: tmpfs refuses
/// O_DIRECT).
fn direct_guest(mib: u64) -> (tempfile::TempDir, std::path::PathBuf, Guest) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    let mut config = BlockConfig::new(path.to_str().unwrap());
    config.cache = CacheMode::None;
    let guest = Guest::new(&config);
    (dir, path, guest)
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    usage.ru_maxrss as u64 * 1024
}

/// Serves `chains` to the end, taking requests again whenever the worker held some back;
/// returns the status bytes and how many rounds it took.
fn serve_all(guest: &Guest, chains: &[Chain], statuses: &[u64]) -> (Vec<u8>, usize) {
    let mock = MockSplitQueue::create(&guest.mem, GuestAddress(0), QUEUE_SIZE);
    let mut next = 0u16;
    for c in chains {
        mock.add_desc_chains(&chain(c, next), next).unwrap();
        next += c.len() as u16;
    }
    let mut worker = guest.worker(mock.create_queue().unwrap());
    let (mut taken, mut rounds) = (0, 0);
    while taken < chains.len() {
        rounds += 1;
        assert!(rounds <= chains.len() + 1, "requests are never taken");
        taken += worker.process_queue();
        worker.drain();
    }
    assert_eq!(mock.used().idx().load() as usize, chains.len());
    let statuses = statuses
        .iter()
        .map(|s| guest.mem.read_obj::<u8>(GuestAddress(*s)).unwrap())
        .collect();
    (statuses, rounds)
}

#[test]
fn aliased_misaligned_requests_cost_the_vmm_one_piece_not_their_length() {
    let (_dir, _path, guest) = direct_guest(256);
    let misaligned = DATA + 1;
    // Each request: 100 segments of SIZE_MAX bytes, every one the same misaligned megabyte
    // of guest memory: 100 MiB each (three such chains would not fit in the ring at once).
    let segments = 100;
    let request = |header: u64, status: u64, flags: u32| {
        let mut c: Chain = vec![(header, 16, R)];
        c.extend(std::iter::repeat_n((misaligned, SIZE_MAX, flags), segments));
        c.push((status, 1, W));
        c
    };
    guest.header(HEADER, VIRTIO_BLK_T_IN, 0);
    guest.header(HEADER + 16, VIRTIO_BLK_T_IN, 0);
    guest.header(HEADER + 32, VIRTIO_BLK_T_OUT, 0);
    let pattern: Vec<u8> = (0..SIZE_MAX).map(|i| (i % 253) as u8).collect();
    guest
        .mem
        .write_slice(&pattern, GuestAddress(misaligned))
        .unwrap();
    let before = peak_rss_bytes();
    // The write first (alone), so the reads find its data.
    let (statuses, _) = serve_all(
        &guest,
        &[request(HEADER + 32, STATUS + 2, R)],
        &[STATUS + 2],
    );
    assert_eq!(statuses, [VIRTIO_BLK_S_OK]);
    let (statuses, _) = serve_all(
        &guest,
        &[
            request(HEADER, STATUS, W),
            request(HEADER + 16, STATUS + 1, W),
        ],
        &[STATUS, STATUS + 1],
    );
    assert_eq!(statuses, [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]);
    let grown = peak_rss_bytes().saturating_sub(before);
    // 300 MiB of requests, 200 MiB of them in flight together; the bounce budget is
    // 16 MiB per queue.
    assert!(
        grown < 64 * MIB,
        "the VMM grew by {} MiB for 300 MiB of aliased requests",
        grown / MIB
    );
    // Every piece went where it belonged: the last megabyte read is the pattern again.
    let mut back = vec![0u8; SIZE_MAX as usize];
    guest
        .mem
        .read_slice(&mut back, GuestAddress(misaligned))
        .unwrap();
    assert!(back == pattern);
}

#[test]
fn misaligned_requests_past_the_bounce_budget_wait_their_turn_and_all_land() {
    let (_dir, path, guest) = direct_guest(96);
    let count = 40u64;
    let misaligned = DATA + 3;
    // 40 writes of 2 MiB each (two 1 MiB segments), each bouncing: 40 pieces of 1 MiB
    // held at once would pass the 16 MiB budget.
    let mut chains = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..count {
        let header = HEADER + i * 16;
        guest.header(header, VIRTIO_BLK_T_OUT, i * 2 * MIB / 512);
        statuses.push(STATUS + i);
        chains.push(vec![
            (header, 16, R),
            (misaligned, SIZE_MAX, R),
            (misaligned + MIB, SIZE_MAX, R),
            (STATUS + i, 1, W),
        ]);
    }
    let pattern: Vec<u8> = (0..2 * MIB).map(|i| (i % 241) as u8).collect();
    guest
        .mem
        .write_slice(&pattern, GuestAddress(misaligned))
        .unwrap();
    let (got, rounds) = serve_all(&guest, &chains, &statuses);
    assert!(got.iter().all(|s| *s == VIRTIO_BLK_S_OK), "{got:?}");
    assert!(rounds > 1, "the budget held none back");
    let disk = std::fs::read(&path).unwrap();
    for i in 0..count as usize {
        let at = i * 2 * MIB as usize;
        assert!(
            disk[at..at + 2 * MIB as usize] == pattern[..],
            "write {i} is not on the disk"
        );
    }
}

#[test]
fn a_segment_longer_than_size_max_is_refused() {
    let (_dir, _path, guest) = direct_guest(8);
    guest.header(HEADER, VIRTIO_BLK_T_IN, 0);
    guest.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    let chains = [vec![
        (HEADER, 16, R),
        (DATA, SIZE_MAX + 512, W),
        (STATUS, 1, W),
    ]];
    let (statuses, _) = serve_all(&guest, &chains, &[STATUS]);
    assert_eq!(statuses, [VIRTIO_BLK_S_IOERR]);
}

#[test]
fn pieces_that_split_segments_put_every_byte_in_its_place() {
    let (_dir, path, guest) = direct_guest(8);
    // Three 768 KiB segments at odd, scattered guest addresses: the 1 MiB pieces end in
    // the middle of a segment.
    let seg = 768 << 10;
    let addrs = [DATA + 1, DATA + (1 << 20) + 7, DATA + (2 << 20) + 513];
    let disk: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &disk).unwrap();
    let first_sector = 3u64;
    guest.header(HEADER, VIRTIO_BLK_T_IN, first_sector);
    let mut read: Chain = vec![(HEADER, 16, R)];
    read.extend(addrs.iter().map(|&a| (a, seg, W)));
    read.push((STATUS, 1, W));
    let (statuses, _) = serve_all(&guest, &[read], &[STATUS]);
    assert_eq!(statuses, [VIRTIO_BLK_S_OK]);
    let start = (first_sector * 512) as usize;
    for (i, &a) in addrs.iter().enumerate() {
        let mut got = vec![0u8; seg as usize];
        guest.mem.read_slice(&mut got, GuestAddress(a)).unwrap();
        let at = start + i * seg as usize;
        assert!(
            got == disk[at..at + seg as usize],
            "segment {i} of the read"
        );
    }
    // And back: the same scattered segments, changed, written elsewhere on the disk.
    for &a in &addrs {
        let mut buf = vec![0u8; seg as usize];
        guest.mem.read_slice(&mut buf, GuestAddress(a)).unwrap();
        buf.iter_mut().for_each(|b| *b = b.wrapping_add(1));
        guest.mem.write_slice(&buf, GuestAddress(a)).unwrap();
    }
    let target_sector = 5000u64;
    guest.header(HEADER + 16, VIRTIO_BLK_T_OUT, target_sector);
    let mut write: Chain = vec![(HEADER + 16, 16, R)];
    write.extend(addrs.iter().map(|&a| (a, seg, R)));
    write.push((STATUS + 1, 1, W));
    let (statuses, _) = serve_all(&guest, &[write], &[STATUS + 1]);
    assert_eq!(statuses, [VIRTIO_BLK_S_OK]);
    let written = std::fs::read(&path).unwrap();
    let at = (target_sector * 512) as usize;
    for i in 0..3 * seg as usize {
        assert_eq!(
            written[at + i],
            disk[start + i].wrapping_add(1),
            "byte {i} of the write"
        );
    }
}
