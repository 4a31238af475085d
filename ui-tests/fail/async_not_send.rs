use std::rc::Rc;

use machinery::task;

async fn pause() {}

#[task]
async fn count(n: i64) -> i64 {
    let shared = Rc::new(n);
    pause().await;
    *shared
}

fn main() {}
