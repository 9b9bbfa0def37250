//! What a test does when the machine lacks something it needs (a Docker daemon, a second
//! daemon, a corpus checked out beside the repository): a developer's `cargo test` skips
//! it and says why; under `CI=true` the same lack fails it, so CI never passes by skipping.

/// Whether this runs under CI (`CI=true`, as CI services set it).
pub fn is_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Skips the calling test (it should `return` next) with `reason` on stderr; under
/// `CI=true`, panics with it instead.
pub fn skip(reason: impl std::fmt::Display) {
    if is_ci() {
        panic!("CI=true, so this cannot be skipped: {reason}");
    }
    eprintln!("skipping: {reason}");
}
