//! Saved virtio-blk state. The image itself is not state: it is reopened by path, and its
//! size must not have changed.

use ferry_migration::Persist;
use serde::{Deserialize, Serialize};

use super::{Block, DiskBackend};

/// What a block device must carry besides its transport and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub serial: String,
    pub acked_features: u64,
    /// Request queues offered (state saved before multiqueue had one).
    #[serde(default = "one_queue")]
    pub queues: u16,
}

fn one_queue() -> u16 {
    1
}

/// Why a block device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockPersistError {
    #[error("cannot read the disk image")]
    Io(#[from] std::io::Error),
    #[error("disk image has {now} sectors, the saved VM had {saved}: it was resized or replaced")]
    Resized { saved: u64, now: u64 },
}

impl Persist for Block {
    type State = BlockState;
    /// The reopened disk.
    type ConstructorArgs = Box<dyn DiskBackend>;
    type Error = BlockPersistError;

    fn save(&self) -> Result<BlockState, BlockPersistError> {
        let end = self
            .req
            .serial
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.req.serial.len());
        Ok(BlockState {
            capacity_sectors: self.req.capacity_sectors,
            read_only: self.req.read_only,
            serial: String::from_utf8_lossy(&self.req.serial[..end]).into_owned(),
            acked_features: self.req.acked_features,
            queues: self.queues,
        })
    }

    fn restore(disk: Box<dyn DiskBackend>, s: &BlockState) -> Result<Block, BlockPersistError> {
        let mut b = Block::with_backend(disk, s.read_only, &s.serial)?.with_queues(s.queues);
        if b.req.capacity_sectors != s.capacity_sectors {
            return Err(BlockPersistError::Resized {
                saved: s.capacity_sectors,
                now: b.req.capacity_sectors,
            });
        }
        b.req.acked_features = s.acked_features;
        Ok(b)
    }
}
