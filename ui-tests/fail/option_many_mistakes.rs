use machinery::task;

#[task(retries = -1, queue = "", rate_limit = "0/s")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
