//! ferry's emulated devices. Each device lives in its own folder with its saved state in
//! `persist.rs`. This crate has no `unsafe`.
#![forbid(unsafe_code)]

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{PioDevice, VmAction};
