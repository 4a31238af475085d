// Tasks shared by the integration tests and the worker process they start
// (`include!`d by both, so that each binary registers its own copy).



/// Go Machinery's `add`: variadic int64.
#[machinery::task]
fn add(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().sum()
}

/// Go Machinery's `multiply`: variadic int64.
#[machinery::task]
fn multiply(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().product()
}

#[machinery::task]
fn sum_ints(numbers: Vec<i64>) -> i64 {
    numbers.iter().sum()
}

#[machinery::task(name = "fadd")]
fn float_add(a: f64, b: f64) -> f64 {
    a + b
}

#[machinery::task(name = "fmultiply")]
async fn float_multiply(factor: f64, #[chained] x: f64) -> Result<f64, machinery::TaskError> {
    Ok(factor * x)
}

#[machinery::task]
fn return_just_error() -> Result<(), machinery::TaskError> {
    Err(machinery::TaskError::new("kaboom"))
}

#[machinery::task]
fn return_multiple_values(a: String, b: String) -> (String, String) {
    (a, b)
}

#[machinery::task]
fn panic_task() -> String {
    panic!("oops")
}

#[machinery::task]
async fn noop(n: i64) -> i64 {
    n
}

/// Sleeps `ms` milliseconds, then returns `id`.
#[machinery::task]
async fn long_task(id: i64, ms: u64) -> i64 {
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    id
}

/// Kills the worker process that runs it, as a crash would: a poison message.
#[machinery::task]
fn kill_worker() -> i64 {
    std::process::abort()
}
