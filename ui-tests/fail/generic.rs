use machinery::task;

#[task]
fn identity<T>(value: T) -> T {
    value
}

fn main() {}
