use machinery::task;

#[task(name = "images.resize")]
fn resize(path: String, width: u32) -> String {
    format!("{path}@{width}")
}

fn main() {
    assert_eq!(resize::NAME, "images.resize");
    assert_eq!(
        resize::signature("a.png".to_owned(), 10).name(),
        "images.resize"
    );
    assert!(machinery::registered_tasks().any(|t| t.name == "images.resize"));
}
