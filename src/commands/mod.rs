pub mod parse;
pub mod plan;
