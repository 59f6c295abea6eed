//! virtio-net against a datagram socket pair standing in for the tap's file descriptor.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_util::{QueueHarness, WRITE};

fn card() -> (Net, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut n = Net::new(File::from(OwnedFd::from(a)), [0x52, 0x54, 0, 1, 2, 3]);
    n.activate(n.avail_features() | crate::virtio::VIRTIO_F_VERSION_1);
    (n, b)
}

#[test]
fn transmit_strips_the_header() {
    let (mut n, wire) = card();
    let mut h = QueueHarness::new(16);
    let mut rx: Queue = h.queue();
    let mut tx: Queue = h.queue();
    h.mem
        .write_slice(&[0u8; HDR_LEN], GuestAddress(0x10000))
        .unwrap();
    h.mem
        .write_slice(b"hello, ethernet", GuestAddress(0x11000))
        .unwrap();
    h.add_chain(&[(0x10000, HDR_LEN as u32, 0), (0x11000, 15, 0)]);
    // A chain too short to hold a header is dropped.
    h.add_chain(&[(0x12000, 5, 0)]);
    let mut qs = [rx, tx];
    n.process(Wake::Queue(TX), &mut qs, &h.mem);
    [rx, tx] = qs;
    let _ = (&mut rx, &mut tx);
    let mut buf = [0u8; 64];
    let k = wire.recv(&mut buf).unwrap();
    assert_eq!(&buf[..k], b"hello, ethernet");
    assert_eq!(n.counters.tx_frames, 1);
    assert_eq!(n.counters.tx_dropped, 1);
    assert_eq!(h.used_idx(), 2);
}

#[test]
fn receive_waits_for_buffers_then_delivers() {
    let (mut n, wire) = card();
    let mut h = QueueHarness::new(16);
    let mut qs = [h.queue(), h.queue()];
    wire.send(b"frame-1").unwrap();
    // No receive buffer yet: the frame waits.
    assert!(!n.process(Wake::Backend, &mut qs, &h.mem));
    assert_eq!(n.counters.rx_frames, 0);
    h.add_chain(&[(0x20000, 2048, WRITE)]);
    n.process(Wake::Queue(RX), &mut qs, &h.mem);
    assert_eq!(n.counters.rx_frames, 1);
    assert_eq!(h.used_len(0), (HDR_LEN + 7) as u32);
    let mut got = [0u8; HDR_LEN + 7];
    h.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert_eq!(got[10], 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], b"frame-1");
    // A buffer smaller than the frame: dropped, buffer returned empty.
    wire.send(&[7u8; 100]).unwrap();
    h.add_chain(&[(0x21000, 50, WRITE)]);
    n.process(Wake::Backend, &mut qs, &h.mem);
    assert_eq!(n.counters.rx_dropped, 1);
    assert_eq!(h.used_len(1), 0);
}

#[test]
fn mac_is_in_config_space_and_state() {
    let (n, _w) = card();
    let mut mac = [0u8; 6];
    n.read_config(0, &mut mac);
    assert_eq!(mac, [0x52, 0x54, 0, 1, 2, 3]);
    let s = n.save().unwrap();
    assert_eq!(s.mac, mac);
}
