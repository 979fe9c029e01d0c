//! Bounding text that a client or a file controls before it reaches a log
//! line, an error message or a gRPC status: a hostile peer must not be able
//! to flood a log or make an answer too large for its own client to read.

use std::borrow::Cow;

/// The longest client-controlled text put into a log line or error message
/// by default, in bytes.
pub const MAX_ECHO_BYTES: usize = 512;

/// `text` with its control characters escaped (`\n`, `\u{1b}`), so that
/// stored or client-sent text printed on a terminal or in a log cannot forge
/// lines or send escape sequences.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    clip(text, usize::MAX)
}

/// `text` cut to at most `max` bytes (on a character boundary), with a
/// marker saying how long it was; control characters are escaped as by
/// [`escape_controls`].
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    let clean = !text.chars().any(char::is_control);
    if text.len() <= max && clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(max.min(text.len()).saturating_add(32));
    for c in text.chars() {
        let piece: Cow<'_, str> = if c.is_control() {
            c.escape_default().to_string().into()
        } else {
            let mut buf = [0u8; 4];
            c.encode_utf8(&mut buf).to_owned().into()
        };
        if out.len().saturating_add(piece.len()) > max {
            out.push_str(&format!("… ({} bytes in all)", text.len()));
            return Cow::Owned(out);
        }
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

/// `text` cut to at most `max` bytes on a character boundary, with a marker
/// saying how long it was; unlike [`clip`], line breaks are kept (for
/// multi-line messages shown to an operator, such as a parser's report).
pub fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes in all)", &text[..end], text.len()))
}

/// Lets one warning through per interval and counts the rest, so that a
/// client repeating a bad request (an Envoy NACK loop, junk metadata) costs
/// one log line per interval instead of one per message.
#[derive(Debug, Clone)]
pub struct LogBudget {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogBudget {
    /// One warning per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Warnings held back since the last one let through.
    pub fn held_back(&self) -> u64 {
        self.suppressed
    }

    /// `Some(n)`: log now, mentioning the `n` warnings held back since the
    /// last one; `None`: stay quiet (the warning is counted).
    pub fn take(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_unchanged() {
        assert!(matches!(clip("hello", 10), Cow::Borrowed("hello")));
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_and_says_so() {
        let s = "é".repeat(1000);
        let c = clip(&s, 101);
        assert!(c.starts_with(&"é".repeat(50)));
        assert!(c.ends_with("(2000 bytes in all)"), "{c}");
        assert!(c.len() < 101 + 32);
    }

    #[test]
    fn truncate_keeps_lines_and_cuts_length() {
        assert_eq!(truncate("a\nb", 10), "a\nb");
        let long = "x".repeat(5000);
        let t = truncate(&long, 100);
        assert!(t.starts_with(&"x".repeat(100)) && t.ends_with("(5000 bytes in all)"));
    }

    #[test]
    fn log_budget_lets_one_through_per_interval_and_counts_the_rest() {
        let mut b = LogBudget::new(std::time::Duration::from_secs(3600));
        assert_eq!(b.take(), Some(0));
        for _ in 0..1000 {
            assert_eq!(b.take(), None);
        }
        let mut fast = LogBudget::new(std::time::Duration::ZERO);
        assert_eq!(fast.take(), Some(0));
        assert_eq!(fast.take(), Some(0));
    }

    #[test]
    fn escape_controls_keeps_length_and_plain_text() {
        let long = "x".repeat(100_000);
        assert!(matches!(escape_controls(&long), Cow::Borrowed(_)));
        assert_eq!(escape_controls("h\nint"), "h\\nint");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clip("a\nb\u{1b}[2J", 100), "a\\nb\\u{1b}[2J");
    }
}
