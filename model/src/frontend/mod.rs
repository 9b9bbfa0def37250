//! The Dockerfile frontend: bytes → AST (`parser`) → typed instructions (`instructions`)
//! → variables expanded (`expand`) → stages and their DAG (`stages`).
pub mod dump;
pub mod expand;
pub mod instructions;
pub mod parser;
pub mod plan;
