use machinery::task;

#[task]
fn sum(#[variadic] xs: Vec<i64>, offset: i64) -> i64 {
    xs.iter().sum::<i64>() + offset
}

fn main() {}
