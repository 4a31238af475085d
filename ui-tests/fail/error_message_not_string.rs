use machinery::task;

#[task]
fn report(#[error_message] code: i64, job: String) {
    let _ = (code, job);
}

fn main() {}
