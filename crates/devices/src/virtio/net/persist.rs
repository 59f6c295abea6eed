//! Saved virtio-net state. The tap is host plumbing, reopened on restore (and told again which
//! offloads the driver takes); a frame that was waiting for a receive buffer is dropped (TCP
//! resends it).

use ferry_migration::Persist;
use serde::{Deserialize, Serialize};

use super::{Net, Tap};

/// What a network card must carry besides its transport and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub acked_features: u64,
}

impl Persist for Net {
    type State = NetState;
    /// The reopened tap.
    type ConstructorArgs = Tap;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<NetState, Self::Error> {
        Ok(NetState {
            mac: self.mac,
            acked_features: self.acked_features,
        })
    }

    fn restore(tap: Tap, s: &NetState) -> Result<Net, Self::Error> {
        let mut n = Net::new(tap, s.mac);
        n.acked_features = s.acked_features;
        n.apply_offloads();
        Ok(n)
    }
}
