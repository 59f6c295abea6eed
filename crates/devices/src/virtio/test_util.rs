//! A tiny split-virtqueue driver for device unit tests: descriptor table at 0x1000, available
//! ring at 0x3000, used ring at 0x5000, in 1 MiB of guest memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemoryMmap;

/// Descriptor flag: the device writes this buffer.
pub const WRITE: u16 = 2;
const NEXT: u16 = 1;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x5000;
const RAM: u64 = 1 << 20;

pub struct QueueHarness {
    pub mem: GuestMemoryMmap,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl QueueHarness {
    pub fn new(size: u16) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        QueueHarness {
            mem,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    pub fn ram_bytes(&self) -> u64 {
        RAM
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Make a chain of (address, length, flags) buffers available.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, u16)]) {
        let head = self.next_desc;
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            let last = k + 1 == bufs.len();
            let next = (i + 1) % self.size;
            self.write_desc(
                i,
                addr,
                len,
                flags | if last { 0 } else { NEXT },
                if last { 0 } else { next },
            );
            self.next_desc = next;
        }
        self.publish(head);
    }

    /// Make available a chain whose two descriptors point at each other.
    pub fn add_loop(&mut self, addr: u64) {
        let (a, b) = (self.next_desc, (self.next_desc + 1) % self.size);
        self.write_desc(a, addr, 16, NEXT, b);
        self.write_desc(b, addr + 16, 1, NEXT | WRITE, a);
        self.next_desc = (b + 1) % self.size;
        self.publish(a);
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The device's `avail_event` (EVENT_IDX: notify me when the driver passes this index).
    pub fn avail_event(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + 4 + u64::from(self.size) * 8))
            .unwrap()
    }

    /// The head of the chain in used ring entry `i`.
    pub fn used_id(&self, i: u16) -> u32 {
        self.mem
            .read_obj(GuestAddress(USED + 4 + u64::from(i % self.size) * 8))
            .unwrap()
    }

    pub fn used_len(&self, i: u16) -> u32 {
        self.mem
            .read_obj(GuestAddress(USED + 4 + u64::from(i % self.size) * 8 + 4))
            .unwrap()
    }
}
