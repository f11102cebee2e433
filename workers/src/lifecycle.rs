//! A worker's side of the protocol: its state in the scoreboard, its heartbeat, its request
//! count, and the nudge that wakes the master when the state changes.

use std::fs::File;
use std::io::Write;

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

    /// A request has started: counted in flight until the guard is dropped.
    pub fn request_started(&self) -> InFlight {
        self.slot.add_in_flight(1);
        InFlight(self.slot)
    }

    /// Count one answered request; past `max_requests`, ask the master for a replacement. The
    /// worker keeps serving until the master tells it to drain, so capacity never dips.
    pub fn request_done(&self) {
        let served = self.slot.count_request();
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

/// One request in flight in this worker's slot (`forkserve_worker_in_flight`), until dropped.
pub struct InFlight(&'static WorkerSlot);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.add_in_flight(-1);
    }
}
