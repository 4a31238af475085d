use machinery::{task, Signature, TaskError};

#[task]
fn check(value: i64) -> Result<(), TaskError> {
    if value < 0 {
        return Err(TaskError::new("negative"));
    }
    Ok(())
}

#[task]
async fn validate(value: String) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty".to_owned());
    }
    Ok(())
}

#[task]
fn log(line: String) {
    println!("{line}");
}

fn main() {
    let _: Signature<()> = check::signature(1);
    let _: Signature<()> = validate::signature("x".to_owned());
    let _: Signature<()> = log::signature("x".to_owned());
    assert!(check(-1).is_err());
}
