use machinery::task;

#[task]
fn double(#[foo] x: i64) -> i64 {
    x * 2
}

fn main() {}
