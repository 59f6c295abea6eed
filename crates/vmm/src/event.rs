//! Everything the VMM's control loop reacts to, on one channel.

use std::sync::mpsc::Sender;

use ferry_api::{Request, Response};

use crate::migration::{CallReply, MigrationCall};
use crate::vcpu::VcpuEvent;

/// An event for the control loop.
#[derive(Debug)]
pub enum Event {
    /// A vCPU stopped on its own (poweroff, reset, failure).
    Vcpu(VcpuEvent),
    /// An API request and where to send its answer (one or more lines).
    Api(Request, Sender<Response>),
    /// The migration thread needs the VM.
    Migration(MigrationCall, Sender<Result<CallReply, String>>),
    /// Something the VM cannot run without failed (post-copy lost its source): stop it.
    Fatal(String),
}
