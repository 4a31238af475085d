//! Parses `#[task(name = "...", crate = "...", retries = 3, timeout = "30s", ...)]`.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::{Lit, LitStr, Token};

use crate::ctxt::Ctxt;

/// Every key `#[task(..)]` accepts, with the form its value takes (for "expected one of").
const KEYS: &[(&str, &str)] = &[
    ("name", "\"..\""),
    ("crate", "\"..\""),
    ("retries", "3"),
    ("retry_timeout", "\"10s\""),
    ("timeout", "\"30s\""),
    ("rate_limit", "\"100/s\""),
    ("queue", "\"..\""),
    ("priority", "0..=255"),
    ("max_retry_later", "10"),
];

/// The validated arguments of `#[task(..)]`.
#[derive(Default)]
pub(crate) struct TaskArgs {
    pub(crate) name: Option<LitStr>,
    pub(crate) krate: Option<syn::Path>,
    pub(crate) options: Options,
}

/// The task options, validated; expanded into a `TaskOptions` constant.
#[derive(Default)]
pub(crate) struct Options {
    retries: Option<u32>,
    retry_timeout: Option<u32>,
    /// In nanoseconds.
    timeout: Option<u64>,
    /// Count and period in nanoseconds.
    rate_limit: Option<(u32, u64)>,
    queue: Option<String>,
    priority: Option<u8>,
    max_retry_later: Option<u32>,
}

impl Options {
    /// `TaskOptions::new().retries(3)...`, a constant expression.
    pub(crate) fn to_tokens(&self, private: &TokenStream) -> TokenStream {
        let mut calls = Vec::new();
        if let Some(n) = self.retries {
            calls.push(quote!(.retries(#n)));
        }
        if let Some(n) = self.retry_timeout {
            calls.push(quote!(.retry_timeout(#n)));
        }
        if let Some(nanos) = self.timeout {
            calls.push(quote!(.timeout(::core::time::Duration::from_nanos(#nanos))));
        }
        if let Some((count, nanos)) = self.rate_limit {
            calls.push(quote! {
                .rate_limit(match #private::RateLimit::new(#count, ::core::time::Duration::from_nanos(#nanos)) {
                    ::core::option::Option::Some(limit) => limit,
                    ::core::option::Option::None => #private::RateLimit::per_second(1),
                })
            });
        }
        if let Some(queue) = &self.queue {
            calls.push(quote!(.queue(#queue)));
        }
        if let Some(n) = self.priority {
            calls.push(quote!(.priority(#n)));
        }
        if let Some(n) = self.max_retry_later {
            calls.push(quote!(.max_retry_later(#n)));
        }
        quote!(#private::TaskOptions::new() #(#calls)*)
    }
}

/// A value that may be set once; a second setting is an error at its span.
struct Once<T> {
    key: &'static str,
    value: Option<T>,
}

impl<T> Once<T> {
    fn new(key: &'static str) -> Self {
        Once { key, value: None }
    }

    fn set(&mut self, cx: &mut Ctxt, span: Span, value: T) {
        if self.value.is_some() {
            cx.push(syn::Error::new(
                span,
                format!("`{}` is specified more than once", self.key),
            ));
        } else {
            self.value = Some(value);
        }
    }
}

/// Raw `key = value` pairs, before validation.
struct RawArgs(Vec<(&'static str, Span, Lit)>);

impl Parse for RawArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut pairs = Vec::new();
        while !input.is_empty() {
            let (key, span) = if input.peek(Token![crate]) {
                ("crate", input.parse::<Token![crate]>()?.span)
            } else if input.peek(syn::Ident::peek_any) {
                let ident = input.call(syn::Ident::parse_any)?;
                let text = ident.to_string();
                match KEYS.iter().find(|(k, _)| *k == text) {
                    Some((k, _)) => (*k, ident.span()),
                    None => return Err(unknown_key(&ident, &text)),
                }
            } else {
                return Err(input.error(expected_keys()));
            };
            input.parse::<Token![=]>()?;
            let value: Lit = input.parse()?;
            pairs.push((key, span, value));
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(RawArgs(pairs))
    }
}

fn expected_keys() -> String {
    let keys: Vec<String> = KEYS.iter().map(|(k, v)| format!("`{k} = {v}`")).collect();
    format!("expected one of: {}", keys.join(", "))
}

fn unknown_key(ident: &syn::Ident, text: &str) -> syn::Error {
    let hint = match text {
        "retry" | "retry_count" | "max_retries" => "; did you mean `retries`?",
        "time_limit" | "timeout_secs" => "; did you mean `timeout`?",
        "routing_key" => "; did you mean `queue`?",
        "ratelimit" | "rate" => "; did you mean `rate_limit`?",
        _ => "",
    };
    syn::Error::new(
        ident.span(),
        format!(
            "unknown `#[task]` option `{text}`{hint}\n{}",
            expected_keys()
        ),
    )
}

pub(crate) fn parse(cx: &mut Ctxt, tokens: proc_macro2::TokenStream) -> TaskArgs {
    let raw: RawArgs = match syn::parse2(tokens) {
        Ok(raw) => raw,
        Err(e) => {
            cx.push(e);
            return TaskArgs::default();
        }
    };
    let mut name = Once::new("name");
    let mut krate = Once::new("crate");
    let mut retries = Once::new("retries");
    let mut retry_timeout = Once::new("retry_timeout");
    let mut timeout = Once::new("timeout");
    let mut rate_limit = Once::new("rate_limit");
    let mut queue = Once::new("queue");
    let mut priority = Once::new("priority");
    let mut max_retry_later = Once::new("max_retry_later");
    for (key, span, value) in raw.0 {
        match key {
            "name" => {
                if let Some(value) = string(cx, key, &value) {
                    if value.value().trim().is_empty() {
                        cx.error_spanned_by(&value, "the task name cannot be empty");
                    } else {
                        name.set(cx, span, value);
                    }
                }
            }
            "crate" => {
                if let Some(value) = string(cx, key, &value) {
                    match value.parse::<syn::Path>() {
                        Ok(path) => krate.set(cx, span, path),
                        Err(_) => cx.error_spanned_by(
                            &value,
                            format!("`{}` is not a valid crate path", value.value()),
                        ),
                    }
                }
            }
            "retries" => {
                if let Some(n) = integer::<u32>(cx, key, &value) {
                    retries.set(cx, span, n);
                }
            }
            "max_retry_later" => {
                if let Some(n) = integer::<u32>(cx, key, &value) {
                    max_retry_later.set(cx, span, n);
                }
            }
            "priority" => {
                if let Some(n) = integer::<u8>(cx, key, &value) {
                    priority.set(cx, span, n);
                }
            }
            "retry_timeout" => {
                if let Some((lit, nanos)) = duration(cx, key, &value) {
                    match u32::try_from(nanos / 1_000_000_000) {
                        Ok(secs) if nanos % 1_000_000_000 == 0 => retry_timeout.set(cx, span, secs),
                        _ => cx.error_spanned_by(
                            &lit,
                            "`retry_timeout` is Go's `RetryTimeout`, in whole seconds: write `\"10s\"`",
                        ),
                    }
                }
            }
            "timeout" => {
                if let Some((lit, nanos)) = duration(cx, key, &value) {
                    if nanos == 0 {
                        cx.error_spanned_by(&lit, "`timeout` must be longer than 0");
                    } else {
                        timeout.set(cx, span, nanos);
                    }
                }
            }
            "rate_limit" => {
                if let Some(lit) = string(cx, key, &value) {
                    match parse_rate(&lit.value()) {
                        Ok(rate) => rate_limit.set(cx, span, rate),
                        Err(why) => cx.error_spanned_by(
                            &lit,
                            format!("invalid `rate_limit`: {why}; expected `\"N/s\"`, `\"N/m\"`, `\"N/h\"` or `\"N/<duration>\"`, such as `\"100/s\"`"),
                        ),
                    }
                }
            }
            "queue" => {
                if let Some(lit) = string(cx, key, &value) {
                    let text = lit.value();
                    if text.is_empty() || text.len() > 255 {
                        cx.error_spanned_by(&lit, "`queue` is an AMQP routing key: 1 to 255 bytes");
                    } else {
                        queue.set(cx, span, text);
                    }
                }
            }
            _ => {}
        }
    }
    TaskArgs {
        name: name.value,
        krate: krate.value,
        options: Options {
            retries: retries.value,
            retry_timeout: retry_timeout.value,
            timeout: timeout.value,
            rate_limit: rate_limit.value,
            queue: queue.value,
            priority: priority.value,
            max_retry_later: max_retry_later.value,
        },
    }
}

fn string(cx: &mut Ctxt, key: &str, value: &Lit) -> Option<LitStr> {
    match value {
        Lit::Str(lit) => Some(lit.clone()),
        other => {
            let example = KEYS
                .iter()
                .find(|(k, _)| *k == key)
                .map_or("\"..\"", |(_, v)| v);
            cx.error_spanned_by(
                other,
                format!("`{key}` takes a string: `{key} = {example}`"),
            );
            None
        }
    }
}

fn integer<N>(cx: &mut Ctxt, key: &str, value: &Lit) -> Option<N>
where
    N: std::str::FromStr + Bounded,
    N::Err: std::fmt::Display,
{
    match value {
        Lit::Int(lit) => match lit.base10_parse::<N>() {
            Ok(n) => Some(n),
            Err(_) => {
                cx.error_spanned_by(
                    lit,
                    format!("`{key}` must be a whole number from 0 to {}", N::MAX_TEXT),
                );
                None
            }
        },
        other => {
            cx.error_spanned_by(
                other,
                format!("`{key}` takes a whole number, without quotes: `{key} = 3`"),
            );
            None
        }
    }
}

/// The largest value of an integer option's type, for its error message.
trait Bounded {
    const MAX_TEXT: &'static str;
}
impl Bounded for u32 {
    const MAX_TEXT: &'static str = "4294967295";
}
impl Bounded for u8 {
    const MAX_TEXT: &'static str = "255";
}

fn duration(cx: &mut Ctxt, key: &str, value: &Lit) -> Option<(LitStr, u64)> {
    let lit = string(cx, key, value)?;
    match parse_duration(&lit.value()) {
        Ok(nanos) => Some((lit, nanos)),
        Err(why) => {
            cx.error_spanned_by(
                &lit,
                format!("invalid `{key}` duration: {why}; write a number and a unit (`ms`, `s`, `m`, `h`), such as `\"30s\"` or `\"1m30s\"`"),
            );
            None
        }
    }
}

/// Parses `30s`, `500ms`, `1h30m` to nanoseconds (whole numbers; Go's unit names). The
/// runtime's `machinery::options::parse_duration` reads the same forms and fractions.
fn parse_duration(s: &str) -> Result<u64, String> {
    if s.trim().is_empty() {
        return Err("it is empty".to_owned());
    }
    let mut rest = s.trim();
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a whole number at `{rest}`"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| "the number is too large".to_owned())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let per: u64 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("`{number}` has no unit")),
            unit => return Err(format!("unknown unit `{unit}`")),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(per)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| "it is too long".to_owned())?;
    }
    Ok(total)
}

/// Parses `100/s`, `10/m`, `1/h`, `5/10s` into a count and a period in nanoseconds.
fn parse_rate(s: &str) -> Result<(u32, u64), String> {
    let (count, per) = s.split_once('/').ok_or_else(|| "no `/`".to_owned())?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("`{}` is not a whole number", count.trim()))?;
    let per = match per.trim() {
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        other => parse_duration(other)?,
    };
    if count == 0 || per == 0 {
        return Err("the count and the period must not be 0".to_owned());
    }
    Ok((count, per))
}
