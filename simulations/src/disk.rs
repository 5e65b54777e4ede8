//! A simulated disk: a redb storage backend whose writes survive a crash
//! only once they are fsynced.
//!
//! A [`Disk`] is one node's device. Each time the node starts, it gets a new
//! [`Incarnation`], the backend its redb database runs on. Writes land in
//! the device's current image at once (the page cache); `sync_data` makes
//! them durable. [`Disk::crash`] throws away everything written since the
//! last sync and retires the incarnation: whatever the dead process's
//! leftover tasks still write goes nowhere, and their reads fail, as after
//! a real power cut.
//! A failing device ([`Disk::set_failing`]) refuses writes and syncs: redb's
//! commit fails, the storage reports it, and openraft stops the node. A
//! slow one ([`Disk::set_slow`]) makes every durable log write wait, as a
//! dying or overloaded device's fsync does, while openraft waits for it.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redb::StorageBackend;
use storage::WriteDelay;

/// One node's device.
#[derive(Clone, Default)]
pub struct Disk {
    inner: Arc<Mutex<Device>>,
}

#[derive(Default)]
struct Device {
    /// What the node sees: every write so far.
    current: Vec<u8>,
    /// What survives a crash: the image as of the last sync.
    durable: Vec<u8>,
    /// Byte ranges written since the last sync: a sync copies only these.
    dirty: Vec<(usize, usize)>,
    /// Bumped by every crash; writes from an older incarnation are ignored.
    incarnation: u64,
    /// Writes and syncs fail (a dying device) while set.
    failing: bool,
    /// How much longer each durable log write takes (a slow device).
    slow: Duration,
}

impl Disk {
    /// A backend for the node's next life, on the device's durable image.
    pub fn incarnation(&self) -> Incarnation {
        let device = self.lock();
        Incarnation { disk: self.clone(), incarnation: device.incarnation }
    }

    /// Makes every write and sync fail from now on (or stop failing).
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// Whether writes and syncs fail now.
    pub fn is_failing(&self) -> bool {
        self.lock().failing
    }

    /// Makes every durable log write take `slow` longer from now on (zero:
    /// a healthy device again).
    pub fn set_slow(&self, slow: Duration) {
        self.lock().slow = slow;
    }

    /// The log store's view of how slow the device is, read at each write.
    pub fn write_delay(&self) -> WriteDelay {
        let disk = self.clone();
        WriteDelay::new(move || disk.lock().slow)
    }

    /// Power cut: drops unsynced writes and retires the running incarnation.
    pub fn crash(&self) {
        let mut device = self.lock();
        device.current = device.durable.clone();
        device.dirty.clear();
        device.incarnation += 1;
    }

    fn lock(&self) -> MutexGuard<'_, Device> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The backend of one life of a node: redb's view of the [`Disk`].
pub struct Incarnation {
    disk: Disk,
    incarnation: u64,
}

impl fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incarnation").field("incarnation", &self.incarnation).finish()
    }
}

impl Incarnation {
    /// The device, if this incarnation is still the live one.
    fn live(&self) -> Option<MutexGuard<'_, Device>> {
        let device = self.disk.lock();
        (device.incarnation == self.incarnation).then_some(device)
    }
}

fn failed() -> io::Error {
    io::Error::other("the simulated disk failed")
}

fn powered_off() -> io::Error {
    io::Error::other("the simulated node lost power")
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "read past the end of the simulated disk")
}

impl StorageBackend for Incarnation {
    fn len(&self) -> Result<u64, io::Error> {
        let device = self.live().ok_or_else(powered_off)?;
        Ok(device.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        // A retired incarnation's process is dead: the image under it is
        // the durable one, not what its redb wrote, so it reads nothing.
        let device = self.live().ok_or_else(powered_off)?;
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let bytes = device.current.get(start..start + out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        if let Some(mut device) = self.live() {
            device.current.resize(usize::try_from(len).map_err(|_| out_of_range())?, 0);
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        if let Some(mut device) = self.live() {
            let device = &mut *device;
            if device.failing {
                return Err(failed());
            }
            device.durable.resize(device.current.len(), 0);
            for (start, end) in device.dirty.drain(..) {
                let end = end.min(device.current.len());
                if start < end {
                    device.durable[start..end].copy_from_slice(&device.current[start..end]);
                }
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        if let Some(mut device) = self.live() {
            if device.failing {
                return Err(failed());
            }
            let start = usize::try_from(offset).map_err(|_| out_of_range())?;
            let end = start + data.len();
            if end > device.current.len() {
                return Err(out_of_range());
            }
            device.current[start..end].copy_from_slice(data);
            device.dirty.push((start, end));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_die_with_the_node() {
        let disk = Disk::default();
        let first = disk.incarnation();
        first.set_len(8).unwrap();
        first.write(0, b"durable!").unwrap();
        first.sync_data().unwrap();
        first.write(0, b"volatile").unwrap();
        disk.crash();
        // The dead incarnation writes into the void and reads nothing.
        first.write(0, b"zombie!!").unwrap();
        assert!(first.read(0, &mut [0u8; 8]).is_err());
        let second = disk.incarnation();
        let mut out = [0u8; 8];
        second.read(0, &mut out).unwrap();
        assert_eq!(&out, b"durable!");
    }
}
