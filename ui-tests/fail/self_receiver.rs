use machinery::task;

struct Counter {
    count: i64,
}

impl Counter {
    #[task]
    fn get(&self) -> i64 {
        self.count
    }
}

fn main() {}
