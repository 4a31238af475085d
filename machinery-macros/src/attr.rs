//! Parses `#[task(name = "...", crate = "...")]`.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::{LitStr, Token};

use crate::ctxt::Ctxt;

mod kw {
    syn::custom_keyword!(name);
}

/// The validated arguments of `#[task(..)]`.
#[derive(Default)]
pub(crate) struct TaskArgs {
    pub(crate) name: Option<LitStr>,
    pub(crate) krate: Option<syn::Path>,
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

/// Raw `key = "value"` pairs, before validation.
struct RawArgs(Vec<(RawKey, LitStr)>);

enum RawKey {
    Name(Span),
    Crate(Span),
}

impl Parse for RawArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut pairs = Vec::new();
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            let key = if lookahead.peek(kw::name) {
                RawKey::Name(input.parse::<kw::name>()?.span)
            } else if lookahead.peek(Token![crate]) {
                RawKey::Crate(input.parse::<Token![crate]>()?.span)
            } else if input.peek(syn::Ident::peek_any) {
                let key = input.call(syn::Ident::parse_any)?;
                return Err(syn::Error::new(
                    key.span(),
                    format!(
                        "unknown `#[task]` option `{key}`: expected `name = \"..\"` or `crate = \"..\"`"
                    ),
                ));
            } else {
                return Err(lookahead.error());
            };
            input.parse::<Token![=]>()?;
            let value: LitStr = input.parse()?;
            pairs.push((key, value));
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(RawArgs(pairs))
    }
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
    for (key, value) in raw.0 {
        match key {
            RawKey::Name(span) => {
                if value.value().trim().is_empty() {
                    cx.error_spanned_by(&value, "the task name cannot be empty");
                } else {
                    name.set(cx, span, value);
                }
            }
            RawKey::Crate(span) => match value.parse::<syn::Path>() {
                Ok(path) => krate.set(cx, span, path),
                Err(_) => cx.error_spanned_by(
                    &value,
                    format!("`{}` is not a valid crate path", value.value()),
                ),
            },
        }
    }
    TaskArgs {
        name: name.value,
        krate: krate.value,
    }
}
