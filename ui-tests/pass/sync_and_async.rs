use machinery::{task, Signature, TaskError};

#[task]
fn add(a: f64, b: f64) -> f64 {
    a + b
}

#[task]
async fn fetch(url: String) -> Result<String, TaskError> {
    Ok(url)
}

fn main() {
    assert_eq!(add(1.0, 2.0), 3.0);
    let _add: Signature<f64> = add::signature(1.0, 2.0);
    let _fetch: Signature<String> = fetch::signature("http://example.com".to_owned());
    assert_eq!(add::NAME, "add");
    assert_eq!(fetch::NAME, "fetch");
    let names: Vec<&str> = machinery::registered_tasks().map(|t| t.name).collect();
    assert!(
        names.contains(&"add") && names.contains(&"fetch"),
        "{names:?}"
    );
}
