//! HTML building without a template engine: pages are `String`s written with `write!`, and
//! every value that comes from the store (task names, args, results, errors, queue names,
//! dead-letter reasons) goes through [`Esc`], which escapes it for both element text and
//! double-quoted attribute values. Nothing from the store is ever written without it; the
//! dashboard's tests render an XSS payload and check it comes back as text.

use std::fmt::{self, Write as _};

/// Escapes `&`, `<`, `>`, `"` and `'` when displayed.
pub(crate) struct Esc<'a>(pub(crate) &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            let entity = match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            };
            f.write_str(entity)?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// Percent-encodes a value for a URL path segment or query value.
pub(crate) struct Url<'a>(pub(crate) &'a str);

impl fmt::Display for Url<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                f.write_char(char::from(byte))?;
            } else {
                write!(f, "%{byte:02X}")?;
            }
        }
        Ok(())
    }
}

/// Which entry of the navigation bar is highlighted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Tasks,
    DeadLetters,
    None,
}

/// Wraps a page body in the common layout: head with the stylesheet and the script (served
/// by the dashboard itself: the Content-Security-Policy allows no inline code), navigation
/// with the UUID search box.
pub(crate) fn page(title: &str, nav: Nav, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 4096);
    let item = |out: &mut String, which: Nav, href: &str, label: &str| {
        let class = if which == nav { " class=\"on\"" } else { "" };
        let _ = write!(out, "<a href=\"{href}\"{class}>{label}</a>");
    };
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · machinery</title><link rel=\"stylesheet\" href=\"{}\">\
         <script src=\"{}\" defer></script></head><body><header>\
         <a class=\"brand\" href=\"/\">machinery</a><nav>",
        Esc(title),
        super::assets::CSS_PATH,
        super::assets::JS_PATH,
    );
    item(&mut out, Nav::Overview, "/", "Overview");
    item(&mut out, Nav::Tasks, "/tasks", "Tasks");
    item(&mut out, Nav::DeadLetters, "/dead-letters", "Dead letters");
    let _ = write!(
        out,
        "</nav><form class=\"search\" method=\"get\" action=\"/tasks/search\">\
         <input id=\"search-uuid\" name=\"uuid\" placeholder=\"task UUID\" autocomplete=\"off\">\
         <button id=\"search-go\" type=\"submit\">Find</button></form></header><main>{body}</main>\
         </body></html>"
    );
    out
}

/// A state name as a coloured badge.
pub(crate) fn badge(state: &str) -> String {
    let class = match state {
        "SUCCESS" => "ok",
        "FAILURE" => "bad",
        "RETRY" => "warn",
        "STARTED" | "RECEIVED" => "run",
        _ => "idle",
    };
    format!("<span class=\"badge {class}\">{}</span>", Esc(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        let shown = Esc(r#"<script>alert("x")</script> & 'y'"#).to_string();
        assert_eq!(
            shown,
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(Esc("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn url_encodes_everything_but_unreserved() {
        assert_eq!(Url("a b/c?d=é").to_string(), "a%20b%2Fc%3Fd%3D%C3%A9");
        assert_eq!(Url("task-1_2.3~").to_string(), "task-1_2.3~");
    }
}
