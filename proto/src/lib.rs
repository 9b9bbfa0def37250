//! dbuild's gRPC contract, package `dbuild.v1` (see `proto/dbuild/v1/dbuild.proto`):
//! generated messages, clients and servers only.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("dbuild.v1");
}
