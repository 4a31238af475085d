use machinery::{task, ErrorHandler, Full, Needs, Signature, TaskError, Variadic};

#[task]
fn sum(#[variadic] xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

#[task]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
async fn multiply(factor: i64, #[chained] x: i64) -> Result<i64, TaskError> {
    Ok(factor * x)
}

#[task]
fn describe(#[chained] x: i64) -> String {
    format!("the answer is {x}")
}

#[task]
fn report(#[error_message] err: String, job: String) {
    eprintln!("{job}: {err}");
}

fn main() {
    let _: Signature<i64, Variadic<i64>> = sum::signature(vec![1, 2]);
    let _: Signature<i64, Needs<i64>> = multiply::signature(2);
    let _: Signature<(), ErrorHandler> = report::signature("job".to_owned());

    // A variadic link takes the previous result; a chained one too; a full one ignores it.
    let chain: Signature<String, Variadic<i64>> = sum::signature(vec![1, 2, 3])
        .then(multiply::signature(2))
        .then(sum::signature(vec![10]))
        .then(describe::signature())
        .on_error(report::signature("nightly".to_owned()));
    assert_eq!(chain.task_uuids().len(), 4);

    let full: Signature<i64, Full> = add::signature(1, 2)
        .then(add::signature(3, 4))
        .on_error(report::signature("full".to_owned()));
    assert_eq!(full.task_uuids().len(), 2);

    // A chained signature given its input directly is full.
    let _: Signature<i64, Full> = multiply::signature(2).with_input(21);
}
