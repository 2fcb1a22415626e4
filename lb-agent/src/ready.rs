//! The agent's readiness: set once, after the first full sync of its
//! source has been written to the maps (for the manifests folder, the first
//! load; for the Kubernetes API, the first complete list of Services,
//! EndpointSlices and the Node). Health endpoints read it.

use std::sync::atomic::{AtomicBool, Ordering};

static READY: AtomicBool = AtomicBool::new(false);

/// Records that the first full sync is done; returns true the first time.
pub fn mark() -> bool {
    !READY.swap(true, Ordering::SeqCst)
}

/// True once [`mark`] has been called.
pub fn is_ready() -> bool {
    READY.load(Ordering::SeqCst)
}
