//! What the CLI prints: human tables, or JSON with `--json`. Every line goes through
//! [`Out`], which masks the configuration's passwords wherever they would appear.

use std::fmt::Write as _;

use machinery::admin::{
    DeadLetter, Paged, QueueInfo, RecentTask, RequeueReport, TaskInfo, ThroughputBucket, TreeNode,
    WorkerInfo,
};
use machinery::wire::{State, TaskState};
use machinery::{Config, Error, ErrorKind};
use serde::Serialize;
use serde_json::json;

/// The printer; see the [module docs](self).
pub(crate) struct Out {
    json: bool,
    secrets: Vec<String>,
}

impl Out {
    pub(crate) fn new(json: bool) -> Out {
        Out {
            json,
            secrets: Vec::new(),
        }
    }

    /// Remembers the passwords in `config`'s URLs, to mask them in everything printed.
    pub(crate) fn secrets_of(&mut self, config: &Config) {
        let mut urls: Vec<&str> = config.broker_urls();
        urls.push(&config.result_backend);
        if let Some(lock) = &config.lock {
            urls.push(lock);
        }
        if let Some(url) = &config.registry.redis_url {
            urls.push(url);
        }
        for url in urls {
            // Sentinel lists: the password is on the first address.
            if let Some(password) = password_of(url) {
                self.add_secret(password);
            }
        }
        self.add_secret(config.redis.sentinel_password.clone());
    }

    fn add_secret(&mut self, secret: String) {
        if secret.len() < 3 {
            return;
        }
        let decoded = percent_decode(&secret);
        if decoded != secret && decoded.len() >= 3 {
            self.secrets.push(decoded);
        }
        self.secrets.push(secret);
        // The longest first, so that one containing another is masked whole.
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    fn mask(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }

    fn line(&self, text: &str) {
        println!("{}", self.mask(text));
    }

    fn print_json(&self, value: &impl Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => self.line(&text),
            Err(e) => self.error(&Error::new(ErrorKind::Encode, e.to_string())),
        }
    }

    /// The error, as one line on stderr (also with `--json`: stdout stays parseable).
    pub(crate) fn error(&self, e: &Error) {
        let message = e.to_string().replace(['\n', '\r'], " ");
        eprintln!("error: {}", self.mask(&message));
    }

    fn table(&self, headers: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let render = |cells: Vec<String>| {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let width = widths.get(i).copied().unwrap_or(0);
                if i + 1 == cells.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            line.trim_end().to_owned()
        };
        self.line(&render(headers.iter().map(|h| (*h).to_owned()).collect()));
        for row in rows {
            self.line(&render(row.clone()));
        }
    }

    pub(crate) fn sent(&self, uuid: &str) {
        if self.json {
            self.print_json(&json!({ "uuid": uuid }));
        } else {
            self.line(uuid);
        }
    }

    pub(crate) fn status(&self, info: &TaskInfo, state: &TaskState) {
        if self.json {
            self.print_json(info);
            return;
        }
        self.line(&format!("task     {}", info.uuid));
        self.line(&format!("name     {}", state.task_name));
        self.line(&format!("state    {}", state.state));
        if let Some(created) = state.created_at.datetime() {
            self.line(&format!("created  {}", created.to_rfc3339()));
        }
        if !state.error.is_empty() {
            self.line(&format!("error    {}", one_line(&state.error)));
        }
        if let Some(results) = &state.results {
            self.line(&format!("results  {}", results_text(results)));
        }
        for (state, at) in &info.timeline {
            self.line(&format!("{:<8} {}", state.as_str(), time_text(*at)));
        }
    }

    /// A finished task's results; a FAILURE is an error (its message, exit 1).
    pub(crate) fn result(&self, state: &TaskState) -> Result<(), Error> {
        if !state.state.is_final() {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "task {} has not finished ({})",
                    state.task_uuid, state.state
                ),
            ));
        }
        if self.json {
            self.print_json(state);
        } else if state.state == State::Success {
            self.line(&results_text(state.results.as_deref().unwrap_or_default()));
        }
        if state.state == State::Failure {
            return Err(Error::task(format!(
                "task {} failed: {}",
                state.task_uuid,
                one_line(&state.error)
            )));
        }
        Ok(())
    }

    pub(crate) fn tree(&self, tree: &TreeNode) {
        if self.json {
            self.print_json(tree);
            return;
        }
        let mut lines = Vec::new();
        tree_lines(tree, "", "", &mut lines);
        for line in lines {
            self.line(&line);
        }
    }

    pub(crate) fn queues(&self, queues: &[QueueInfo]) {
        if self.json {
            self.print_json(&queues);
            return;
        }
        let rows: Vec<Vec<String>> = queues
            .iter()
            .map(|q| {
                vec![
                    q.name.clone(),
                    if q.exists {
                        q.depth.to_string()
                    } else {
                        "-".to_owned()
                    },
                    q.consumers.to_string(),
                    q.unsettled.map_or("-".to_owned(), |n| n.to_string()),
                    q.dead_letters.to_string(),
                ]
            })
            .collect();
        self.table(&["QUEUE", "READY", "CONSUMERS", "UNSETTLED", "DEAD"], &rows);
    }

    pub(crate) fn dead_letters(&self, letters: &Paged<DeadLetter>) {
        if self.json {
            self.print_json(letters);
            return;
        }
        let rows: Vec<Vec<String>> = letters
            .items
            .iter()
            .map(|d| {
                vec![
                    d.id.clone(),
                    d.task_name.clone().unwrap_or_else(|| "-".to_owned()),
                    d.size.to_string(),
                    one_line(&d.reason),
                ]
            })
            .collect();
        self.table(&["ID", "TASK", "BYTES", "REASON"], &rows);
        self.footer(
            letters.total,
            letters.items.len(),
            letters.next.map(|p| p.offset),
        );
    }

    fn footer(&self, total: Option<u64>, shown: usize, next: Option<usize>) {
        let mut text = format!("{shown} shown");
        if let Some(total) = total {
            let _ = write!(text, " of {total}");
        }
        if let Some(next) = next {
            let _ = write!(text, "; next page: --offset {next}");
        }
        self.line(&text);
    }

    pub(crate) fn dead_letter(&self, letter: &DeadLetter) {
        if self.json {
            self.print_json(letter);
            return;
        }
        self.line(&format!("id      {}", letter.id));
        self.line(&format!("queue   {}", letter.queue));
        self.line(&format!("reason  {}", one_line(&letter.reason)));
        self.line(&format!("bytes   {}", letter.size));
        match &letter.signature {
            Some(signature) => {
                self.line(&format!("task    {}", signature.name));
                if let Ok(text) = serde_json::to_string_pretty(signature) {
                    self.line(&text);
                }
            }
            None => self.line(&format!("body    {}", one_line(&letter.body_preview))),
        }
    }

    pub(crate) fn requeued(&self, report: &RequeueReport) {
        if self.json {
            self.print_json(report);
            return;
        }
        let mut text = format!("requeued {}", report.requeued);
        if report.skipped > 0 {
            let _ = write!(text, "; left {} that are no task", report.skipped);
        }
        self.line(&text);
    }

    pub(crate) fn workers(&self, workers: &[WorkerInfo]) {
        if self.json {
            self.print_json(&workers);
            return;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let rows: Vec<Vec<String>> = workers
            .iter()
            .map(|w| {
                vec![
                    w.name.clone(),
                    w.host.clone(),
                    w.pid.to_string(),
                    w.queues.join(","),
                    w.concurrency.to_string(),
                    w.in_flight.to_string(),
                    w.processed.to_string(),
                    w.failed.to_string(),
                    duration_text(now - w.started_at_ms),
                    format!("{} ago", duration_text(now - w.heartbeat_at_ms)),
                ]
            })
            .collect();
        self.table(
            &[
                "NAME", "HOST", "PID", "QUEUES", "CONC", "RUNNING", "DONE", "FAILED", "UP", "SEEN",
            ],
            &rows,
        );
    }

    pub(crate) fn recent(&self, recent: &Paged<RecentTask>) {
        if self.json {
            self.print_json(recent);
            return;
        }
        let rows: Vec<Vec<String>> = recent
            .items
            .iter()
            .map(|t| {
                let (name, state) = t
                    .state
                    .as_ref()
                    .map_or(("-".to_owned(), "-".to_owned()), |s| {
                        (s.task_name.clone(), s.state.to_string())
                    });
                vec![t.uuid.clone(), name, state, time_text(t.at_ms)]
            })
            .collect();
        self.table(&["UUID", "TASK", "NOW", "AT"], &rows);
        self.footer(
            recent.total,
            recent.items.len(),
            recent.next.map(|p| p.offset),
        );
    }

    pub(crate) fn throughput(&self, buckets: &[ThroughputBucket]) {
        if self.json {
            self.print_json(&buckets);
            return;
        }
        let rows: Vec<Vec<String>> = buckets
            .iter()
            .map(|b| {
                vec![
                    time_text(b.start * 1000),
                    b.processed.to_string(),
                    b.failed.to_string(),
                    format!("{:.1}", b.tasks_per_sec),
                    format!("{:.1}", b.failures_per_sec),
                ]
            })
            .collect();
        self.table(&["FROM", "RUN", "FAILED", "TASKS/S", "FAILURES/S"], &rows);
    }

    pub(crate) fn revoked(&self, uuid: &str, revoked: bool) {
        if self.json {
            self.print_json(&json!({ "uuid": uuid, "revoked": revoked }));
        } else if revoked {
            self.line(&format!("revoked {uuid}"));
        } else {
            self.line(&format!("{uuid} had already finished; not revoked"));
        }
    }

    pub(crate) fn purged(&self, queue: &str, purged: u64) {
        if self.json {
            self.print_json(&json!({ "queue": queue, "purged": purged }));
        } else {
            self.line(&format!("purged {purged} messages from {queue}"));
        }
    }
}

/// The password in a URL's user info (the part after `:`, or a lone token: Go's form).
fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let at = rest[..end].rfind('@')?;
    let userinfo = &rest[..at];
    Some(match userinfo.split_once(':') {
        Some((_, password)) => password.to_owned(),
        None => userinfo.to_owned(),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn one_line(text: &str) -> String {
    let text = text.replace(['\n', '\r'], " ");
    if text.chars().count() > 200 {
        let cut: String = text.chars().take(200).collect();
        format!("{cut}…")
    } else {
        text
    }
}

fn results_text(results: &[machinery::wire::TaskResult]) -> String {
    results
        .iter()
        .map(|r| r.value.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
    )
}

fn duration_text(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
    }
}

fn tree_lines(node: &TreeNode, prefix: &str, child_prefix: &str, out: &mut Vec<String>) {
    let link = match node.link {
        machinery::admin::Link::Root => "",
        machinery::admin::Link::OnSuccess => "then ",
        machinery::admin::Link::OnError => "on error ",
        machinery::admin::Link::Member => "member ",
        machinery::admin::Link::ChordCallback => "chord callback ",
        _ => "",
    };
    let what = match node.kind {
        machinery::admin::NodeKind::Group => format!("group {}", node.uuid),
        _ => format!(
            "{} {} {}",
            if node.name.is_empty() {
                "?"
            } else {
                &node.name
            },
            node.uuid,
            node.state.map_or("(no state)", State::as_str)
        ),
    };
    let mut line = format!("{prefix}{link}{what}");
    if let Some(error) = &node.error {
        let _ = write!(line, ": {}", one_line(error));
    }
    out.push(line);
    let count = node.children.len();
    for (i, child) in node.children.iter().enumerate() {
        let last = i + 1 == count;
        let (branch, next) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        tree_lines(
            child,
            &format!("{child_prefix}{branch}"),
            &format!("{child_prefix}{next}"),
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        let mut out = Out::new(false);
        let config = Config::builder()
            .broker("amqp://guest:s3cr%40t@host:5672/")
            .result_backend("redis://hunter2@host:6379/0")
            .build()
            .unwrap();
        out.secrets_of(&config);
        assert_eq!(out.mask("x s3cr@t y s3cr%40t hunter2"), "x *** y *** ***");
        assert_eq!(password_of("redis://:pw1@h/"), Some("pw1".to_owned()));
    }
}
