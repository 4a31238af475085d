// The user's own items shadow the prelude and common std names: the generated code must use
// absolute paths only. The task's own types are spelled with full paths where shadowed.
#![allow(dead_code, non_camel_case_types, unused_macros)]

use machinery::task;

struct Result;
struct Option;
struct Some;
struct None;
struct Ok;
struct Err;
struct Vec;
struct String;
struct Box;
struct Send;
struct Sync;
struct Sized;
struct Fn;
struct Future;
struct Default;
struct Clone;
struct Into;
struct From;
struct ToString;
struct Iterator;
struct IntoIterator;
struct usize;
struct str;
type TaskError = ();

mod core {}
mod std {}
mod serde {}
mod inventory {}

macro_rules! vec {
    ($($t:tt)*) => {
        compile_error!("the user's `vec!` was used")
    };
}
macro_rules! concat {
    ($($t:tt)*) => {
        compile_error!("the user's `concat!` was used")
    };
}
macro_rules! stringify {
    ($($t:tt)*) => {
        compile_error!("the user's `stringify!` was used")
    };
}
macro_rules! module_path {
    ($($t:tt)*) => {
        compile_error!("the user's `module_path!` was used")
    };
}
macro_rules! file {
    ($($t:tt)*) => {
        compile_error!("the user's `file!` was used")
    };
}
macro_rules! line {
    ($($t:tt)*) => {
        compile_error!("the user's `line!` was used")
    };
}

#[task]
fn greet(name: ::std::string::String) -> ::std::string::String {
    ::std::format!("hello, {name}")
}

#[task]
async fn divide(a: i64, b: i64) -> ::core::result::Result<i64, machinery::TaskError> {
    if b == 0 {
        return ::core::result::Result::Err(machinery::TaskError::new("division by zero"));
    }
    ::core::result::Result::Ok(a / b)
}

#[task]
fn sum(#[variadic] xs: ::std::vec::Vec<i64>) -> i64 {
    xs.iter().sum()
}

#[task]
fn halve(#[chained] x: i64) -> (i64, i64) {
    (x / 2, x % 2)
}

#[task]
fn report(#[error_message] error: ::std::string::String, job: ::std::string::String) {
    let _ = (error, job);
}

#[task]
fn nothing() {}

fn main() {
    let _ = greet::signature(::std::string::String::from("world"));
    let _ = divide::signature(6, 3);
    let _ = nothing::signature();
    let _chain = sum::signature(::std::vec::Vec::from([1, 2, 3]))
        .then(halve::signature())
        .on_error(report::signature(::std::string::String::from("nightly")));
}
