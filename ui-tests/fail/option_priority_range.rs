use machinery::task;

#[task(priority = 300)]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
