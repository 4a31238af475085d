use machinery::task;

struct Point {
    x: i64,
    y: i64,
}

#[task]
fn norm(point: Point) -> i64 {
    point.x.abs() + point.y.abs()
}

fn main() {}
