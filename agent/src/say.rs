//! The one way the tool writes a line to stderr. `eprintln!` issues one `write` per piece of its
//! format string, and `top -- CMD` shares stderr with CMD: the traced program's output landed
//! inside our lines ("allocwatch: tracing pid forked"). One formatted line, one `write` (atomic on
//! a pipe up to PIPE_BUF), keeps every line whole.

use std::{
    fmt,
    io::{self, Write},
};

/// Writes `args` and a newline to stderr in one `write_all` of one buffer.
pub fn line(args: fmt::Arguments<'_>) {
    let mut text = args.to_string();
    text.push('\n');
    // Nothing useful to do if stderr is gone (closed pipe): the line is lost, not the run.
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

/// `eprintln!` with the line written whole (see the module docs).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(::std::format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_eprintln() {
        let pid = 7;
        assert_eq!(
            format!("{}", format_args!("allocwatch: tracing pid {pid}")),
            "allocwatch: tracing pid 7"
        );
        // Compiles through the macro with the same argument forms as eprintln!.
        crate::say!("allocwatch: test line {pid} {}", 1);
    }
}
