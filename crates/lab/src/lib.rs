//! Labs of ferry hosts on one machine: each host a network namespace on one Ethernet segment
//! with its own address and a bridge for its VMs, a client namespace on the same segment, and
//! (optionally) a host daemon running in every host. Tests, `ferry demo`, `ferry lab up` and
//! every `ferry bench` use this one lab.
//!
//! ```text
//!                  ns <lab>-sw: bridge "sw" (the segment)
//!      ┌──────────────┬──────────────┬──────────────┐
//!   ns <lab>-hv1   ns <lab>-hv2   ...          ns <lab>-cl
//!   br0 10.78.0.11 br0 10.78.0.12              eth0 10.78.0.2
//!   └ taps of VMs  └ taps of VMs               (the client)
//! ```
//!
//! Also here, shared by everything that drives a lab: [`Port`] (a guest serial port on a unix
//! socket, read in the background with host timestamps), [`Proc`] (a process killed by its PID
//! when dropped), [`Stream`] (the client's check of the guest's TCP counter stream) and
//! [`longest_gap`] (the guest-observed pause from heartbeat stamps).

mod lab;
mod port;
mod proc;
mod stream;

pub use lab::guest_ip;
pub use lab::{
    find, remove_stale, require_root, Lab, LabFileServer, LabHost, LabOptions, LabRecord,
    CLIENT_IP, DAEMON_PORT, LAB_SUBNET, NBD_PORT, REGISTRY, SHARE_PORT,
};
pub use port::{longest_gap, Port};
pub use proc::Proc;
pub use stream::Stream;
