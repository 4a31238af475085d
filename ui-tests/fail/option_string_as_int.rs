use machinery::task;

#[task(timeout = 30)]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
