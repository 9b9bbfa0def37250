//! dbuild gRPC contract, package `dbuild.v1` (filled in with the distribution work, issue #4).
