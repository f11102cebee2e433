//! The scoreboard: one shared anonymous mapping with a slot per worker. The master creates it
//! before forking; every worker inherits the same physical pages, so a worker's heartbeat or
//! state change is visible to the master without any message. `MAP_SHARED | MAP_ANONYMOUS`
//! needs no file and no /dev/shm, which is why Docker needs no `--shm-size` for it.

use std::num::NonZeroUsize;

use forkserve_worker::protocol::{WorkerSlot, WorkerState};
use forkserve_worker::shared_metrics::{SharedBoard, SharedMetrics};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

pub struct Scoreboard {
    slots: &'static [WorkerSlot],
    metrics: &'static SharedMetrics,
}

impl Scoreboard {
    pub fn new(capacity: usize) -> nix::Result<Scoreboard> {
        let capacity = capacity.max(1);
        // Slots first (64-byte aligned at the page start), then the counters, which need 8.
        let slots_len = capacity * std::mem::size_of::<WorkerSlot>();
        let len = NonZeroUsize::new(slots_len + std::mem::size_of::<SharedMetrics>())
            .ok_or(nix::Error::EINVAL)?;
        // SAFETY: a fresh anonymous mapping aliases nothing. The kernel zero-fills it, and all
        // zeroes is a valid `WorkerSlot` (a free slot) and a valid `SharedMetrics` (counters at
        // 0): both are `repr(C)` structs of atomics. The mapping is page aligned and
        // `slots_len` is a multiple of 64, so both parts are aligned. It is never unmapped, so
        // the `'static` references stay valid for the life of the process and of every forked
        // worker.
        let (slots, metrics) = unsafe {
            let ptr = mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?;
            let base = ptr.as_ptr() as *mut u8;
            (
                std::slice::from_raw_parts(base as *const WorkerSlot, capacity),
                &*(base.add(slots_len) as *const SharedMetrics),
            )
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        metrics
            .started_unix_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        Ok(Scoreboard { slots, metrics })
    }

    pub fn board(&self) -> SharedBoard {
        SharedBoard {
            slots: self.slots,
            metrics: self.metrics,
        }
    }

    pub fn metrics(&self) -> &'static SharedMetrics {
        self.metrics
    }

    /// Take a free slot for a worker about to be forked. Only the master claims and releases
    /// slots, so there is no race between two claims.
    pub fn claim(&self, now_ms: u64) -> Option<usize> {
        let index = self
            .slots
            .iter()
            .position(|s| s.state() == WorkerState::Free)?;
        self.slots[index].reset(now_ms);
        Some(index)
    }

    /// Give a reaped worker's slot back.
    pub fn release(&self, index: usize) {
        self.slots[index].free();
    }

    pub fn slot(&self, index: usize) -> &'static WorkerSlot {
        &self.slots[index]
    }

    pub fn slots(&self) -> &'static [WorkerSlot] {
        self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_and_released() {
        let board = Scoreboard::new(2).unwrap();
        let a = board.claim(5).unwrap();
        let b = board.claim(5).unwrap();
        assert_ne!(a, b);
        assert!(board.claim(5).is_none());
        assert_eq!(board.slot(a).state(), WorkerState::Booting);
        board.release(a);
        assert_eq!(board.claim(6), Some(a));
    }

    #[test]
    fn a_forked_child_writes_where_the_parent_reads() {
        let board = Scoreboard::new(1).unwrap();
        let i = board.claim(1).unwrap();
        // SAFETY: the child only stores to an atomic and calls _exit; both are async-signal-safe,
        // so forking from a multi-threaded test binary cannot deadlock the child.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                board.slot(i).count_request();
                unsafe { nix::libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(board.slot(i).requests(), 1);
            }
        }
    }
}
