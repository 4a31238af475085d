use machinery::task;

#[task(rate_limit = "100/fortnight")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
