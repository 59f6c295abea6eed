//! The save/restore trait.
//!
//! Every stateful piece of a VM (vCPU, interrupt controller, timer, device) implements
//! [`Persist`]. Neither method has a default body, so a device that forgets its state does
//! not compile. States are plain serde types: tolerant of added fields (`#[serde(default)]`)
//! so that a newer ferry reads an older ferry's state.

/// Save a piece of VM state and rebuild it from that state.
pub trait Persist: Sized {
    /// The serialisable state.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What `restore` needs besides the state (file descriptors, guest memory, ...).
    type ConstructorArgs;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Capture the complete state. The owner must have quiesced the piece first (paused vCPUs).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Build the piece again from a saved state.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
