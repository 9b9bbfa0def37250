//! dbuild's one test harness, shared by every test crate of the workspace: the Docker
//! runner, the local base images (no registry here), builds with BuildKit and with
//! `dbuild submit`, image snapshots and their side-by-side comparison, the Dockerfile
//! corpus, executor-level builds, farm processes, and the leftovers each test removes.
//!
//! Real daemon, no mocks. A test that cannot find what it needs (a daemon, a corpus) is
//! skipped with a message, except under `CI=true`, where that fails it ([`ci::skip`]).

pub mod build;
pub mod ci;
pub mod compare;
pub mod corpus;
pub mod docker;
pub mod executor;
pub mod farm;
pub mod images;
pub mod leftovers;
pub mod snapshot;
pub mod tarball;

/// SHA-256 as the executor computes it (Docker's layer digests).
pub use worker::executor::sha256;

pub use build::{
    assert_parity, buildkit_build, context, corpus_parity, dbuild_bin, dbuild_build, dbuild_submit,
    BuildSpec,
};
pub use compare::{assert_same_image, differences, render, Difference};
pub use corpus::Case;
pub use docker::{
    docker, docker_ok, image_exists, run_image, run_with, unique_tag, Image, Run, BUILD_TIMEOUT,
    DOCKER,
};
pub use images::base_images;
pub use leftovers::{data_dir, DataDir};
pub use snapshot::Snapshot;
