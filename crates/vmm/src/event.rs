//! Everything the VMM's control loop reacts to, on one channel.

use std::sync::mpsc::Sender;

use ferry_api::{Request, Response};

use crate::vcpu::VcpuEvent;

/// An event for the control loop.
#[derive(Debug)]
pub enum Event {
    /// A vCPU stopped on its own (poweroff, reset, failure).
    Vcpu(VcpuEvent),
    /// An API request and where to send its answer.
    Api(Request, Sender<Response>),
}
