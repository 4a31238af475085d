use machinery::task;

#[derive(Debug)]
struct ParseFailure;

#[task]
fn parse(text: String) -> Result<i64, ParseFailure> {
    text.parse().map_err(|_| ParseFailure)
}

fn main() {}
