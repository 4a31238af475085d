use machinery::task;

struct Point {
    x: i64,
    y: i64,
}

#[task]
fn origin(scale: i64) -> Point {
    Point { x: 0, y: scale }
}

fn main() {}
