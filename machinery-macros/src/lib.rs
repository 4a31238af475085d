//! The `#[task]` attribute macro for [machinery](https://docs.rs/machinery).
//!
//! Use it through `machinery::task`, where it is documented; this crate is an implementation
//! detail and its generated code refers to `machinery`'s hidden support module.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod attr;
mod ctxt;
mod expand;
mod model;

use proc_macro::TokenStream;

/// Turns a function into a machinery task. See `machinery::task` for the documentation.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(attr.into(), item.into()).into()
}
