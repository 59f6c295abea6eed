//! Saved state of the legacy devices.

use std::convert::Infallible;

use ferry_migration::Persist;
use serde::{Deserialize, Serialize};

use super::{PowerManagement, I8042};

/// Saved i8042 state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    #[serde(default)]
    pub last_command: u8,
}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = ();
    type Error = Infallible;

    fn save(&self) -> Result<I8042State, Infallible> {
        Ok(I8042State {
            last_command: self.last_command,
        })
    }

    fn restore(_: (), state: &I8042State) -> Result<Self, Infallible> {
        Ok(I8042 {
            last_command: state.last_command,
        })
    }
}

/// Saved PM1a state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmState {
    #[serde(default)]
    pub control: u16,
}

impl Persist for PowerManagement {
    type State = PmState;
    type ConstructorArgs = ();
    type Error = Infallible;

    fn save(&self) -> Result<PmState, Infallible> {
        Ok(PmState {
            control: self.control,
        })
    }

    fn restore(_: (), state: &PmState) -> Result<Self, Infallible> {
        Ok(PowerManagement {
            control: state.control,
        })
    }
}
