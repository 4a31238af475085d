// The crate is renamed; `crate = "renamed"` tells the generated code where it is.
extern crate machinery as renamed;

#[renamed::task(crate = "renamed")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[renamed::task(name = "renamed.scale", crate = "renamed")]
async fn scale(factor: i64, #[chained] x: i64) -> Result<i64, renamed::TaskError> {
    Ok(factor * x)
}

fn main() {
    let chain: renamed::Signature<i64> = add::signature(1, 2).then(scale::signature(3));
    assert_eq!(chain.task_uuids().len(), 2);
    assert_eq!(scale::NAME, "renamed.scale");
    assert_eq!(add(1, 2), 3);
}
