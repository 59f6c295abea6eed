//! virtio-net against a datagram socket pair standing in for the tap's file descriptor.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_util::{QueueHarness, WRITE};

fn pair() -> (File, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    (File::from(OwnedFd::from(a)), b)
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

fn card() -> (Net, UnixDatagram) {
    let (a, b) = pair();
    let mut n = Net::new(Tap::plain(a), MAC);
    n.activate(n.avail_features() | crate::virtio::VIRTIO_F_VERSION_1);
    (n, b)
}

/// A card on a "tap" with a virtio-net header; the offloads it set go to the list.
fn vnet_card(features: u64) -> (Net, UnixDatagram, Arc<Mutex<Vec<u32>>>) {
    let (a, b) = pair();
    let set = Arc::new(Mutex::new(Vec::new()));
    let seen = set.clone();
    let tap = Tap {
        file: a,
        offload: Some(Box::new(move |f| {
            seen.lock().unwrap().push(f);
            Ok(())
        })),
    };
    let mut n = Net::new(tap, MAC);
    n.activate(features | crate::virtio::VIRTIO_F_VERSION_1);
    (n, b, set)
}

fn two(h: &QueueHarness) -> [Queue; 2] {
    [h.queue(), h.queue()]
}

#[test]
fn transmit_strips_the_header() {
    let (mut n, wire) = card();
    let mut h = QueueHarness::new(16);
    h.mem
        .write_slice(&[0u8; HDR_LEN], GuestAddress(0x10000))
        .unwrap();
    h.mem
        .write_slice(b"hello, ethernet", GuestAddress(0x11000))
        .unwrap();
    h.add_chain(&[(0x10000, HDR_LEN as u32, 0), (0x11000, 15, 0)]);
    // A chain too short to hold a header is dropped.
    h.add_chain(&[(0x12000, 5, 0)]);
    let mut qs = two(&h);
    n.process(Wake::Queue(TX), &mut qs, &h.mem);
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
    let mut qs = two(&h);
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
    assert_eq!(
        got[..HDR_LEN],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "num_buffers 1"
    );
    assert_eq!(&got[HDR_LEN..], b"frame-1");
    // A buffer smaller than the frame, without mergeable buffers: dropped, buffer returned
    // empty.
    n.activate(crate::virtio::VIRTIO_F_VERSION_1);
    wire.send(&[7u8; 100]).unwrap();
    h.add_chain(&[(0x21000, 50, WRITE)]);
    n.process(Wake::Backend, &mut qs, &h.mem);
    assert_eq!(n.counters.rx_dropped, 1);
    assert_eq!(h.used_len(1), 0);
}

#[test]
fn a_frame_spans_mergeable_buffers_and_waits_for_enough_of_them() {
    let (mut n, wire) = card();
    assert!(n.mergeable());
    let mut h = QueueHarness::new(16);
    let mut qs = two(&h);
    let frame: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    wire.send(&frame).unwrap();
    // Two 1 KiB buffers are not enough for 12 + 3000 bytes: nothing is taken.
    h.add_chain(&[(0x20000, 1024, WRITE)]);
    h.add_chain(&[(0x21000, 1024, WRITE)]);
    assert!(!n.process(Wake::Backend, &mut qs, &h.mem));
    assert_eq!(h.used_idx(), 0);
    // A third: the frame goes into all three, num_buffers 3.
    h.add_chain(&[(0x22000, 1024, WRITE)]);
    assert!(n.process(Wake::Queue(RX), &mut qs, &h.mem) || h.used_idx() == 3);
    assert_eq!(h.used_idx(), 3);
    assert_eq!(
        (h.used_len(0), h.used_len(1), h.used_len(2)),
        (1024, 1024, 3012 - 2048)
    );
    let mut got = vec![0u8; 3072];
    for (k, at) in [0x20000u64, 0x21000, 0x22000].into_iter().enumerate() {
        h.mem
            .read_slice(&mut got[k * 1024..(k + 1) * 1024], GuestAddress(at))
            .unwrap();
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[HDR_LEN..HDR_LEN + 3000], &frame[..]);
    assert_eq!((n.counters.rx_frames, n.counters.rx_merged), (1, 2));
}

#[test]
fn with_a_header_on_the_tap_offloads_pass_both_ways() {
    let all = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_HOST_TSO4 | F_MRG_RXBUF;
    let (mut n, wire, set) = vnet_card(all);
    assert_ne!(n.avail_features() & F_HOST_TSO6, 0);
    // The tap was told what the driver takes: checksums and TCPv4 segments, not v6.
    assert_eq!(*set.lock().unwrap(), vec![TUN_F_CSUM | TUN_F_TSO4]);
    let mut h = QueueHarness::new(16);
    let mut qs = two(&h);
    // Transmit: the guest's header (NEEDS_CSUM, GSO TCPv4, hdr_len 54, gso_size 1448,
    // csum_start 34, csum_offset 16) goes to the tap as it is, before the frame.
    let hdr = [1u8, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
    h.mem.write_slice(&hdr, GuestAddress(0x10000)).unwrap();
    h.mem
        .write_slice(&[9u8; 3000], GuestAddress(0x11000))
        .unwrap();
    h.add_chain(&[(0x10000, HDR_LEN as u32, 0), (0x11000, 3000, 0)]);
    n.process(Wake::Queue(TX), &mut qs, &h.mem);
    let mut buf = vec![0u8; 4096];
    let k = wire.recv(&mut buf).unwrap();
    assert_eq!(k, HDR_LEN + 3000);
    assert_eq!(buf[..HDR_LEN], hdr);
    // Receive (on rings of its own): the host's header reaches the guest as it came
    // (DATA_VALID here), with num_buffers set by the card over whatever the tap left there.
    let mut h = QueueHarness::new(16);
    let mut qs = two(&h);
    let mut from_host = vec![2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee];
    from_host.extend_from_slice(b"segment");
    wire.send(&from_host).unwrap();
    h.add_chain(&[(0x20000, 2048, WRITE)]);
    n.process(Wake::Backend, &mut qs, &h.mem);
    let mut got = [0u8; HDR_LEN + 7];
    h.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert_eq!(got[..HDR_LEN], [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(&got[HDR_LEN..], b"segment");
    // The MAC announcement goes with an empty header.
    n.inject_tx(b"rarp").unwrap();
    let k = wire.recv(&mut buf).unwrap();
    assert_eq!(&buf[..k], &[&[0u8; HDR_LEN][..], b"rarp"].concat()[..]);
    // A reset takes every offload back.
    n.reset();
    assert_eq!(set.lock().unwrap().last(), Some(&0));
}

#[test]
fn offloads_follow_the_driver_and_come_back_on_restore() {
    assert_eq!(
        tap_offloads(F_GUEST_TSO4),
        0,
        "segments only with partial checksums"
    );
    assert_eq!(
        tap_offloads(F_GUEST_CSUM | F_GUEST_TSO6),
        TUN_F_CSUM | TUN_F_TSO6
    );
    let (n, _wire, _) = vnet_card(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6);
    let s = n.save().unwrap();
    let (file, _w) = pair();
    let set = Arc::new(Mutex::new(Vec::new()));
    let seen = set.clone();
    let tap = Tap {
        file,
        offload: Some(Box::new(move |f| {
            seen.lock().unwrap().push(f);
            Ok(())
        })),
    };
    let m = Net::restore(tap, &s).unwrap();
    assert_eq!(m.acked_features, s.acked_features);
    assert_eq!(
        *set.lock().unwrap(),
        vec![TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6]
    );
    // On a plain tap nothing is offered beyond merged buffers and EVENT_IDX.
    let (plain, _) = card();
    assert_eq!(
        plain.avail_features(),
        F_MAC | F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX
    );
}

#[test]
fn with_event_idx_the_card_keeps_avail_event_current() {
    let (mut n, wire) = card();
    let mut h = QueueHarness::new(16);
    let mut qs = two(&h);
    for q in qs.iter_mut() {
        q.set_event_idx(true);
    }
    for k in 0..3u64 {
        h.add_chain(&[(0x10000 + k * 0x100, 64, 0)]);
    }
    n.process(Wake::Queue(TX), &mut qs, &h.mem);
    assert_eq!(n.counters.tx_frames, 3);
    // The driver is asked to notify once it passes index 3 (the next one it adds).
    assert_eq!(h.avail_event(), 3);
    let mut buf = [0u8; 128];
    for _ in 0..3 {
        assert_eq!(wire.recv(&mut buf).unwrap(), 64 - HDR_LEN);
    }
}

#[test]
fn mac_is_in_config_space_and_state() {
    let (n, _w) = card();
    let mut mac = [0u8; 6];
    n.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    let s = n.save().unwrap();
    assert_eq!(s.mac, mac);
}
