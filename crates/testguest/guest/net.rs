//! virtio-net polling driver and a smoltcp TCP server: echo (port 7),
//! counter stream (port 19), discard (port 9); ICMP echo is answered by
//! smoltcp itself.

use crate::io::{rdtsc, Uart, COM1};
use crate::virtio::{Arena, Mmio, Virtq, DESC_F_WRITE, F_VERSION_1};
use core::fmt::Write;
use core::marker::PhantomData;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr flags: the checksum from csum_start on is to be finished (sent), or was
/// left so (received); the host already checked it.
const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_F_DATA_VALID: u8 = 2;

/// virtio_net_hdr_v1 (VERSION_1 always has num_buffers).
const HDR: usize = 12;
const BUF: u64 = 2048;
const QSIZE: u16 = 128;
/// Frames handed to smoltcp per poll (bounded work per main-loop pass).
const RX_BUDGET: u32 = 64;

const N_ECHO: usize = 4;
const N_STREAM: usize = 2;
const N_SOCKETS: usize = N_ECHO + N_STREAM + 1;
const SOCK_BUF: u64 = 64 * 1024;

pub struct Rx {
    q: Virtq,
    base: u64,
    frames: u64,
    budget: u32,
}

pub struct Tx {
    q: Virtq,
    base: u64,
    free: [u16; QSIZE as usize],
    nfree: usize,
    frames: u64,
    drops: u64,
    scratch: u64,
}

impl Tx {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            if (id as usize) < self.q.size as usize && self.nfree < self.free.len() {
                self.free[self.nfree] = id;
                self.nfree += 1;
            }
        }
    }
}

pub struct Dev {
    rx: Rx,
    tx: Tx,
    /// Checksum offload negotiated (CSUM and GUEST_CSUM): TCP checksums are the host's to
    /// finish on transmit, and on receive to check (or already checked: DATA_VALID).
    csum: bool,
}

/// One's-complement sum of `data` (big-endian 16-bit words) added to `sum`, unfolded.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut c = data.chunks_exact(2);
    for w in &mut c {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = c.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 TCP segment of an Ethernet frame: (offset of the TCP header, the IPv4 header's
/// pseudo-header sum for it, unfolded); `None` for anything else.
fn tcp4(frame: &[u8]) -> Option<(usize, u32)> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 || frame[23] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp = 14 + ihl;
    if ihl < 20 || total < ihl + 20 || frame.len() < 14 + total {
        return None;
    }
    let len = (total - ihl) as u32;
    Some((tcp, csum_add(6 + len, &frame[26..34])))
}

/// Transmit with checksum offload: put the pseudo-header sum in the TCP checksum field and ask
/// the host to finish it from the TCP header on (as Linux's CHECKSUM_PARTIAL does).
fn offload_tx_csum(hdr: &mut [u8], frame: &mut [u8]) {
    let Some((tcp, pseudo)) = tcp4(frame) else {
        return;
    };
    frame[tcp + 16..tcp + 18].copy_from_slice(&csum_fold(pseudo).to_be_bytes());
    hdr[0] = HDR_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&(tcp as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
}

/// Receive with checksum offload: a TCP segment the host neither checked nor left to finish is
/// checked here (smoltcp checks none then).
fn rx_csum_ok(hdr: &[u8], frame: &[u8]) -> bool {
    if hdr[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
        return true;
    }
    let Some((tcp, pseudo)) = tcp4(frame) else {
        return true;
    };
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    csum_fold(csum_add(pseudo, &frame[tcp..14 + total])) == 0xffff
}

pub struct RxToken<'a> {
    rx: *mut Rx,
    id: u16,
    len: usize,
    _p: PhantomData<&'a mut Dev>,
}

pub struct TxToken<'a> {
    tx: *mut Tx,
    csum: bool,
    _p: PhantomData<&'a mut Dev>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the token borrows the device mutably ('a); it only touches
        // the Rx half (the TxToken only the Tx half).
        let rx = unsafe { &mut *self.rx };
        let addr = rx.base + self.id as u64 * BUF + HDR as u64;
        // SAFETY: the buffer is in the used ring, so the device is done with
        // it until we make it available again below.
        let frame = unsafe { core::slice::from_raw_parts(addr as *const u8, self.len) };
        let r = f(frame);
        rx.frames += 1;
        rx.q.push(self.id);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // SAFETY: see RxToken::consume.
        let tx = unsafe { &mut *self.tx };
        tx.reclaim();
        if tx.nfree == 0 || len > (BUF as usize - HDR) {
            tx.drops += 1;
            // SAFETY: scratch is a BUF-sized arena buffer used only here.
            let b = unsafe {
                core::slice::from_raw_parts_mut(tx.scratch as *mut u8, len.min(BUF as usize))
            };
            return f(b);
        }
        tx.nfree -= 1;
        let id = tx.free[tx.nfree];
        let addr = tx.base + id as u64 * BUF;
        // SAFETY: descriptor `id` was free, so its buffer is ours.
        let b = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, HDR + len) };
        b[..HDR].fill(0);
        let r = f(&mut b[HDR..]);
        if self.csum {
            let (hdr, frame) = b.split_at_mut(HDR);
            offload_tx_csum(hdr, frame);
        }
        tx.q.set_desc(id, addr, (HDR + len) as u32, 0, 0);
        tx.q.push(id);
        tx.frames += 1;
        r
    }
}

impl phy::Device for Dev {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _ts: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.rx.budget == 0 {
            return None;
        }
        let (id, len) = loop {
            let (id, len) = self.rx.q.pop_used()?;
            if (id as u64) < self.rx.q.size as u64 && len as usize > HDR {
                let len = (len as usize - HDR).min(BUF as usize - HDR);
                let at = self.rx.base + id as u64 * BUF;
                // SAFETY: the buffer is in the used ring: the device is done with it.
                let b = unsafe { core::slice::from_raw_parts(at as *const u8, HDR + len) };
                if !self.csum || rx_csum_ok(&b[..HDR], &b[HDR..]) {
                    break (id, len);
                }
            }
            if (id as u64) < self.rx.q.size as u64 {
                self.rx.q.push(id); // runt or bad checksum: recycle
            }
        };
        self.rx.budget -= 1;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len,
                _p: PhantomData,
            },
            TxToken {
                tx: &mut self.tx,
                csum: self.csum,
                _p: PhantomData,
            },
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            csum: self.csum,
            _p: PhantomData,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        if self.csum {
            c.checksum.tcp = phy::Checksum::None;
        }
        c
    }
}

pub struct Net {
    dev: Dev,
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: [SocketHandle; N_ECHO],
    stream: [(SocketHandle, u64); N_STREAM],
    discard: SocketHandle,
    pub accepted: u64,
    was_active: [bool; N_SOCKETS],
}

#[derive(Clone, Copy)]
pub struct IpConf {
    pub addr: [u8; 4],
    pub prefix: u8,
    pub gw: Option<[u8; 4]>,
}

fn tcp_socket(arena: &mut Arena, rx: u64, tx: u64) -> Option<tcp::Socket<'static>> {
    let r = arena.alloc(rx, 4096)?;
    let t = arena.alloc(tx, 4096)?;
    // SAFETY: fresh, zeroed arena memory owned by this socket forever.
    let (r, t) = unsafe {
        (
            core::slice::from_raw_parts_mut(r as *mut u8, rx as usize),
            core::slice::from_raw_parts_mut(t as *mut u8, tx as usize),
        )
    };
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(r), tcp::SocketBuffer::new(t));
    s.set_nagle_enabled(false);
    Some(s)
}

/// Fills `buf` with the byte stream of u64 LE counters starting at byte
/// offset `pos` of the stream.
fn fill_stream(buf: &mut [u8], pos: u64) {
    let mut i = 0;
    let mut p = pos;
    while i < buf.len() && !p.is_multiple_of(8) {
        buf[i] = ((p / 8) >> ((p % 8) * 8)) as u8;
        i += 1;
        p += 1;
    }
    while i + 8 <= buf.len() {
        buf[i..i + 8].copy_from_slice(&(p / 8).to_le_bytes());
        i += 8;
        p += 8;
    }
    while i < buf.len() {
        buf[i] = ((p / 8) >> ((p % 8) * 8)) as u8;
        i += 1;
        p += 1;
    }
}

impl Net {
    /// Brings up the device and the stack; the result lives in the arena.
    pub fn new(
        mmio: Mmio,
        arena: &mut Arena,
        ip: IpConf,
        now_ms: u64,
    ) -> Result<&'static mut Net, &'static str> {
        let (_, acc) = mmio.negotiate(F_VERSION_1 | F_MAC | F_CSUM | F_GUEST_CSUM)?;
        let (Some(rxq), Some(txq)) = (
            Virtq::new(mmio, 0, QSIZE, arena),
            Virtq::new(mmio, 1, QSIZE, arena),
        ) else {
            mmio.fail();
            return Err("queue");
        };
        let (Some(rxb), Some(txb), Some(scratch)) = (
            arena.alloc(BUF * rxq.size as u64, 4096),
            arena.alloc(BUF * txq.size as u64, 4096),
            arena.alloc(BUF, 4096),
        ) else {
            mmio.fail();
            return Err("no-memory");
        };
        let mut mac = [0x02, 0x00, 0x00, 0xfe, 0xee, 0x01];
        if acc & F_MAC != 0 {
            for (i, m) in mac.iter_mut().enumerate() {
                *m = mmio.cfg8(i as u64);
            }
        }
        let mut rx = Rx {
            q: rxq,
            base: rxb,
            frames: 0,
            budget: RX_BUDGET,
        };
        for i in 0..rx.q.size {
            rx.q.set_desc(i, rxb + i as u64 * BUF, BUF as u32, DESC_F_WRITE, 0);
            rx.q.push(i);
        }
        let mut tx = Tx {
            q: txq,
            base: txb,
            free: [0; QSIZE as usize],
            nfree: 0,
            frames: 0,
            drops: 0,
            scratch,
        };
        for i in 0..tx.q.size {
            tx.free[tx.nfree] = i;
            tx.nfree += 1;
        }
        mmio.driver_ok();
        rx.q.kick();
        let both = F_CSUM | F_GUEST_CSUM;
        let mut dev = Dev {
            rx,
            tx,
            csum: acc & both == both,
        };

        let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        cfg.random_seed = rdtsc();
        let now = Instant::from_millis(now_ms as i64);
        let mut iface = Interface::new(cfg, &mut dev, now);
        let [a, b, c, d] = ip.addr;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), ip.prefix));
        });
        if let Some([a, b, c, d]) = ip.gw {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        }

        let storage = arena
            .alloc(
                (N_SOCKETS * core::mem::size_of::<SocketStorage>()) as u64,
                64,
            )
            .ok_or("no-memory")? as *mut SocketStorage<'static>;
        // SAFETY: fresh arena memory, sized and aligned for N_SOCKETS
        // entries; each is initialised before the slice is formed.
        let storage = unsafe {
            for i in 0..N_SOCKETS {
                storage.add(i).write(SocketStorage::EMPTY);
            }
            core::slice::from_raw_parts_mut(storage, N_SOCKETS)
        };
        let mut sockets = SocketSet::new(storage);
        let mut add = |rxs: u64, txs: u64| -> Result<SocketHandle, &'static str> {
            let s = tcp_socket(arena, rxs, txs).ok_or("no-memory")?;
            Ok(sockets.add(s))
        };
        let mut echo = [SocketHandle::default(); N_ECHO];
        for e in echo.iter_mut() {
            *e = add(SOCK_BUF, SOCK_BUF)?;
        }
        let mut stream = [(SocketHandle::default(), 0); N_STREAM];
        for s in stream.iter_mut() {
            s.0 = add(4096, SOCK_BUF)?;
        }
        let discard = add(SOCK_BUF, 4096)?;

        let p = arena
            .alloc(core::mem::size_of::<Net>() as u64, 64)
            .ok_or("no-memory")? as *mut Net;
        // SAFETY: fresh arena memory sized and aligned for a Net, never
        // freed, so handing out a 'static reference is sound.
        let net = unsafe {
            p.write(Net {
                dev,
                iface,
                sockets,
                echo,
                stream,
                discard,
                accepted: 0,
                was_active: [false; N_SOCKETS],
            });
            &mut *p
        };
        let _ = writeln!(
            Uart(COM1),
            "NET up mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}.{}.{}.{}/{} csum={}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            a,
            b,
            c,
            d,
            ip.prefix,
            if net.dev.csum { "offload" } else { "guest" }
        );
        Ok(net)
    }

    pub fn rx_frames(&self) -> u64 {
        self.dev.rx.frames
    }
    pub fn tx_frames(&self) -> u64 {
        self.dev.tx.frames
    }

    /// Connections currently open (neither listening nor closed).
    pub fn conns(&mut self) -> u64 {
        let mut n = 0;
        let handles = self.echo.iter().chain(self.stream.iter().map(|(h, _)| h));
        for &h in handles.chain(core::iter::once(&self.discard)) {
            let t = self.sockets.get::<tcp::Socket>(h);
            if !matches!(
                t.state(),
                tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait
            ) {
                n += 1;
            }
        }
        n
    }

    fn apps(&mut self) {
        let mut tmp = [0u8; 4096];
        let mut k = 0;
        for &h in self.echo.iter() {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            self.accepted += track(&mut self.was_active[k], s);
            k += 1;
            if !s.is_open() {
                let _ = s.listen(7);
                continue;
            }
            while s.can_recv() && s.can_send() {
                let space = (s.send_capacity() - s.send_queue()).min(tmp.len());
                let n = s.recv_slice(&mut tmp[..space]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let _ = s.send_slice(&tmp[..n]);
            }
            if !s.may_recv() && s.state() == tcp::State::CloseWait && s.recv_queue() == 0 {
                s.close();
            }
        }
        for (h, pos) in self.stream.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            self.accepted += track(&mut self.was_active[k], s);
            k += 1;
            if !s.is_open() {
                let _ = s.listen(19);
                *pos = 0;
                continue;
            }
            if matches!(s.state(), tcp::State::Listen | tcp::State::SynReceived) {
                *pos = 0;
            }
            while s.can_recv() {
                if s.recv(|b| (b.len(), ())).is_err() {
                    break;
                }
            }
            if s.state() == tcp::State::CloseWait {
                s.close();
            } else {
                // The free space may wrap around the ring: up to two chunks.
                for _ in 0..2 {
                    if !s.can_send() {
                        break;
                    }
                    let p = *pos;
                    match s.send(|b| {
                        fill_stream(b, p);
                        (b.len(), b.len())
                    }) {
                        Ok(n) if n > 0 => *pos += n as u64,
                        _ => break,
                    }
                }
            }
        }
        let s = self.sockets.get_mut::<tcp::Socket>(self.discard);
        self.accepted += track(&mut self.was_active[k], s);
        if !s.is_open() {
            let _ = s.listen(9);
        } else {
            while s.can_recv() {
                if s.recv(|b| (b.len(), ())).is_err() {
                    break;
                }
            }
            if s.state() == tcp::State::CloseWait {
                s.close();
            }
        }
    }

    /// One bounded round of network work.
    pub fn poll(&mut self, now_ms: u64) {
        let now = Instant::from_millis(now_ms as i64);
        self.dev.rx.budget = RX_BUDGET;
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.apps();
        self.dev.rx.budget = 0;
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.dev.rx.q.kick();
        self.dev.tx.q.kick();
    }
}

/// Counts a newly established connection once.
fn track(was: &mut bool, s: &tcp::Socket) -> u64 {
    let active = s.state() == tcp::State::Established || s.state() == tcp::State::CloseWait;
    let new = active && !*was;
    if active {
        *was = true;
    } else if !s.is_open() || s.state() == tcp::State::Listen {
        *was = false;
    }
    new as u64
}
