//! How a long computation tells the master it is progressing. The master kills a worker whose
//! one computation has run longer than `timeout` (`busy_since` in its slot); a forward pass
//! over many tokens, or a block of clustering, can take longer than that while progressing.
//! Such work calls `progressed()` at its natural steps (each layer of a forward pass), which
//! moves `busy_since` on: only a computation that stops progressing is taken for a hang.

use std::sync::OnceLock;

use crate::protocol::{monotonic_ms, WorkerSlot};

static SLOT: OnceLock<&'static WorkerSlot> = OnceLock::new();

/// Report progress to this slot from now on (once per worker process; the master never calls
/// it, so the model's code is the same in both and a no-op there).
pub fn report_to(slot: &'static WorkerSlot) {
    let _ = SLOT.set(slot);
}

/// The computation in progress made a step: its `timeout` starts again from now.
pub fn progressed() {
    if let Some(slot) = SLOT.get() {
        if slot.busy_since_ms().is_some() {
            slot.set_busy_since(Some(monotonic_ms()));
        }
    }
}
