pub mod explain;
pub mod farm;
pub mod history;
pub mod parse;
pub mod plan;
pub mod remote;
pub mod spec;
pub mod submit;
