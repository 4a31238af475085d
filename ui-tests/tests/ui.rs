//! Compile-time behaviour of `#[task]`: programs that must build, and mistakes that must be
//! reported clearly at the user's code. See `README.md` for regenerating the `.stderr` files.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("pass/*.rs");
    t.compile_fail("fail/*.rs");
}
