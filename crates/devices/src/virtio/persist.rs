//! Saved state of a virtio-mmio device: transport registers, every queue, and the device's
//! own state.

use ferry_migration::Persist;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{GuestMemoryMmap, Interrupt, VirtioDevice};

/// One split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    #[serde(default)]
    pub event_idx: bool,
}

impl From<QueueState> for QueueSaved {
    fn from(s: QueueState) -> Self {
        QueueSaved {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl From<QueueSaved> for QueueState {
    fn from(s: QueueSaved) -> Self {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
        }
    }
}

/// Transport + queues + device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState<S> {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSaved>,
    pub device: S,
}

/// Why a virtio device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioPersistError {
    #[error("saved state is for device type {saved}, this slot holds type {now}")]
    DeviceType { saved: u32, now: u32 },
    #[error("saved state has {saved} queues, the device has {now}")]
    QueueCount { saved: usize, now: usize },
    #[error("saved queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("device state")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What restoring a virtio-mmio device needs.
pub struct MmioArgs<A> {
    pub device: A,
    pub mem: GuestMemoryMmap,
    pub interrupt: Interrupt,
    pub kick: EventFd,
}

impl<D> Persist for MmioTransport<D>
where
    D: VirtioDevice + Persist,
{
    type State = MmioState<D::State>;
    type ConstructorArgs = MmioArgs<D::ConstructorArgs>;
    type Error = MmioPersistError;

    fn save(&self) -> Result<Self::State, MmioPersistError> {
        Ok(MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSaved::from(q.state()))
                .collect(),
            device: self
                .device
                .save()
                .map_err(|e| MmioPersistError::Device(Box::new(e)))?,
        })
    }

    fn restore(args: Self::ConstructorArgs, s: &Self::State) -> Result<Self, MmioPersistError> {
        let device = D::restore(args.device, &s.device)
            .map_err(|e| MmioPersistError::Device(Box::new(e)))?;
        if device.device_type() != s.device_type {
            return Err(MmioPersistError::DeviceType {
                saved: s.device_type,
                now: device.device_type(),
            });
        }
        let mut t =
            MmioTransport::new(device, args.mem, args.interrupt, args.kick).map_err(|e| {
                MmioPersistError::Queue {
                    index: 0,
                    reason: format!("{e:?}"),
                }
            })?;
        if t.queues.len() != s.queues.len() {
            return Err(MmioPersistError::QueueCount {
                saved: s.queues.len(),
                now: t.queues.len(),
            });
        }
        for (index, (q, saved)) in t.queues.iter_mut().zip(&s.queues).enumerate() {
            let restored =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| MmioPersistError::Queue {
                    index,
                    reason: format!("{e:?}"),
                })?;
            if restored.max_size() != q.max_size() {
                return Err(MmioPersistError::Queue {
                    index,
                    reason: "maximum size differs".into(),
                });
            }
            if restored.ready() && !restored.is_valid(&t.mem) {
                return Err(MmioPersistError::Queue {
                    index,
                    reason: "rings lie outside guest memory".into(),
                });
            }
            *q = restored;
        }
        t.status = s.status;
        t.publish_status();
        t.acked_features = s.acked_features;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.queue_sel = s.queue_sel;
        t.config_generation = s.config_generation;
        t.interrupt
            .status
            .store(s.interrupt_status, std::sync::atomic::Ordering::SeqCst);
        Ok(t)
    }
}
