use machinery::task;

#[task(name = "a", name = "b")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
