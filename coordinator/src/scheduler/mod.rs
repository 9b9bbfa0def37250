//! The scheduler: turns a keyed [`Plan`](model::frontend::plan::Plan) into stage tasks and
//! runs every stage the target needs on an [`Executor`](model::task::Executor),
//! independent stages at the same time, critical path first. It never reads the
//! Dockerfile and never talks to Docker itself.
//!
//! - `request`: the [`BuildRequest`] and the [`StageTask`](model::task::StageTask)s it
//!   turns into;
//! - `lookup`: a stage found in the cache or on the executor instead of built;
//! - `flight`: single flight, one builder per key across builds and processes;
//! - `run`: the [`Scheduler`] and one build's loop; `stage`: one stage's task;
//! - `events`: [`BuildEvent`], [`BuildOutcome`], [`BuildError`].
mod events;
mod flight;
mod lookup;
mod request;
mod run;
mod stage;

pub use events::{BuildError, BuildEvent, BuildOutcome};
pub use lookup::fill_contents;
pub use request::{external_images, stage_task, BuildRequest, PinnedImages};
pub use run::Scheduler;
