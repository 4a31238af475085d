use std::marker::PhantomData;

use machinery::task;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Handle {
    id: i64,
    #[serde(skip)]
    local: PhantomData<*const ()>,
}

#[task]
async fn close(handle: Handle) -> i64 {
    handle.id
}

fn main() {}
