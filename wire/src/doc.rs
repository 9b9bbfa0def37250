//! Domain values cross the wire as versioned JSON documents (`Document { kind, json }`):
//! the Rust types stay the one definition, and each type names its kind once, as
//! [`Doc::KIND`], so a sender and a receiver cannot disagree on it.
use model::context::ContextManifest;
use model::image_parts::ImageParts;
use model::task::{StageError, StageResult, StageTask};
use proto::v1::Document;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::Status;

/// A type that travels as a [`Document`] of kind [`Doc::KIND`] (`Name/version`).
pub trait Doc: Serialize + DeserializeOwned {
    const KIND: &'static str;
}

impl Doc for StageTask {
    const KIND: &'static str = "StageTask/1";
}
impl Doc for StageResult {
    const KIND: &'static str = "StageResult/1";
}
impl Doc for StageError {
    const KIND: &'static str = "StageError/1";
}
impl Doc for ContextManifest {
    const KIND: &'static str = "ContextManifest/1";
}
impl Doc for ImageParts {
    const KIND: &'static str = model::image_parts::KIND;
}

/// Serializes a domain value as a document of its kind.
pub fn document<T: Doc>(value: &T) -> Document {
    Document {
        kind: T::KIND.to_string(),
        // Domain types are plain data (string keys, no non-finite floats): serializing
        // them cannot fail.
        json: serde_json::to_vec(value).expect("domain types serialize"),
    }
}

/// Reads a document of `T`'s kind; a missing, mislabelled or malformed one is
/// `INVALID_ARGUMENT` saying which.
pub fn from_document<T: Doc>(doc: Option<&Document>) -> Result<T, Status> {
    let kind = T::KIND;
    let doc = doc.ok_or_else(|| Status::invalid_argument(format!("missing {kind}")))?;
    if doc.kind != kind {
        return Err(Status::invalid_argument(format!(
            "expected a {kind} document, got {}",
            doc.kind
        )));
    }
    serde_json::from_slice(&doc.json)
        .map_err(|e| Status::invalid_argument(format!("bad {kind} document: {e}")))
}
