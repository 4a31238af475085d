use machinery::{task, Signature, TaskError};

#[task]
fn split(text: String) -> (String, String) {
    match text.split_once(' ') {
        Some((a, b)) => (a.to_owned(), b.to_owned()),
        None => (text, String::new()),
    }
}

#[task]
async fn try_split(text: String) -> Result<(String, i64), TaskError> {
    Ok((text.clone(), text.len() as i64))
}

fn main() {
    let _: Signature<(String, String)> = split::signature("hello world".to_owned());
    let _: Signature<(String, i64)> = try_split::signature("hello".to_owned());
    assert_eq!(split("a b".to_owned()), ("a".to_owned(), "b".to_owned()));
}
