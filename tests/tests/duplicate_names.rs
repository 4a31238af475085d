//! Two tasks registered under one name: the worker refuses to start and names both.

use machinery::{task, Config, ErrorKind, Server};

mod billing {
    #[machinery::task(name = "charge")]
    pub fn charge(cents: i64) -> i64 {
        cents
    }
}

mod legacy {
    #[machinery::task(name = "charge")]
    pub fn charge_v1(cents: i64) -> i64 {
        cents * 2
    }
}

#[task]
fn unique(x: i64) -> i64 {
    x
}

#[tokio::test]
async fn duplicate_task_names_are_a_startup_error_naming_both() {
    let server = Server::new(Config::builder().broker("memory://dupes").build().unwrap())
        .await
        .unwrap();
    let err = server.worker().build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Registry);
    let message = err.to_string();
    assert!(message.contains("`charge`"), "{message}");
    assert!(message.contains("billing::charge"), "{message}");
    assert!(message.contains("legacy::charge_v1"), "{message}");
    assert!(message.contains("duplicate_names.rs:"), "{message}");
    // The functions themselves are untouched.
    assert_eq!(billing::charge(1) + legacy::charge_v1(1) + unique(0), 3);
}
