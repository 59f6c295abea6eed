//! memcpy & co. for the freestanding guest. Written with string
//! instructions so the compiler cannot lower them back into calls to
//! themselves.

use core::arch::asm;

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees both ranges are valid and do not overlap; DF is clear.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // Forward copy is safe (dst before src, or no overlap).
        // SAFETY: ranges valid per caller; forward copy never reads a byte already overwritten.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
                 options(nostack, preserves_flags));
        }
    } else {
        // SAFETY: overlapping with dst above src: copy backwards, restore DF.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _,
                 inout("rdi") dst.wrapping_add(n).wrapping_sub(1) => _,
                 inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
                 options(nostack));
        }
    }
    dst
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees the range is valid; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let pa: *const u8;
    let pb: *const u8;
    // SAFETY: caller guarantees both ranges are valid. repe cmpsb stops after the
    // first differing byte (or after n bytes); rsi/rdi then point one past it.
    unsafe {
        asm!("repe cmpsb", inout("rcx") n => _, inout("rsi") a => pa, inout("rdi") b => pb,
             options(nostack, readonly));
    }
    // SAFETY: pa/pb are one past the last compared byte, which is inside the ranges.
    let (x, y) = unsafe { (*pa.sub(1), *pb.sub(1)) };
    x as i32 - y as i32
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
