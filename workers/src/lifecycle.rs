//! A worker's side of the protocol: its state in the scoreboard, its heartbeat, its request
//! count, and the nudge that wakes the master when the state changes.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;

use crate::protocol::{WorkerSlot, WorkerState};

pub struct Lifecycle {
    slot: &'static WorkerSlot,
    max_requests: u64,
    /// Write end of the master's wake-up pipe (non-blocking).
    wake: File,
}

impl Lifecycle {
    pub fn new(slot: &'static WorkerSlot, max_requests: u64, wake: File) -> Lifecycle {
        Lifecycle {
            slot,
            max_requests,
            wake,
        }
    }

    pub fn beat(&self) {
        self.slot.beat();
    }

    pub fn is_draining(&self) -> bool {
        self.slot.state() == WorkerState::Draining
    }

    pub fn ready(&self) {
        if self
            .slot
            .transition(WorkerState::Booting, WorkerState::Ready)
        {
            self.wake_master();
        }
    }

    /// Stop accepting from now on. Whatever the state was (ready or retiring), draining wins.
    pub fn drain(&self) {
        self.slot.set_state(WorkerState::Draining);
        self.wake_master();
    }

    /// Count one answered request; past `max_requests`, ask the master for a replacement. The
    /// worker keeps serving until the master tells it to drain, so capacity never dips.
    pub fn request_done(&self) {
        let served = self.slot.requests.fetch_add(1, Ordering::AcqRel) + 1;
        if self.max_requests > 0
            && served >= self.max_requests
            && self
                .slot
                .transition(WorkerState::Ready, WorkerState::Retiring)
        {
            tracing::info!(
                requests = served,
                "reached max_requests; retiring once a replacement is ready"
            );
            self.wake_master();
        }
    }

    /// One byte into the master's pipe; if the pipe is full the master is awake anyway.
    fn wake_master(&self) {
        let _ = (&self.wake).write(&[1]);
    }
}
