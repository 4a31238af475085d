use machinery::task;

#[task(retry_timeout = "1500ms")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
