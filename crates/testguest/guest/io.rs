//! Port I/O, TSC, serial console and power control (all usable from ring 3
//! because the guest runs with IOPL=3).

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;

#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; IOPL=3 permits it.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn outw(port: u16, val: u16) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time stamp counter (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is always available on x86-64.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Minimal 16550 setup: 8N1, 115200, no interrupts, FIFOs on.
pub fn uart_init(base: u16) {
    outb(base + 1, 0x00); // IER: no interrupts
    outb(base + 3, 0x80); // DLAB
    outb(base, 0x01); // divisor 1 = 115200
    outb(base + 1, 0x00);
    outb(base + 3, 0x03); // 8N1
    outb(base + 2, 0xC7); // FIFO enable + clear
    outb(base + 4, 0x03); // DTR | RTS
}

/// Set once a UART's THRE never came up, so we stop waiting for it.
static THRE_BROKEN: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

#[inline]
pub fn uart_putb(base: u16, b: u8) {
    // Poll THRE (LSR bit 5) before each byte; give up after a while (and
    // for good) so a broken UART model cannot hang the guest.
    let broken = &THRE_BROKEN[(base == COM2) as usize];
    if !broken.load(Ordering::Relaxed) {
        let mut n = 0u32;
        while inb(base + 5) & 0x20 == 0 {
            n += 1;
            if n > 2000 {
                broken.store(true, Ordering::Relaxed);
                break;
            }
            pause();
        }
    }
    outb(base, b);
}

/// Returns a received byte if LSR says data is ready.
pub fn uart_getb(base: u16) -> Option<u8> {
    let lsr = inb(base + 5);
    if lsr != 0xff && lsr & 1 != 0 {
        Some(inb(base))
    } else {
        None
    }
}

/// A `core::fmt::Write` sink for a UART.
pub struct Uart(pub u16);

impl core::fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            uart_putb(self.0, b);
        }
        Ok(())
    }
}

/// ACPI PM1a (ferry, QEMU pc/q35), old QEMU/Bochs port, then i8042 reset.
pub fn poweroff() -> ! {
    outw(0x604, 0x2000);
    outw(0xB004, 0x2000);
    outb(0x64, 0xFE);
    loop {
        pause();
    }
}

pub fn reset() -> ! {
    outb(0x64, 0xFE);
    loop {
        pause();
    }
}
