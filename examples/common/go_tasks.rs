//! Go Machinery's example tasks (`example/tasks/tasks.go`), with the same names and
//! signatures, so that Go and Rust producers and workers can run each other's.

use std::time::Duration;

use machinery::{task, TaskError};

/// `Add(args ...int64) (int64, error)`
#[task]
pub fn add(#[variadic] args: Vec<i64>) -> Result<i64, TaskError> {
    Ok(args.iter().sum())
}

/// `Multiply(args ...int64) (int64, error)`
#[task]
pub fn multiply(#[variadic] args: Vec<i64>) -> Result<i64, TaskError> {
    Ok(args.iter().product())
}

/// `SumInts(numbers []int64) (int64, error)`
#[task]
pub fn sum_ints(numbers: Vec<i64>) -> Result<i64, TaskError> {
    Ok(numbers.iter().sum())
}

/// `SumFloats(numbers []float64) (float64, error)`
#[task]
pub fn sum_floats(numbers: Vec<f64>) -> Result<f64, TaskError> {
    Ok(numbers.iter().sum())
}

/// `Concat(strs []string) (string, error)`
#[task]
pub fn concat(strs: Vec<String>) -> Result<String, TaskError> {
    Ok(strs.concat())
}

/// `Split(str string) ([]string, error)`: `strings.Split(str, "")`, one string per character.
#[task]
pub fn split(s: String) -> Result<Vec<String>, TaskError> {
    Ok(s.chars().map(String::from).collect())
}

/// `PanicTask() (string, error)`: panics with "oops".
#[task]
pub fn panic_task() -> Result<String, TaskError> {
    panic!("oops")
}

/// `LongRunningTask() error`: ten one-second steps.
#[task]
pub async fn long_running_task() -> Result<(), TaskError> {
    tracing::info!("Long running task started");
    for i in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tracing::info!(step = i + 1, "Long running task in progress");
    }
    tracing::info!("Long running task finished");
    Ok(())
}
