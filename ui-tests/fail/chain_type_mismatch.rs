use machinery::task;

#[task]
fn add(a: f64, b: f64) -> f64 {
    a + b
}

#[task]
fn concat_link(prefix: String, #[chained] text: String) -> String {
    prefix + &text
}

fn main() {
    let _chain = add::signature(1.0, 1.0).then(concat_link::signature("sum: ".to_owned()));
}
