//! ferry's virtual machine monitor: one process per VM.
//!
//! - [`vm`]: the VM and its control loop (pause, resume, snapshot, API);
//! - [`vcpu`]: vCPU state and threads; [`cpuid`]: what a vCPU is told about its CPU;
//! - [`memory`]: guest RAM, KVM slots, dirty-page tracking; [`layout`]: the physical map;
//! - [`boot`]: kernel loading (PVH, Multiboot, bzImage);
//! - [`kvm_vm`]: in-kernel irqchip, PIT and clock; [`devices`], [`bus`], [`serial_backend`];
//! - [`snapshot`]: the on-disk snapshot; [`api_server`]: the control socket.

pub mod acpi;
pub mod api_server;
pub mod boot;
pub mod bus;
pub mod cpu_features;
pub mod cpuid;
pub mod devices;
pub mod elf;
pub mod event;
pub mod fail;
pub mod host_io;
pub mod kvm_vm;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod mirror;
pub mod nbd_disk;
pub mod serial_backend;
pub mod snapshot;
pub mod uffd;
pub mod uring_disk;
pub mod vcpu;
pub mod vm;

pub use vm::{error_chain, host_cpu_features, RestoreOverrides, RunOptions, Vm, VmError, VmExit};
