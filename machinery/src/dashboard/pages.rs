//! The dashboard's handlers: each reads through [`Admin`](crate::admin::Admin) and renders one
//! page or fragment. Every value from the store goes through [`Esc`] (or [`Url`] in links).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use serde::Deserialize;

use super::auth;
use super::html::{badge, page, Esc, Nav, Url};
use super::AppState;
use crate::admin::{Link, NodeKind, Page, Selection, TreeNode};
use crate::wire::{Arg, State as TaskStateName, TaskResult};

/// Rows per page of every listing.
pub(crate) const PAGE_SIZE: usize = 50;
/// The throughput chart's window.
const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The states the recent index keeps, in the order of the tabs.
const INDEXED: [TaskStateName; 4] = [
    TaskStateName::Started,
    TaskStateName::Success,
    TaskStateName::Failure,
    TaskStateName::Retry,
];
/// How much of a value a table cell shows.
const CELL: usize = 160;

type Page200 = (StatusCode, Html<String>);

fn ok(title: &str, nav: Nav, body: &str) -> Page200 {
    (StatusCode::OK, Html(page(title, nav, body)))
}

fn error_page(status: StatusCode, nav: Nav, message: &str) -> Page200 {
    let body = format!(
        "<h1>{}</h1><p class=\"err\" id=\"error\">{}</p>",
        Esc(status.canonical_reason().unwrap_or("Error")),
        Esc(message)
    );
    (status, Html(page("Error", nav, &body)))
}

/// A Unix time in ms as `YYYY-MM-DD HH:MM:SS UTC`.
fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// A Unix time in ms, to the millisecond.
fn when_precise(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string())
        .unwrap_or_default()
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

fn args_text(args: &[Arg]) -> String {
    let shown: Vec<String> = args
        .iter()
        .map(|arg| {
            let name = if arg.name.is_empty() {
                String::new()
            } else {
                format!("{}=", arg.name)
            };
            format!("{name}{}:{}", arg.type_name, arg.value)
        })
        .collect();
    shown.join(", ")
}

fn results_text(results: &[TaskResult]) -> String {
    let shown: Vec<String> = results
        .iter()
        .map(|result| format!("{}:{}", result.type_name, result.value))
        .collect();
    shown.join(", ")
}

/// Samples queue depths and worker counters until the dashboard stops.
pub(crate) async fn sample_forever(state: AppState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let queues = state.admin.queues().await;
        let workers = state.admin.workers().await;
        if let Err(error) = &queues {
            tracing::debug!(error = %error, "dashboard: no queue sample");
        }
        let queues = queues.unwrap_or_default();
        let workers = workers.unwrap_or_default();
        crate::lock(&state.samples).record(Instant::now(), &queues, &workers);
    }
}

async fn queues_table(state: &AppState) -> String {
    let queues = match state.admin.queues().await {
        Ok(queues) => queues,
        Err(error) => {
            return format!(
                "<p class=\"err\">The broker did not answer: {}</p>",
                Esc(&error.to_string())
            );
        }
    };
    if queues.is_empty() {
        return "<p class=\"muted\">No queues.</p>".to_owned();
    }
    let mut out = String::from(
        "<table id=\"queues-table\"><tr><th>Queue</th><th class=\"num\">Ready</th>\
         <th class=\"num\">In/s</th><th class=\"num\">Out/s</th><th class=\"num\">Consumers</th>\
         <th class=\"num\">Unsettled</th><th class=\"num\">Dead letters</th></tr>",
    );
    let samples = crate::lock(&state.samples);
    for queue in &queues {
        let rates = samples.rates(&queue.name);
        let rate = |value: Option<f64>| value.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
        let _ = write!(
            out,
            "<tr data-queue=\"{name}\"><td><code>{name}</code>{missing}</td><td class=\"num depth\">{depth}</td>\
             <td class=\"num\">{inr}</td><td class=\"num\">{outr}</td><td class=\"num\">{consumers}</td>\
             <td class=\"num\">{unsettled}</td><td class=\"num\"><a href=\"/dead-letters?queue={url}\">{dead}</a></td></tr>",
            name = Esc(&queue.name),
            missing = if queue.exists { "" } else { " <span class=\"muted\">(not declared)</span>" },
            depth = queue.depth,
            inr = rate(rates.map(|r| r.in_per_sec)),
            outr = rate(rates.map(|r| r.out_per_sec)),
            consumers = queue.consumers,
            unsettled = queue.unsettled.map_or_else(|| "–".to_owned(), |n| n.to_string()),
            url = Url(&queue.name),
            dead = queue.dead_letters,
        );
    }
    out.push_str("</table>");
    if samples.len() < 2 {
        out.push_str("<p class=\"muted\">Rates appear after two samples (5 s apart).</p>");
    }
    out
}

async fn workers_table(state: &AppState) -> String {
    let workers = match state.admin.workers().await {
        Ok(workers) => workers,
        Err(error) => {
            return format!(
                "<p class=\"muted\">No worker registry: {}</p>",
                Esc(&error.to_string())
            );
        }
    };
    if workers.is_empty() {
        return "<p class=\"muted\" id=\"no-workers\">No live workers.</p>".to_owned();
    }
    let mut out = String::from(
        "<table id=\"workers-table\"><tr><th>Worker</th><th>Host</th><th class=\"num\">PID</th>\
         <th>Queues</th><th class=\"num\">Concurrency</th><th class=\"num\">In flight</th>\
         <th class=\"num\">Processed</th><th class=\"num\">Failed</th><th>Started</th>\
         <th>Version</th></tr>",
    );
    for worker in &workers {
        let _ = write!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            Esc(&worker.name),
            Esc(&worker.host),
            worker.pid,
            Esc(&worker.queues.join(", ")),
            worker.concurrency,
            worker.in_flight,
            worker.processed,
            worker.failed,
            when(worker.started_at_ms),
            Esc(&worker.version),
        );
    }
    out.push_str("</table>");
    out
}

/// `/`: queues, workers and the throughput chart.
pub(crate) async fn overview(State(state): State<AppState>) -> Page200 {
    let queues = queues_table(&state).await;
    let workers = workers_table(&state).await;
    let body = format!(
        "<h1>Overview</h1>\
         <section class=\"card\"><h2>Throughput, last 15 minutes</h2>\
         <div class=\"legend\"><span><i class=\"sw-tasks\"></i>tasks/s</span>\
         <span><i class=\"sw-fail\"></i>failures/s</span>\
         <span id=\"chart-total\" class=\"muted\"></span></div><div id=\"chart\"></div></section>\
         <section class=\"card\"><h2>Queues</h2><div id=\"queues\" data-refresh=\"/partials/queues\">{queues}</div></section>\
         <section class=\"card\"><h2>Workers</h2><div id=\"workers\" data-refresh=\"/partials/workers\">{workers}</div></section>"
    );
    ok("Overview", Nav::Overview, &body)
}

/// The queues table alone, for the overview's refresh.
pub(crate) async fn queues_partial(State(state): State<AppState>) -> Html<String> {
    Html(queues_table(&state).await)
}

/// The workers table alone, for the overview's refresh.
pub(crate) async fn workers_partial(State(state): State<AppState>) -> Html<String> {
    Html(workers_table(&state).await)
}

/// `/api/throughput`: the chart's data.
pub(crate) async fn throughput_json(State(state): State<AppState>) -> Response {
    match state.admin.throughput(WINDOW).await {
        Ok(buckets) => {
            // The current bucket is still filling: its rate would read low.
            let now_secs = chrono::Utc::now().timestamp();
            let points: Vec<serde_json::Value> = buckets
                .iter()
                .filter(|b| b.start + b.seconds <= now_secs)
                .map(|b| {
                    serde_json::json!({
                        "t": (b.start + b.seconds) * 1000,
                        "tasks_per_sec": b.tasks_per_sec,
                        "failures_per_sec": b.failures_per_sec,
                    })
                })
                .collect();
            Json(serde_json::json!({
                "window_seconds": WINDOW.as_secs(),
                "now_ms": chrono::Utc::now().timestamp_millis(),
                "buckets": points,
                "total_tasks": buckets.iter().map(|b| b.processed).sum::<u64>(),
                "total_failures": buckets.iter().map(|b| b.failed).sum::<u64>(),
            }))
            .into_response()
        }
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}

/// The query of `/tasks`.
#[derive(Debug, Deserialize)]
pub(crate) struct TasksQuery {
    state: Option<String>,
    offset: Option<usize>,
}

/// `/tasks`: one page of the recent index for one state.
pub(crate) async fn tasks(
    State(state): State<AppState>,
    Query(query): Query<TasksQuery>,
) -> Page200 {
    let wanted = query
        .state
        .as_deref()
        .map(|s| s.to_ascii_uppercase())
        .and_then(|s| TaskStateName::parse(&s))
        .filter(|s| INDEXED.contains(s))
        .unwrap_or(TaskStateName::Success);
    let offset = query.offset.unwrap_or(0);
    let listed = match state
        .admin
        .recent(
            wanted,
            Page {
                offset,
                limit: PAGE_SIZE,
            },
        )
        .await
    {
        Ok(listed) => listed,
        Err(error) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Nav::Tasks,
                &error.to_string(),
            )
        }
    };
    let mut body = String::from("<h1>Recent tasks</h1><div class=\"tabs\">");
    for s in INDEXED {
        let on = if s == wanted { " class=\"on\"" } else { "" };
        let _ = write!(
            body,
            "<a href=\"/tasks?state={}\"{on}>{}</a>",
            s.as_str().to_ascii_lowercase(),
            s.as_str()
        );
    }
    body.push_str("</div><section class=\"card\">");
    if listed.items.is_empty() {
        body.push_str("<p class=\"muted\" id=\"no-tasks\">No tasks in this state recently.</p>");
    } else {
        body.push_str(
            "<table id=\"tasks-table\"><tr><th>UUID</th><th>Task</th><th>State now</th>\
             <th>Reached at</th><th>Error</th></tr>",
        );
        for task in &listed.items {
            let (name, now, error) = match &task.state {
                Some(stored) => (
                    stored.task_name.as_str(),
                    badge(stored.state.as_str()),
                    cut(&stored.error, CELL),
                ),
                None => (
                    "",
                    "<span class=\"muted\">expired</span>".to_owned(),
                    String::new(),
                ),
            };
            let _ = write!(
                body,
                "<tr><td><a href=\"/tasks/{}\"><code>{}</code></a></td><td>{}</td><td>{now}</td>\
                 <td>{}</td><td class=\"err\">{}</td></tr>",
                Url(&task.uuid),
                Esc(&task.uuid),
                Esc(name),
                when(task.at_ms),
                Esc(&error),
            );
        }
        body.push_str("</table>");
    }
    let shown_to = offset + listed.items.len();
    let total = listed
        .total
        .map(|total| format!(" of {total}"))
        .unwrap_or_default();
    let _ = write!(
        body,
        "<div class=\"pager\"><span id=\"page-range\">{}–{shown_to}{total}</span>",
        if listed.items.is_empty() {
            offset
        } else {
            offset + 1
        },
    );
    let state_param = wanted.as_str().to_ascii_lowercase();
    if offset > 0 {
        let _ = write!(
            body,
            "<a id=\"prev-page\" href=\"/tasks?state={state_param}&amp;offset={}\">← newer</a>",
            offset.saturating_sub(PAGE_SIZE)
        );
    }
    if let Some(next) = listed.next {
        let _ = write!(
            body,
            "<a id=\"next-page\" href=\"/tasks?state={state_param}&amp;offset={}\">older →</a>",
            next.offset
        );
    }
    body.push_str("</div></section>");
    ok("Tasks", Nav::Tasks, &body)
}

/// The query of `/tasks/search`.
#[derive(Debug, Deserialize)]
pub(crate) struct SearchQuery {
    uuid: Option<String>,
}

/// `/tasks/search?uuid=`: to the task's page.
pub(crate) async fn search(Query(query): Query<SearchQuery>) -> Redirect {
    match query.uuid.as_deref().map(str::trim) {
        Some(uuid) if !uuid.is_empty() => Redirect::to(&format!("/tasks/{}", Url(uuid))),
        _ => Redirect::to("/tasks"),
    }
}

fn link_name(link: Link) -> &'static str {
    match link {
        Link::Root => "",
        Link::OnSuccess => "then",
        Link::OnError => "on error",
        Link::Member => "member",
        Link::ChordCallback => "chord callback",
    }
}

fn render_tree(node: &TreeNode, current: &str, out: &mut String, depth: usize) {
    if depth > 64 {
        return;
    }
    out.push_str("<li>");
    let link = link_name(node.link);
    if !link.is_empty() {
        let _ = write!(out, "<span class=\"muted\">{link}</span> ");
    }
    if node.kind == NodeKind::Group {
        let _ = write!(out, "group <code>{}</code>", Esc(&node.uuid));
    } else {
        let name = if node.name.is_empty() {
            "?"
        } else {
            &node.name
        };
        if node.uuid == current {
            let _ = write!(
                out,
                "<strong>{}</strong> <code>{}</code>",
                Esc(name),
                Esc(&node.uuid)
            );
        } else {
            let _ = write!(
                out,
                "<a class=\"tree-link\" href=\"/tasks/{}\">{}</a> <code>{}</code>",
                Url(&node.uuid),
                Esc(name),
                Esc(&node.uuid)
            );
        }
        let state = node.state.map_or("PENDING", TaskStateName::as_str);
        let _ = write!(out, " {}", badge(state));
        if let Some(error) = node.error.as_deref().filter(|e| !e.is_empty()) {
            let _ = write!(
                out,
                " <span class=\"err\">{}</span>",
                Esc(&cut(error, CELL))
            );
        }
    }
    if !node.children.is_empty() {
        out.push_str("<ul class=\"tree\">");
        for child in &node.children {
            render_tree(child, current, out, depth + 1);
        }
        out.push_str("</ul>");
    }
    out.push_str("</li>");
}

/// `/tasks/<uuid>`: one task.
pub(crate) async fn task(State(state): State<AppState>, Path(uuid): Path<String>) -> Page200 {
    let info = match state.admin.task(&uuid).await {
        Ok(info) => info,
        Err(error) if error.kind() == crate::ErrorKind::Config => {
            return error_page(StatusCode::BAD_REQUEST, Nav::Tasks, &error.to_string())
        }
        Err(error) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Nav::Tasks,
                &error.to_string(),
            )
        }
    };
    let mut body = format!("<h1>Task <code id=\"task-uuid\">{}</code></h1>", Esc(&uuid));
    let Some(stored) = info.state else {
        let _ = write!(
            body,
            "<section class=\"card\"><p id=\"task-state\" class=\"muted\">No stored state: an \
             unknown UUID, a task whose result expired, or one not sent yet.</p></section>"
        );
        return (StatusCode::NOT_FOUND, Html(page("Task", Nav::Tasks, &body)));
    };
    let final_state = stored.state.is_final();
    let created = stored
        .created_at
        .datetime()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    let _ = write!(
        body,
        "<section class=\"card\"{reload}><dl class=\"kv\">\
         <dt>Task</dt><dd id=\"task-name\">{name}</dd>\
         <dt>State</dt><dd id=\"task-state\">{state}</dd>\
         <dt>Sent at</dt><dd>{created}</dd>",
        reload = if final_state {
            ""
        } else {
            " data-reload=\"2000\""
        },
        name = Esc(&stored.task_name),
        state = badge(stored.state.as_str()),
    );
    // Go's TaskState keeps no arguments, and neither does the recent index; a dead letter's
    // row on the dead-letters page shows its signature's.
    body.push_str(
        "<dt>Args</dt><dd class=\"muted\" id=\"task-args\">not kept by the result store \
         (a dead letter's are on the Dead letters page)</dd>",
    );
    if let Some(results) = stored.results.as_deref().filter(|r| !r.is_empty()) {
        let _ = write!(
            body,
            "<dt>Results</dt><dd><pre id=\"task-results\">{}</pre></dd>",
            Esc(&results_text(results))
        );
    }
    if !stored.error.is_empty() {
        let _ = write!(
            body,
            "<dt>Error</dt><dd><pre id=\"task-error\" class=\"err\">{}</pre></dd>",
            Esc(&stored.error)
        );
    }
    body.push_str("</dl>");
    if !final_state {
        let _ = write!(
            body,
            "<form class=\"inline\" method=\"post\" action=\"/tasks/{}/revoke\" data-confirm=\"Revoke this task?\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button class=\"danger\" id=\"revoke\" type=\"submit\">Revoke</button></form>",
            Url(&uuid),
            Esc(&state.security.csrf)
        );
    }
    body.push_str("</section>");
    if !info.timeline.is_empty() {
        body.push_str("<section class=\"card\"><h2>Timeline</h2><table id=\"timeline\">");
        if let Some(sent) = stored.created_at.datetime() {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{} <span class=\"muted\">sent</span></td></tr>",
                sent.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                badge("PENDING")
            );
        }
        for (name, at_ms) in &info.timeline {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td></tr>",
                when_precise(*at_ms),
                badge(name.as_str())
            );
        }
        body.push_str("</table></section>");
    }
    match state.admin.tree(&uuid).await {
        Ok(tree) if !tree.children.is_empty() || tree.uuid != uuid => {
            body.push_str("<section class=\"card\"><h2>Chain, group or chord</h2><ul class=\"tree\" id=\"tree\">");
            render_tree(&tree, &uuid, &mut body, 0);
            body.push_str("</ul></section>");
        }
        Ok(_) => {}
        Err(error) => {
            let _ = write!(
                body,
                "<p class=\"muted\">No tree: {}</p>",
                Esc(&error.to_string())
            );
        }
    }
    ok("Task", Nav::Tasks, &body)
}

/// `POST /tasks/<uuid>/revoke`.
pub(crate) async fn revoke(State(state): State<AppState>, Path(uuid): Path<String>) -> Response {
    match state.admin.revoke(&uuid).await {
        Ok(_) => Redirect::to(&format!("/tasks/{}", Url(&uuid))).into_response(),
        Err(error) => error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            Nav::Tasks,
            &error.to_string(),
        )
        .into_response(),
    }
}

/// The query of `/dead-letters`.
#[derive(Debug, Deserialize)]
pub(crate) struct DeadLettersQuery {
    queue: Option<String>,
    offset: Option<usize>,
    done: Option<String>,
}

/// `/dead-letters`: one queue's dead letters, with requeue and purge buttons.
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    Query(query): Query<DeadLettersQuery>,
) -> Page200 {
    let queues = state.admin.queues().await.unwrap_or_default();
    let current = query
        .queue
        .clone()
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| state.admin.config().default_queue.clone());
    let offset = query.offset.unwrap_or(0);
    let mut body = String::from("<h1>Dead letters</h1>");
    if let Some(done) = query.done.as_deref().filter(|d| !d.is_empty()) {
        let _ = write!(
            body,
            "<p class=\"flash\" id=\"flash\">{}</p>",
            Esc(&cut(done, CELL))
        );
    }
    body.push_str("<div class=\"tabs\">");
    let mut listed_current = false;
    for queue in &queues {
        listed_current |= queue.name == current;
        let on = if queue.name == current {
            " class=\"on\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<a href=\"/dead-letters?queue={}\"{on}>{} ({})</a>",
            Url(&queue.name),
            Esc(&queue.name),
            queue.dead_letters
        );
    }
    if !listed_current {
        let _ = write!(
            body,
            "<a class=\"on\" href=\"/dead-letters?queue={}\">{}</a>",
            Url(&current),
            Esc(&current)
        );
    }
    body.push_str("</div>");
    let listed = match state
        .admin
        .dead_letters(
            Some(&current),
            Page {
                offset,
                limit: PAGE_SIZE,
            },
        )
        .await
    {
        Ok(listed) => listed,
        Err(error) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Nav::DeadLetters,
                &error.to_string(),
            )
        }
    };
    let csrf = Esc(&state.security.csrf).to_string();
    let queue_field = format!(
        "<input type=\"hidden\" name=\"queue\" value=\"{}\">",
        Esc(&current)
    );
    let _ = write!(
        body,
        "<section class=\"card\"><p>\
         <form class=\"inline\" method=\"post\" action=\"/dead-letters/requeue\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{queue_field}\
         <button id=\"requeue-all\" type=\"submit\">Requeue all</button></form> \
         <form class=\"inline\" method=\"post\" action=\"/dead-letters/purge\" \
         data-confirm=\"Delete every dead letter of this queue?\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{queue_field}\
         <button class=\"danger\" id=\"purge\" type=\"submit\">Purge</button></form></p>"
    );
    if listed.items.is_empty() {
        body.push_str(
            "<p class=\"muted\" id=\"no-dead-letters\">No dead letters in this queue.</p>",
        );
    } else {
        body.push_str(
            "<table id=\"dead-letters-table\"><tr><th>Id</th><th>Task</th><th>Reason</th>\
             <th>Args</th><th class=\"num\">Size</th><th></th></tr>",
        );
        for letter in &listed.items {
            let args = letter
                .signature
                .as_ref()
                .map(|s| args_text(&s.args))
                .unwrap_or_else(|| letter.body_preview.clone());
            let link = if letter.signature.is_some() {
                format!(
                    "<a href=\"/tasks/{}\"><code>{}</code></a>",
                    Url(&letter.id),
                    Esc(&letter.id)
                )
            } else {
                format!("<code>{}</code>", Esc(&letter.id))
            };
            let _ = write!(
                body,
                "<tr data-id=\"{id}\"><td>{link}</td><td>{name}</td><td class=\"err reason\">{reason}</td>\
                 <td><code>{args}</code></td><td class=\"num\">{size}</td><td>\
                 <form class=\"inline\" method=\"post\" action=\"/dead-letters/requeue\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{queue_field}\
                 <input type=\"hidden\" name=\"id\" value=\"{id}\">\
                 <button class=\"requeue\" type=\"submit\">Requeue</button></form></td></tr>",
                id = Esc(&letter.id),
                name = Esc(letter.task_name.as_deref().unwrap_or("")),
                reason = Esc(&cut(&letter.reason, CELL * 2)),
                args = Esc(&cut(&args, CELL)),
                size = letter.size,
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<div class=\"pager\">");
    if offset > 0 {
        let _ = write!(
            body,
            "<a id=\"prev-page\" href=\"/dead-letters?queue={}&amp;offset={}\">← previous</a>",
            Url(&current),
            offset.saturating_sub(PAGE_SIZE)
        );
    }
    if let Some(next) = listed.next {
        let _ = write!(
            body,
            "<a id=\"next-page\" href=\"/dead-letters?queue={}&amp;offset={}\">next →</a>",
            Url(&current),
            next.offset
        );
    }
    body.push_str("</div></section>");
    ok("Dead letters", Nav::DeadLetters, &body)
}

/// The form of the dead-letter buttons (the CSRF token is checked before).
#[derive(Debug, Deserialize)]
pub(crate) struct DeadLetterForm {
    queue: String,
    id: Option<String>,
}

fn back_to(queue: &str, done: &str) -> Redirect {
    Redirect::to(&format!(
        "/dead-letters?queue={}&done={}",
        Url(queue),
        Url(done)
    ))
}

/// `POST /dead-letters/requeue`: one message (`id`) or all.
pub(crate) async fn requeue(
    State(state): State<AppState>,
    Form(form): Form<DeadLetterForm>,
) -> Response {
    let which = match form.id.filter(|id| !id.is_empty()) {
        Some(id) => Selection::Ids(vec![id]),
        None => Selection::All,
    };
    match state
        .admin
        .requeue(Some(&form.queue), &which, &mut |_| {})
        .await
    {
        Ok(report) => {
            let mut done = format!("Requeued {}.", report.requeued);
            if !report.not_found.is_empty() {
                let _ = write!(done, " Not found: {}.", report.not_found.join(", "));
            }
            if report.skipped > 0 {
                let _ = write!(done, " Left {} that are no task.", report.skipped);
            }
            back_to(&form.queue, &done).into_response()
        }
        Err(error) => error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            Nav::DeadLetters,
            &error.to_string(),
        )
        .into_response(),
    }
}

/// `POST /dead-letters/purge`.
pub(crate) async fn purge_dead_letters(
    State(state): State<AppState>,
    Form(form): Form<DeadLetterForm>,
) -> Response {
    match state.admin.purge_dead_letters(Some(&form.queue)).await {
        Ok(purged) => back_to(&form.queue, &format!("Purged {purged}.")).into_response(),
        Err(error) => error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            Nav::DeadLetters,
            &error.to_string(),
        )
        .into_response(),
    }
}

/// `/login`: the token form (straight to the overview when no token is required).
pub(crate) async fn login_form(State(state): State<AppState>) -> Response {
    if state.security.token.is_none() {
        return Redirect::to("/").into_response();
    }
    login_page(&state, StatusCode::OK, "")
}

/// The login form, with `message` above it when not empty.
fn login_page(state: &AppState, status: StatusCode, message: &str) -> Response {
    let note = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"err\" id=\"error\">{}</p>", Esc(message))
    };
    let body = format!(
        "<h1>Sign in</h1><section class=\"card\">{note}\
         <form method=\"post\" action=\"/login\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <p><label>Token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\"></label> \
         <button type=\"submit\" id=\"sign-in\">Sign in</button></p></form>\
         <p class=\"muted\">The token is the dashboard's <code>DASHBOARD_TOKEN</code>.</p></section>",
        Esc(&state.security.csrf)
    );
    (status, Html(page("Sign in", Nav::None, &body))).into_response()
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

/// `POST /login`: sets the session cookie when the token is right.
pub(crate) async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    if state.security.token.is_none() {
        return Redirect::to("/").into_response();
    }
    if !state.security.token_matches(&form.token) {
        return login_page(&state, StatusCode::UNAUTHORIZED, "Wrong token.");
    }
    let mut response = Redirect::to("/").into_response();
    if let Some(cookie) = auth::session_cookie(&form.token) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Everything else.
pub(crate) async fn not_found() -> Page200 {
    error_page(StatusCode::NOT_FOUND, Nav::None, "No such page.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_char_boundaries() {
        assert_eq!(cut("héllo", 2), "hé…");
        assert_eq!(cut("hi", 2), "hi");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
    }
}
