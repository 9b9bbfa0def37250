//! dbuild worker: executes stage tasks on a Docker daemon (issue #3).
