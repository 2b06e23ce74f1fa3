//! Lines for the user on stdout and stderr that never stop the program: `outln!`, `out!`
//! and `errln!` are `println!`, `print!` and `eprintln!` without their panic when the stream
//! is gone (`fmoec plan ... | head`, a log pipe whose reader died). A plan printed into a
//! closed pipe ends quietly; a run whose log reader went away keeps training and writes its
//! checkpoints, instead of dying with "failed printing to stderr" before them.
//!
//! Knows nothing about what is printed or who prints it.

use std::fmt::Arguments;
use std::io::Write;

/// Writes to stdout; a failed write is dropped.
pub fn write_out(args: Arguments) {
    let _ = std::io::stdout().lock().write_fmt(args);
}

/// Writes to stderr; a failed write is dropped.
pub fn write_err(args: Arguments) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` that never panics (see the module doc).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::console::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that never panics (see the module doc).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::console::write_out(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics (see the module doc).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::console::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}
