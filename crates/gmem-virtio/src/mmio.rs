//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): the register
//! file of one device with one virtqueue, and the status it reports.

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// What a device behind the transport does.
pub trait Device {
    /// The virtio device id (2: block).
    fn device_id(&self) -> u32;
    /// The feature bits it offers (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Its configuration space.
    fn config(&self) -> Vec<u8>;
    /// Serves what the driver made available on `queue`; `Err` (with why)
    /// when the queue itself cannot be used: the transport then marks the
    /// device as needing reset.
    fn process<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<(), String>;
}

/// Queue size the transport offers.
pub const QUEUE_SIZE: u16 = 64;

/// Bytes of [`VirtioMmio::save_state`]'s state.
const STATE_BYTES: usize = 58;

/// One virtio-mmio device: registers, its queue, and the device.
#[derive(Debug)]
pub struct VirtioMmio<D> {
    device: D,
    queue: Queue,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    interrupt_status: u32,
    /// Why the device last marked itself as needing reset.
    pub reset_reason: Option<String>,
}

impl<D: Device> VirtioMmio<D> {
    /// The transport around `device`, reset.
    pub fn new(device: D) -> Self {
        Self {
            device,
            queue: Queue::new(QUEUE_SIZE).expect("QUEUE_SIZE is a power of two"),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            interrupt_status: 0,
            reset_reason: None,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn offered(&self) -> u64 {
        self.device.features() | 1 << VIRTIO_F_VERSION_1
    }

    /// A driver read of `data.len()` bytes at register `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config = self.device.config();
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let value: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => 0x7472_6976,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            VIRTIO_MMIO_VENDOR_ID => 0x676d_656d,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => u32::from(QUEUE_SIZE),
            VIRTIO_MMIO_QUEUE_READY => u32::from(self.queue.ready()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A driver write of `data` at register `offset`; a QueueNotify serves
    /// the queue through `mem` (for gmem, a view of the shared pages).
    pub fn write<M: GuestMemory>(&mut self, offset: u64, data: &[u8], mem: &M) {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        let low = |v: u32| Some(v);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | u64::from(value) << 32
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => {}
            VIRTIO_MMIO_QUEUE_NUM => self.queue.set_size(value as u16),
            VIRTIO_MMIO_QUEUE_READY => self.queue.set_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.queue.set_desc_table_address(low(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.queue.set_desc_table_address(None, low(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.queue.set_avail_ring_address(low(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.queue.set_avail_ring_address(None, low(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.queue.set_used_ring_address(low(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.queue.set_used_ring_address(None, low(value)),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => {
                if value == 0 {
                    self.reset();
                } else {
                    self.status = value;
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(mem),
            _ => {}
        }
    }

    /// Serves the queue, unless the device needs reset or the driver has
    /// not made it ready and valid.
    pub fn notify<M: GuestMemory>(&mut self, mem: &M) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if !self.queue.ready() || !self.queue.is_valid(mem) {
            return self.needs_reset(
                "the queue is not ready, or its rings are not in (shared) guest memory".into(),
            );
        }
        match self.device.process(&mut self.queue, mem) {
            Ok(()) => self.interrupt_status |= VIRTIO_MMIO_INT_VRING,
            Err(why) => self.needs_reset(why),
        }
    }

    /// The transport's state and its queue's, for a snapshot: what a
    /// device of the same kind needs to go on where this one stopped
    /// ([`restore_state`](Self::restore_state)). The device's own backing
    /// (the disk file) is the VMM's to keep.
    pub fn save_state(&self) -> Vec<u8> {
        let q = self.queue.state();
        let mut out = Vec::with_capacity(STATE_BYTES);
        for word in [self.status, self.device_features_sel, self.driver_features_sel] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.interrupt_status.to_le_bytes());
        out.extend_from_slice(&self.driver_features.to_le_bytes());
        for half in [q.max_size, q.next_avail, q.next_used, q.size] {
            out.extend_from_slice(&half.to_le_bytes());
        }
        out.extend_from_slice(&[u8::from(q.event_idx_enabled), u8::from(q.ready)]);
        for address in [q.desc_table, q.avail_ring, q.used_ring] {
            out.extend_from_slice(&address.to_le_bytes());
        }
        out
    }

    /// Goes on from a state [`save_state`](Self::save_state) returned;
    /// an error (and no change) for one that is malformed or that the
    /// queue refuses (a size that is no power of two, say).
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != STATE_BYTES {
            return Err(format!("device state of {} bytes, not {STATE_BYTES}", state.len()));
        }
        let u16_at = |at: usize| u16::from_le_bytes([state[at], state[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(state[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(state[at..at + 8].try_into().expect("8"));
        let queue_state = virtio_queue::QueueState {
            max_size: u16_at(24),
            next_avail: u16_at(26),
            next_used: u16_at(28),
            size: u16_at(30),
            event_idx_enabled: state[32] != 0,
            ready: state[33] != 0,
            desc_table: u64_at(34),
            avail_ring: u64_at(42),
            used_ring: u64_at(50),
        };
        if queue_state.max_size != QUEUE_SIZE {
            return Err(format!("a queue of {} entries, not {QUEUE_SIZE}", queue_state.max_size));
        }
        self.queue = Queue::try_from(queue_state).map_err(|e| format!("the queue: {e}"))?;
        (self.status, self.device_features_sel, self.driver_features_sel) =
            (u32_at(0), u32_at(4), u32_at(8));
        self.interrupt_status = u32_at(12);
        self.driver_features = u64_at(16);
        self.reset_reason = None;
        Ok(())
    }

    fn needs_reset(&mut self, why: String) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        self.reset_reason = Some(why);
    }

    fn reset(&mut self) {
        self.queue.reset();
        self.status = 0;
        self.driver_features = 0;
        self.interrupt_status = 0;
        self.reset_reason = None;
    }
}
