use machinery::task;

#[task]
fn scale(#[chained] x: f64, factor: f64) -> f64 {
    x * factor
}

fn main() {}
