//! Printing an error with its causes: `outermost: cause: root cause`.
//!
//! Many errors (kube's, io's, and ours that say `{0}`) put their source into
//! their own message *and* return it from [`Error::source`], so walking the
//! chain naively prints the same cause two or three times. [`chain`] walks it
//! and drops a cause that the error above it already printed.
//!
//! Messages echo values from specs, kubeconfigs and the cluster. A value with
//! a carriage return, an ANSI escape or a bidi override could make a terminal
//! show something else than what was printed (say, "ok" while the command
//! exits 1), so [`escape`] writes every control character other than newline
//! and tab, the Unicode line and paragraph separators, and the bidi controls
//! as `\u{…}`.

use std::error::Error;
use std::fmt::Write;

/// The error and each of its causes once, outermost first, joined by `": "`,
/// escaped for a terminal ([`escape`]).
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut above: Option<String> = None;
    let mut next: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = next {
        let msg = e.to_string();
        let msg = msg.trim();
        // The error above already said this (its message embeds its source).
        let said = above.as_deref().is_some_and(|a| a.contains(msg));
        if !msg.is_empty() && !said {
            parts.push(msg.to_string());
        }
        if !msg.is_empty() {
            above = Some(msg.to_string());
        }
        next = e.source();
    }
    escape(&parts.join(": "))
}

/// `s` with every character that could change how a terminal shows the rest
/// written as `\u{XXXX}`: C0 controls but newline and tab, DEL, C1 controls
/// (NEL, U+0085, among them), U+2028/U+2029, and the bidi formatting
/// characters (U+061C, U+200E/F, U+202A–U+202E, U+2066–U+2069).
pub fn escape(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        c if c.is_control() => true,
        '\u{2028}' | '\u{2029}' => true,
        '\u{061c}' | '\u{200e}' | '\u{200f}' => true,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("failed to read kubeconfig from '{1:?}': {0}")]
        Read(#[source] std::io::Error, String),
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("kubeconfig: {0}")]
        Infer(#[from] Inner),
        #[error("connecting to cluster local")]
        Connect(#[source] Inner),
        #[error("")]
        Silent(#[source] std::io::Error),
    }

    fn not_found() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
    }

    /// The message from issue 12 printed "No such file or directory" three times.
    #[test]
    fn each_cause_once_even_when_messages_embed_their_source() {
        let e = Outer::Infer(Inner::Read(not_found(), "/root/.kube/config".into()));
        let s = chain(&e);
        assert_eq!(
            s,
            "kubeconfig: failed to read kubeconfig from '\"/root/.kube/config\"': No such file or directory"
        );
        assert_eq!(s.matches("No such file").count(), 1);
    }

    #[test]
    fn causes_that_are_not_embedded_are_appended_outermost_first() {
        let e = Outer::Connect(Inner::Read(not_found(), "x".into()));
        assert_eq!(
            chain(&e),
            "connecting to cluster local: failed to read kubeconfig from '\"x\"': No such file or directory"
        );
    }

    #[test]
    fn an_empty_message_is_skipped() {
        assert_eq!(
            chain(&Outer::Silent(not_found())),
            "No such file or directory"
        );
    }

    #[test]
    fn terminal_controls_are_escaped_newlines_kept() {
        assert_eq!(escape("a\rok\u{1b}[2K"), "a\\u{000d}ok\\u{001b}[2K");
        assert_eq!(
            escape("x\u{202e}y\u{2028}z\u{85}"),
            "x\\u{202e}y\\u{2028}z\\u{0085}"
        );
        assert_eq!(escape("line one\nline two\tend"), "line one\nline two\tend");
        assert_eq!(escape("plain ünïcode ✓"), "plain ünïcode ✓");
    }

    #[test]
    fn chain_escapes_what_it_prints() {
        let e = Outer::Connect(Inner::Read(not_found(), "evil\r\u{1b}[32mok".into()));
        let s = chain(&e);
        assert!(!s.contains('\r') && !s.contains('\u{1b}'), "{s}");
    }
}
