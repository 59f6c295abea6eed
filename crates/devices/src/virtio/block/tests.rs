//! virtio-blk against hand-built descriptor chains, good and hostile.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_util::{QueueHarness, WRITE};

fn disk(sectors: u64) -> (tempfile::NamedTempFile, File) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.path())
        .unwrap();
    (f, file)
}

fn header(h: &QueueHarness, at: u64, t: u32, sector: u64) {
    let hdr = RequestHeader {
        request_type: t,
        sector,
    };
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(at))
        .unwrap();
}

fn status(h: &QueueHarness, at: u64) -> u8 {
    h.mem.read_obj(GuestAddress(at)).unwrap()
}

fn active(file: File) -> Block {
    let mut b = Block::new(file, false, "ferry-disk-0").unwrap();
    b.activate(b.avail_features() | crate::virtio::VIRTIO_F_VERSION_1);
    b
}

#[test]
fn write_read_flush_and_id() {
    let (_t, file) = disk(64);
    let mut b = active(file);
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    // Write 1 KiB of 0xab at sector 3.
    header(&h, 0x10000, T_OUT, 3);
    h.mem
        .write_slice(&[0xab; 1024], GuestAddress(0x11000))
        .unwrap();
    h.add_chain(&[(0x10000, 16, 0), (0x11000, 1024, 0), (0x12000, 1, WRITE)]);
    assert!(
        b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem),
        "interrupt wanted"
    );
    assert_eq!(status(&h, 0x12000), S_OK);
    // Read it back into another buffer.
    header(&h, 0x13000, T_IN, 3);
    h.add_chain(&[
        (0x13000, 16, 0),
        (0x14000, 1024, WRITE),
        (0x15000, 1, WRITE),
    ]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x15000), S_OK);
    let mut back = [0u8; 1024];
    h.mem.read_slice(&mut back, GuestAddress(0x14000)).unwrap();
    assert_eq!(back, [0xab; 1024]);
    assert_eq!(h.used_len(1), 1025, "read reports data + status");
    // Flush and GET_ID.
    header(&h, 0x16000, T_FLUSH, 0);
    h.add_chain(&[(0x16000, 16, 0), (0x16100, 1, WRITE)]);
    header(&h, 0x17000, T_GET_ID, 0);
    h.add_chain(&[(0x17000, 16, 0), (0x17100, 20, WRITE), (0x17200, 1, WRITE)]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x16100), S_OK);
    assert_eq!(status(&h, 0x17200), S_OK);
    let mut id = [0u8; 12];
    h.mem.read_slice(&mut id, GuestAddress(0x17100)).unwrap();
    assert_eq!(&id, b"ferry-disk-0");
    assert_eq!(&b.file_bytes()[3 * 512..3 * 512 + 1024], &[0xab; 1024][..]);
}

#[test]
fn out_of_range_and_unaligned_are_io_errors() {
    let (_t, file) = disk(8);
    let mut b = active(file);
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    header(&h, 0x10000, T_IN, 7);
    h.add_chain(&[
        (0x10000, 16, 0),
        (0x11000, 1024, WRITE),
        (0x12000, 1, WRITE),
    ]);
    header(&h, 0x13000, T_OUT, u64::MAX / 256);
    h.add_chain(&[(0x13000, 16, 0), (0x14000, 512, 0), (0x15000, 1, WRITE)]);
    header(&h, 0x16000, T_OUT, 0);
    h.add_chain(&[(0x16000, 16, 0), (0x17000, 100, 0), (0x18000, 1, WRITE)]);
    header(&h, 0x19000, 77, 0);
    h.add_chain(&[(0x19000, 16, 0), (0x19100, 1, WRITE)]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x12000), S_IOERR, "read past the end");
    assert_eq!(status(&h, 0x15000), S_IOERR, "sector overflow");
    assert_eq!(status(&h, 0x18000), S_IOERR, "not a whole sector");
    assert_eq!(status(&h, 0x19100), S_UNSUPP, "unknown type");
    assert!(
        b.file_bytes().iter().all(|&x| x == 0),
        "nothing was written"
    );
}

#[test]
fn hostile_chains_are_dropped_without_touching_memory() {
    let (_t, file) = disk(8);
    let mut b = active(file);
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    let ram_end = h.ram_bytes();
    // Data buffer outside guest memory.
    header(&h, 0x10000, T_IN, 0);
    h.add_chain(&[
        (0x10000, 16, 0),
        (ram_end + 0x1000, 512, WRITE),
        (0x12000, 1, WRITE),
    ]);
    // Buffer straddling the end of guest memory.
    header(&h, 0x13000, T_IN, 0);
    h.add_chain(&[
        (0x13000, 16, 0),
        (ram_end - 256, 512, WRITE),
        (0x14000, 1, WRITE),
    ]);
    // No writable status byte.
    header(&h, 0x15000, T_IN, 0);
    h.add_chain(&[(0x15000, 16, 0)]);
    // Truncated header.
    h.add_chain(&[(0x16000, 8, 0), (0x16100, 1, WRITE)]);
    // A chain that loops back on itself.
    h.add_loop(0x17000);
    h.mem.write_obj(0x5au8, GuestAddress(0x12000)).unwrap();
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(
        h.used_idx(),
        5,
        "every chain completed, none hung the device"
    );
    for i in 0..4 {
        assert_eq!(h.used_len(i), 0, "chain {i} was dropped");
    }
    // The loop is cut at the queue size (virtio-queue's TTL): what remains is a request with a
    // 7-byte data area, refused with IOERR.
    assert_eq!(h.used_len(4), 1);
    assert_eq!(status(&h, 0x17010), S_IOERR);
    assert_eq!(
        status(&h, 0x12000),
        0x5a,
        "status of a rejected chain untouched"
    );
}

#[test]
fn read_only_refuses_writes_and_discard() {
    let (_t, file) = disk(8);
    let mut b = Block::new(file, true, "ro").unwrap();
    assert_ne!(b.avail_features() & F_RO, 0);
    b.activate(b.avail_features());
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    header(&h, 0x10000, T_OUT, 0);
    h.add_chain(&[(0x10000, 16, 0), (0x11000, 512, 0), (0x12000, 1, WRITE)]);
    header(&h, 0x13000, T_DISCARD, 0);
    h.mem
        .write_slice(
            &ZeroSegment {
                sector: 0,
                num_sectors: 8,
                flags: 0,
            }
            .to_bytes(),
            GuestAddress(0x13100),
        )
        .unwrap();
    h.add_chain(&[(0x13000, 16, 0), (0x13100, 16, 0), (0x14000, 1, WRITE)]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x12000), S_IOERR);
    assert_eq!(status(&h, 0x14000), S_UNSUPP);
}

#[test]
fn write_zeroes_and_discard_zero_the_range() {
    let (_t, file) = disk(16);
    file.write_all_at(&[0xffu8; 16 * 512], 0).unwrap();
    let mut b = active(file);
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    header(&h, 0x10000, T_WRITE_ZEROES, 0);
    h.mem
        .write_slice(
            &ZeroSegment {
                sector: 0,
                num_sectors: 8,
                flags: 0,
            }
            .to_bytes(),
            GuestAddress(0x10100),
        )
        .unwrap();
    h.add_chain(&[(0x10000, 16, 0), (0x10100, 16, 0), (0x11000, 1, WRITE)]);
    header(&h, 0x12000, T_DISCARD, 0);
    h.mem
        .write_slice(
            &ZeroSegment {
                sector: 8,
                num_sectors: 8,
                flags: 0,
            }
            .to_bytes(),
            GuestAddress(0x12100),
        )
        .unwrap();
    h.add_chain(&[(0x12000, 16, 0), (0x12100, 16, 0), (0x13000, 1, WRITE)]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x11000), S_OK);
    assert_eq!(status(&h, 0x13000), S_OK);
    let bytes = b.file_bytes();
    assert!(bytes[..8 * 512].iter().all(|&x| x == 0), "write-zeroes");
    assert!(
        bytes[8 * 512..].iter().all(|&x| x == 0),
        "discard punched a hole (tmpfs/ext4 support it)"
    );
}

#[test]
fn state_round_trip_refuses_a_resized_image() {
    let (t, file) = disk(8);
    let b = active(file);
    let s = b.save().unwrap();
    let again = Block::restore(
        Box::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(t.path())
                .unwrap(),
        ),
        &s,
    )
    .unwrap();
    assert_eq!(again.save().unwrap(), s);
    t.as_file().set_len(16 * 512).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path())
        .unwrap();
    assert!(Block::restore(Box::new(f), &s).is_err());
}

#[test]
fn device_writes_to_guest_memory_are_in_the_dirty_bitmap() {
    use vm_memory::GuestMemoryBackend;
    let (_t, file) = disk(64);
    file.write_all_at(&[0x11u8; 4096], 0).unwrap();
    let mut b = active(file);
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    header(&h, 0x10000, T_IN, 0);
    h.add_chain(&[
        (0x10000, 16, 0),
        (0x40000, 4096, WRITE),
        (0x12000, 1, WRITE),
    ]);
    let region = h.mem.iter().next().unwrap();
    let bitmap = region.get_mmap();
    bitmap.bitmap().reset();
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    let dirty = |a: usize| bitmap.bitmap().is_addr_set(a);
    assert!(dirty(0x40000), "read data");
    assert!(dirty(0x12000), "status byte");
    assert!(dirty(0x5000), "used ring");
    assert!(!dirty(0x10000), "the request header was only read");
    assert!(!dirty(0x60000), "untouched memory");
}

/// Large reads and writes go straight between the file and guest memory, across however many
/// buffers the chain splits them into, and a read's data is in the dirty bitmap all the same.
#[test]
fn large_requests_go_straight_to_and_from_guest_memory() {
    use vm_memory::GuestMemoryBackend;
    let (_t, file) = disk(1024);
    let pattern: Vec<u8> = (0..128 * 1024u32).map(|i| (i % 251) as u8).collect();
    file.write_all_at(&pattern, 64 * 512).unwrap();
    let mut b = active(file);
    assert_eq!(b.disk.direct_min(), Some(FILE_DIRECT_MIN));
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    // 128 KiB at sector 64, read into two buffers of 96 and 32 KiB.
    header(&h, 0x10000, T_IN, 64);
    h.add_chain(&[
        (0x10000, 16, 0),
        (0x20000, 96 * 1024, WRITE),
        (0x50000, 32 * 1024, WRITE),
        (0x12000, 1, WRITE),
    ]);
    let region = h.mem.iter().next().unwrap();
    let bitmap = region.get_mmap();
    bitmap.bitmap().reset();
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x12000), S_OK);
    assert_eq!(h.used_len(0), 128 * 1024 + 1);
    let mut got = vec![0u8; 128 * 1024];
    h.mem
        .read_slice(&mut got[..96 * 1024], GuestAddress(0x20000))
        .unwrap();
    h.mem
        .read_slice(&mut got[96 * 1024..], GuestAddress(0x50000))
        .unwrap();
    assert_eq!(got, pattern);
    let dirty = |a: usize| bitmap.bitmap().is_addr_set(a);
    assert!(
        dirty(0x20000) && dirty(0x37000) && dirty(0x57000),
        "read data"
    );
    assert!(!dirty(0x60000), "untouched memory");
    // Write it back 256 sectors further, from the same two buffers (the header and the data
    // share the first descriptor this time).
    let first = 0x20000 - 16;
    header(&h, first, T_OUT, 320);
    h.add_chain(&[
        (first, 16 + 96 * 1024, 0),
        (0x50000, 32 * 1024, 0),
        (0x13000, 1, WRITE),
    ]);
    // The header took 16 bytes of the first buffer: put the data after it.
    h.mem
        .write_slice(&pattern[..96 * 1024], GuestAddress(first + 16))
        .unwrap();
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x13000), S_OK);
    let f = b.file_bytes();
    assert_eq!(&f[320 * 512..320 * 512 + 128 * 1024], &pattern[..]);
    // A write straddling the end of the disk is refused, nothing written.
    header(&h, 0x70000, T_OUT, 1024 - 64);
    h.add_chain(&[
        (0x70000, 16, 0),
        (0x80000, 64 * 1024, 0),
        (0x14000, 1, WRITE),
    ]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(status(&h, 0x14000), S_IOERR);
}

/// A backend that serves from memory and records the batches it was handed; or, with
/// `two_in_flight`, keeps two requests in flight and finishes the newer first, as a network
/// disk's answers may come.
struct Recorder {
    data: Vec<u8>,
    batches: std::sync::Arc<std::sync::Mutex<Vec<Vec<DiskOpKind>>>>,
    two_in_flight: bool,
}

impl DiskBackend for Recorder {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("no holes here"))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _: bool) -> std::io::Result<()> {
        let o = offset as usize;
        self.data[o..o + len as usize].fill(0);
        Ok(())
    }
    fn run(&mut self, ops: &mut [DiskOp]) {
        self.batches
            .lock()
            .unwrap()
            .push(ops.iter().map(|o| o.kind).collect());
        for op in ops.iter_mut() {
            op.result = op.run_on(self);
        }
    }
    fn serve_stream(&mut self, feed: &mut dyn RequestFeed, mem: &GuestMemoryMmap) {
        if !self.two_in_flight {
            return serve_batches(self, feed, mem);
        }
        let mut in_flight: Vec<(usize, DiskOp)> = Vec::new();
        loop {
            feed.take(2 - in_flight.len(), usize::MAX, &mut in_flight);
            let Some((tag, mut op)) = in_flight.pop() else {
                return;
            };
            op.result = op.run_on(self);
            feed.done(tag, op);
        }
    }
}

/// Queue `n` writes of 512 bytes: sector i gets i + 1 in every byte; its status byte is at
/// 0x10800 + i * 0x1000.
fn queue_writes(h: &mut QueueHarness, n: u64) {
    for i in 0..n {
        let at = 0x10000 + i * 0x1000;
        header(h, at, T_OUT, i);
        h.mem
            .write_slice(&[i as u8 + 1; 512], GuestAddress(at + 0x100))
            .unwrap();
        h.add_chain(&[(at, 16, 0), (at + 0x100, 512, 0), (at + 0x800, 1, WRITE)]);
    }
}

#[test]
fn queued_requests_reach_the_backend_as_one_batch() {
    let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = Recorder {
        data: vec![0u8; 64 * 512],
        batches: batches.clone(),
        two_in_flight: false,
    };
    let mut b = Block::new(rec, false, "batch").unwrap();
    b.activate(b.avail_features() | crate::virtio::VIRTIO_F_VERSION_1);
    let mut h = QueueHarness::new(32);
    let mut q: Queue = h.queue();
    // Eight writes of 512 bytes (sectors 0..8), each its own pattern, then a flush and a
    // discard the backend cannot do (a hint: still OK).
    queue_writes(&mut h, 8);
    header(&h, 0x20000, T_FLUSH, 0);
    h.add_chain(&[(0x20000, 16, 0), (0x20100, 1, WRITE)]);
    header(&h, 0x21000, T_DISCARD, 0);
    h.mem
        .write_slice(
            &ZeroSegment {
                sector: 0,
                num_sectors: 1,
                flags: 0,
            }
            .to_bytes(),
            GuestAddress(0x21100),
        )
        .unwrap();
    h.add_chain(&[(0x21000, 16, 0), (0x21100, 16, 0), (0x21200, 1, WRITE)]);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    let got = batches.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one batch for everything queued: {got:?}");
    assert_eq!(got[0].len(), 10);
    assert_eq!(
        got[0].iter().filter(|k| **k == DiskOpKind::Write).count(),
        8
    );
    for i in 0..8u64 {
        assert_eq!(status(&h, 0x10000 + i * 0x1000 + 0x800), S_OK);
    }
    assert_eq!(status(&h, 0x20100), S_OK);
    assert_eq!(
        status(&h, 0x21200),
        S_OK,
        "a discard the disk cannot do is still OK"
    );
    assert_eq!(h.used_idx(), 10);
    let bytes = b.file_bytes();
    for i in 0..8usize {
        assert!(bytes[i * 512..(i + 1) * 512]
            .iter()
            .all(|&x| x == i as u8 + 1));
    }
}

#[test]
fn a_streaming_disk_has_each_request_answered_as_it_finishes_and_the_driver_interrupted_meanwhile()
{
    let disk = Recorder {
        data: vec![0u8; 64 * 512],
        batches: Default::default(),
        two_in_flight: true,
    };
    let mut b = Block::new(disk, false, "stream").unwrap();
    b.activate(b.avail_features() | crate::virtio::VIRTIO_F_VERSION_1);
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    b.set_interrupt(crate::virtio::Interrupt::new(irq.try_clone().unwrap()));
    let mut h = QueueHarness::new(32);
    let mut q: Queue = h.queue();
    queue_writes(&mut h, 6);
    b.process(Wake::Queue(0), std::slice::from_mut(&mut q), &h.mem);
    assert_eq!(h.used_idx(), 6, "every request answered");
    for i in 0..6u64 {
        assert_eq!(status(&h, 0x10000 + i * 0x1000 + 0x800), S_OK);
    }
    // The chains' heads are 0, 3, 6, ... (three descriptors each). The disk finished the newer
    // of its two first: the second request is answered before the first.
    let order: Vec<u32> = (0..6).map(|i| h.used_id(i)).collect();
    assert_eq!(
        order[0], 3,
        "answered as finished, not as queued: {order:?}"
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 3, 6, 9, 12, 15]);
    // The disk never had more than two; the driver heard of answers while others were out.
    assert!(
        irq.read().unwrap_or(0) >= 1,
        "interrupted while requests were in flight"
    );
    let bytes = b.file_bytes();
    for i in 0..6usize {
        assert!(bytes[i * 512..(i + 1) * 512]
            .iter()
            .all(|&x| x == i as u8 + 1));
    }
}

/// Complete one 512-byte write through `q`, returning whether an interrupt is wanted.
fn one_write(b: &mut Block, h: &mut QueueHarness, q: &mut Queue) -> bool {
    header(h, 0x10000, T_OUT, 0);
    h.add_chain(&[(0x10000, 16, 0), (0x11000, 512, 0), (0x12000, 1, WRITE)]);
    let irq = b.process(Wake::Queue(0), std::slice::from_mut(q), &h.mem);
    assert_eq!(status(h, 0x12000), S_OK);
    irq
}

#[test]
fn a_polling_driver_is_not_interrupted_and_need_not_notify() {
    let (_t, file) = disk(64);
    let mut b = active(file);
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    let (avail, used) = (GuestAddress(0x3000), GuestAddress(0x5000));
    // Without EVENT_IDX: the driver's NO_INTERRUPT flag is honoured.
    assert!(
        one_write(&mut b, &mut h, &mut q),
        "interrupt wanted by default"
    );
    h.mem.write_obj(1u16, avail).unwrap();
    assert!(!one_write(&mut b, &mut h, &mut q), "NO_INTERRUPT ignored");
    // The device leaves notifications off for its transport, which polls a while and then
    // turns them back on.
    assert_eq!(
        h.mem.read_obj::<u16>(used).unwrap(),
        1,
        "NO_NOTIFY while busy"
    );
    assert!(!q.enable_notification(&h.mem).unwrap());
    assert_eq!(h.mem.read_obj::<u16>(used).unwrap(), 0);
    // With EVENT_IDX (a fresh queue, as the transport sets it at DRIVER_OK): used_event
    // decides; the flags no longer count.
    let mut h = QueueHarness::new(16);
    let mut q: Queue = h.queue();
    q.set_event_idx(true);
    h.mem.write_obj(1u16, avail).unwrap();
    let used_event = GuestAddress(0x3000 + 4 + 2 * 16);
    h.mem.write_obj(0u16, used_event).unwrap();
    assert!(
        one_write(&mut b, &mut h, &mut q),
        "used_event reached: interrupt"
    );
    let behind = h.used_idx().wrapping_sub(1);
    h.mem.write_obj(behind, used_event).unwrap();
    assert!(
        !one_write(&mut b, &mut h, &mut q),
        "used_event behind: no interrupt"
    );
    assert!(b.avail_features() & crate::virtio::VIRTIO_RING_F_EVENT_IDX != 0);
}

/// With several queues the device offers VIRTIO_BLK_F_MQ and says how many in its config;
/// requests on any ready queue are served, and a queue the driver left unset is skipped.
#[test]
fn several_queues_are_offered_and_each_is_served() {
    let (_t, file) = disk(64);
    let one = Block::new(file.try_clone().unwrap(), false, "d").unwrap();
    assert_eq!(one.avail_features() & F_MQ, 0, "one queue: no F_MQ");
    assert_eq!(one.queue_max_sizes().len(), 1);
    let mut b = Block::new(file, false, "d").unwrap().with_queues(4);
    assert_ne!(b.avail_features() & F_MQ, 0);
    assert_eq!(b.queue_max_sizes(), vec![QUEUE_SIZE; 4]);
    let mut n = [0u8; 2];
    b.read_config(34, &mut n);
    assert_eq!(u16::from_le_bytes(n), 4, "num_queues");
    assert_eq!(
        Block::new(disk(8).1, false, "d")
            .unwrap()
            .with_queues(99)
            .queues(),
        MAX_QUEUES
    );
    b.activate(b.avail_features() | crate::virtio::VIRTIO_F_VERSION_1);
    let mut h = QueueHarness::new(16);
    // Queue 0 is never set up; queue 2 is the harness's.
    let mut queues = [
        Queue::new(QUEUE_SIZE).unwrap(),
        Queue::new(QUEUE_SIZE).unwrap(),
        h.queue(),
        Queue::new(QUEUE_SIZE).unwrap(),
    ];
    header(&h, 0x10000, T_OUT, 5);
    h.mem
        .write_slice(&[0xcd; 512], GuestAddress(0x11000))
        .unwrap();
    h.add_chain(&[(0x10000, 16, 0), (0x11000, 512, 0), (0x12000, 1, WRITE)]);
    b.process(Wake::Queue(2), &mut queues, &h.mem);
    assert_eq!(status(&h, 0x12000), S_OK);
    assert_eq!(&b.file_bytes()[5 * 512..6 * 512], &[0xcd; 512][..]);
    // The saved state carries the count; state saved before multiqueue reads as one queue.
    let s = b.save().unwrap();
    assert_eq!(s.queues, 4);
    let mut v = serde_json::to_value(&s).unwrap();
    v.as_object_mut().unwrap().remove("queues");
    let old: BlockState = serde_json::from_value(v).unwrap();
    assert_eq!(old.queues, 1);
}
