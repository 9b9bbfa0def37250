//! The wire layer between the client, the coordinator and the workers: what travels over
//! gRPC and how, with no build logic.
//!
//! - [`doc`]: domain values as versioned JSON documents, each type with its kind a
//!   constant ([`doc::Doc`]), so the Rust types stay the one definition.
//! - [`ids`]: `BuildId`, `TaskId`, `WorkerId` (from `model`, whose tasks carry them).
//! - [`blob`]: chunked blob transfer (≤ [`blob::CHUNK`] a message), verified on receipt.
//! - [`client`]: the gRPC clients on one channel, with [`auth::Bearer`].
//! - [`auth`]: the bearer token check every RPC passes, and the client side of it.
pub mod auth;
pub mod blob;
pub mod client;
pub mod doc;

pub use client::{Clients, ConnectError};
pub use doc::{document, from_document, Doc};
/// The ids that cross the wire (defined with the tasks that carry them).
pub use model::ids::{self, BuildId, TaskId, WorkerId};
