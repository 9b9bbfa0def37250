//! The build context: walking it under `.dockerignore`, hashing its files, the stat cache.
pub mod ignore;
