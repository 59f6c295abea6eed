//! Live migration: the source side ([`send`]) runs in its own thread next to the VM's control
//! loop and asks the loop to pause, save, release disks, roll back or finish; the destination
//! side ([`receive`]) builds a VM from the stream. The wire protocol and its state machine
//! are in `ferry_migration::protocol` (no KVM there, so it is fuzzed on its own).

mod channels;
mod compress;
pub mod forecast;
pub mod postcopy;
pub mod receive;
pub mod send;
pub mod transport;

use crate::snapshot::Snapshot;

/// What the sending thread asks of the VM's control loop.
#[derive(Debug)]
pub enum MigrationCall {
    /// Slow the guest's vCPUs by this many percent (0 = not at all): auto-converge for a guest
    /// that dirties memory about as fast as the link sends it.
    Throttle(u32),
    /// Flush the disks while the guest still runs, so the flush inside the pause is short.
    SyncDisks,
    /// Stop vCPUs and devices for the switch-over.
    Pause,
    /// Save vCPU, irqchip/PIT/clock and device state (the VM is paused).
    SaveState,
    /// Flush the disks and let go of their locks, so the destination can take them.
    ReleaseDisks,
    /// The move failed and the destination certainly does not run the guest (the failure came
    /// before Commit, Commit was refused, or the outcome record says aborted): take back every
    /// disk lock let go of and let the guest run on.
    Rollback,
    /// The destination runs the guest: end this VMM.
    Finished,
}

/// The control loop's answer.
#[derive(Debug)]
pub enum CallReply {
    Done,
    State(Box<Snapshot>),
}
