use machinery::task;

#[task(timeout = "1s", retries = 2, timeout = "2s")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
