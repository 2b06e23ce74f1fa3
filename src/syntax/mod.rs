//! `syntax`: the pest grammar (`grammar/fmoe.pest`), the AST with spans, and lowering
//! from pest pairs to the AST. Knows nothing about names, types or the stdlib.
//!
//! Parsing never fails: a file always yields a [`ast::File`] holding the items that
//! parsed, and every syntax error is reported to the sink with the exact position and
//! the tokens that would have been accepted there.

pub mod ast;
pub mod errors;
mod parser;

pub use parser::parse;
