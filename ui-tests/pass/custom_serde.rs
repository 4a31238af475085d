use machinery::{task, Signature};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i64,
    y: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    points: Vec<Point>,
    total: i64,
}

#[task]
fn summarize(points: Vec<Point>, origin: Point) -> Report {
    let total = points
        .iter()
        .map(|p| (p.x - origin.x) + (p.y - origin.y))
        .sum();
    Report { points, total }
}

#[task]
fn shift(dx: i64, #[chained] report: Report) -> Report {
    Report {
        total: report.total + dx,
        ..report
    }
}

fn main() {
    let chain: Signature<Report> =
        summarize::signature(vec![Point { x: 1, y: 2 }], Point { x: 0, y: 0 })
            .then(shift::signature(1));
    assert_eq!(chain.task_uuids().len(), 2);
}
