//! `syntax`: the pest grammar (`grammar/fmoe.pest`), the AST with spans, and lowering
//! from pest pairs to the AST. Knows nothing about names, types or the stdlib.
