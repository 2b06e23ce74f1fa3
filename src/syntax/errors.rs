//! Every syntax diagnostic, as a named constructor with a stable code (`E01xx`,
//! warnings `W01xx`).
//! The parser calls these; no wording lives anywhere else.

use crate::diag::{Diagnostic, Span};

/// `E0101`: text that is not what the grammar accepts at this point.
pub fn unexpected(
    span: Span,
    found: &str,
    expected: &[String],
    suggestion: Option<String>,
) -> Diagnostic {
    let wanted = match expected.len() {
        0 => String::from("something else"),
        1 => expected[0].clone(),
        n => format!("{} or {}", expected[..n - 1].join(", "), expected[n - 1]),
    };
    let mut d = Diagnostic::error("E0101", span, format!("expected {wanted}, found {found}"))
        .with_label(format!("expected {wanted} here"));
    if let Some(s) = suggestion {
        d = d.with_help(s);
    }
    d
}

/// `E0102`: a whole region that is not an item of this kind of block.
pub fn not_an_item(span: Span, top_level: bool) -> Diagnostic {
    let what = if top_level {
        "this is not a `use`, `const`, `def`, `model`, `parallel` or `train` item"
    } else {
        "this line is not a field (`name = value`) or a layer selection"
    };
    Diagnostic::error("E0102", span, what).with_label("not understood")
}

/// `E0103`: an integer literal that does not fit 64 bits.
pub fn int_too_large(span: Span) -> Diagnostic {
    Diagnostic::error("E0103", span, "integer literal is too large")
        .with_label("does not fit in a 64-bit integer")
}

/// `E0104`: a float literal that is not finite.
pub fn float_out_of_range(span: Span) -> Diagnostic {
    Diagnostic::error("E0104", span, "number literal is out of range")
        .with_label("not a finite 64-bit float")
}

/// `E0105`: an unknown escape in a string literal.
pub fn bad_escape(span: Span, c: char) -> Diagnostic {
    Diagnostic::error("E0105", span, format!("unknown escape `\\{c}` in string"))
        .with_help("the escapes are `\\n`, `\\t`, `\\\\` and `\\\"`")
}

/// `E0106`: a string literal without its closing quote.
pub fn unterminated_string(span: Span) -> Diagnostic {
    Diagnostic::error("E0106", span, "unterminated string")
        .with_label("this string has no closing `\"`")
        .with_help("strings end on the line they start on")
}

/// `E0107`: a block whose `{` is never closed; the rest of the file is taken as its body.
pub fn unclosed_block(span: Span) -> Diagnostic {
    Diagnostic::error("E0107", span, "unclosed `{`")
        .with_label("this `{` has no matching `}`")
        .with_help("add `}` after the block's last line")
}

/// `E0109`: one chain of `+ -` or `* / %` longer than the parser takes.
pub fn chain_too_long(span: Span, operands: usize, max: usize) -> Diagnostic {
    Diagnostic::error(
        "E0109",
        span,
        format!("this expression chains {operands} operands; at most {max} are allowed"),
    )
    .with_label("too long")
    .with_help("compute parts of it as `const`s and combine those")
}

/// `E0108`: brackets nested deeper than the parser goes.
pub fn nested_too_deeply(span: Span, max: usize) -> Diagnostic {
    Diagnostic::error("E0108", span, format!("brackets nest more than {max} deep"))
        .with_label("too deep")
        .with_help("name a part with `const` or `def`")
}

/// `E0108`: a chain of signs (`- - - x`) longer than the parser nests.
pub fn too_many_signs(span: Span, signs: usize, max: usize) -> Diagnostic {
    Diagnostic::error(
        "E0108",
        span,
        format!("{signs} signs in a row; at most {max} are allowed"),
    )
    .with_label("too many `-` signs")
    .with_help("two minus signs cancel: keep one sign, or none")
}

/// `W0101`: a comment that reads like floor division (`hidden = 4 * width // 3`).
pub fn comment_looks_like_division(span: Span) -> Diagnostic {
    Diagnostic::warning("W0101", span, "`//` starts a comment here, not a division")
        .with_label("the rest of the line is ignored")
        .with_help("for floor division write `floor(a / b)`; put a word first if this is a comment")
}
