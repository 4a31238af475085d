use machinery::task;

#[task]
fn sum(#[variadic] xs: i64) -> i64 {
    xs
}

fn main() {}
