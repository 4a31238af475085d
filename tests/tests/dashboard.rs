//! The web dashboard over HTTP, against RabbitMQ and Redis (DB 13; the 100,000-task test has
//! DB 14 to itself): access with and without a token, CSRF on every POST, escaping of stored
//! values, and pagination of a full index.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use machinery::admin::Admin;
use machinery::dashboard::{Dashboard, DashboardHandle};
use machinery::wire::{State, TaskState};
use machinery::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DB: u32 = 13;
const BIG_DB: u32 = 14;

fn config(tag: &str, db: u32) -> Config {
    let mut config = common::unique_config(tag);
    config.result_backend = format!("{}{db}", common::redis_url());
    config
}

async fn start(config: &Config, token: Option<&str>) -> DashboardHandle {
    let admin = Admin::from_config(config).await.expect("admin");
    Dashboard::new(admin)
        .listen("127.0.0.1:0".parse().unwrap())
        .token(token.map(str::to_owned))
        .spawn()
        .await
        .expect("dashboard")
}

/// One HTTP/1.1 exchange: status, headers (lower-case names), body.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

/// The CSRF token written into a page's forms.
fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let at = page.find(marker).expect("a form with a CSRF token") + marker.len();
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn every_post_needs_the_csrf_token() {
    let config = config("dash_csrf", DB);
    let dashboard = start(&config, None).await;
    let addr = dashboard.local_addr();
    let page = http(addr, "GET", "/dead-letters", &[], "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = csrf_of(&page.body);
    let queue = &config.default_queue;
    // The token with its first character changed (a token that began with `0` made "0…" the
    // right token, and the test failed one run in sixteen).
    let first = if csrf.starts_with('0') { '1' } else { '0' };
    let forged = format!("{first}{}", &csrf[1..]);
    assert_ne!(forged, csrf);
    for path in [
        "/dead-letters/purge",
        "/dead-letters/requeue",
        "/tasks/task_x/revoke",
        "/login",
    ] {
        let missing = http(addr, "POST", path, &[], &format!("queue={queue}")).await;
        assert_eq!(
            missing.status, 403,
            "{path} without a token: {}",
            missing.body
        );
        let wrong = http(
            addr,
            "POST",
            path,
            &[],
            &format!("queue={queue}&csrf={forged}"),
        )
        .await;
        assert_eq!(
            wrong.status, 403,
            "{path} with a wrong token: {}",
            wrong.body
        );
        let header = http(
            addr,
            "POST",
            path,
            &[("X-CSRF-Token", "nope")],
            &format!("queue={queue}"),
        )
        .await;
        assert_eq!(
            header.status, 403,
            "{path} with a wrong header: {}",
            header.body
        );
    }
    // The right token goes through: the purge is done and answered with a redirect.
    let purged = http(
        addr,
        "POST",
        "/dead-letters/purge",
        &[],
        &format!("queue={queue}&csrf={csrf}"),
    )
    .await;
    assert_eq!(purged.status, 303, "{}", purged.body);
    assert!(
        purged.headers["location"].contains("done=Purged%200"),
        "{:?}",
        purged.headers
    );
    // The revoke button's POST, with the token: the task is revoked.
    let victim = format!("task_{}", uuid::Uuid::new_v4());
    let revoked = http(
        addr,
        "POST",
        &format!("/tasks/{victim}/revoke"),
        &[],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(revoked.status, 303, "{}", revoked.body);
    let page = http(addr, "GET", &format!("/tasks/{victim}"), &[], "").await;
    assert!(
        page.body
            .contains("<pre id=\"task-error\" class=\"err\">revoked</pre>"),
        "{}",
        page.body
    );
    // State never changes on GET.
    let get = http(addr, "GET", "/dead-letters/purge", &[], "").await;
    assert_eq!(get.status, 405);
    dashboard.shutdown().await;
    common::cleanup(&config).await;
}

#[tokio::test]
async fn a_token_guards_every_page() {
    let config = config("dash_token", DB);
    // A non-loopback address without a token: refused before anything is bound.
    let admin = Admin::from_config(&config).await.expect("admin");
    let refused = Dashboard::new(admin)
        .listen("0.0.0.0:0".parse().unwrap())
        .spawn()
        .await
        .expect_err("a public address without a token must be refused");
    assert!(refused.to_string().contains("DASHBOARD_TOKEN"), "{refused}");

    let token = "dashboard-test-token-0123456789";
    let dashboard = start(&config, Some(token)).await;
    let addr = dashboard.local_addr();
    // Without the token: pages go to the login form, data answers 401.
    let page = http(addr, "GET", "/tasks", &[], "").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.headers["location"], "/login");
    let data = http(addr, "GET", "/api/throughput", &[], "").await;
    assert_eq!(data.status, 401);
    let wrong = http(
        addr,
        "GET",
        "/",
        &[("Authorization", "Bearer dashboard-test-token-0123456788")],
        "",
    )
    .await;
    assert_eq!(wrong.status, 303);
    // The stylesheet and script are public (the login form uses them).
    let script = http(addr, "GET", "/assets/dashboard.js", &[], "").await;
    assert_eq!(script.status, 200);
    assert!(script.headers["content-type"].starts_with("text/javascript"));
    // The header.
    let bearer = format!("Bearer {token}");
    let page = http(addr, "GET", "/", &[("Authorization", &bearer)], "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<h1>Overview</h1>"));
    // `?token=` once: a cookie and a redirect to the page without it.
    let once = http(
        addr,
        "GET",
        &format!("/tasks?state=failure&token={token}"),
        &[],
        "",
    )
    .await;
    assert_eq!(once.status, 303);
    assert_eq!(once.headers["location"], "/tasks?state=failure");
    let cookie = once.headers["set-cookie"]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(once.headers["set-cookie"].contains("HttpOnly"));
    assert!(once.headers["set-cookie"].contains("SameSite=Strict"));
    let page = http(
        addr,
        "GET",
        "/tasks?state=failure",
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    // The login form: a wrong token is refused, the right one sets the cookie.
    let form = http(addr, "GET", "/login", &[], "").await;
    assert_eq!(form.status, 200);
    let csrf = csrf_of(&form.body);
    let refused = http(
        addr,
        "POST",
        "/login",
        &[],
        &format!("csrf={csrf}&token=nope"),
    )
    .await;
    assert_eq!(refused.status, 401);
    assert!(!refused.headers.contains_key("set-cookie"));
    let signed_in = http(
        addr,
        "POST",
        "/login",
        &[],
        &format!("csrf={csrf}&token={token}"),
    )
    .await;
    assert_eq!(signed_in.status, 303);
    assert!(signed_in.headers["set-cookie"].starts_with("machinery_dashboard="));
    dashboard.shutdown().await;
    common::cleanup(&config).await;
}

#[tokio::test]
async fn without_a_token_only_loopback_host_names_are_served() {
    let config = config("dash_host", DB);
    let dashboard = start(&config, None).await;
    let addr = dashboard.local_addr();
    let rebound = http(addr, "GET", "/", &[("Host", "attacker.example:8080")], "").await;
    assert_eq!(rebound.status, 403);
    let local = http(addr, "GET", "/", &[("Host", "localhost:8080")], "").await;
    assert_eq!(local.status, 200);
    dashboard.shutdown().await;
    common::cleanup(&config).await;
}

const XSS: &str = r#"<script>document.title='pwned'</script><img src=x onerror="alert(1)">"#;

#[tokio::test]
async fn stored_values_render_as_text() {
    let config = config("dash_xss", DB);
    let admin = Admin::from_config(&config).await.expect("admin");
    let backend = admin.server().backend().expect("a result backend").clone();
    let uuid = format!("task_{}", uuid::Uuid::new_v4());
    let mut state = TaskState::new(&uuid, State::Failure);
    state.task_name = format!("evil{XSS}");
    state.error = format!("boom {XSS}");
    backend.set_state(state).await.expect("store");
    // Listed in the recent index as the workers list it (the admin module's key, scored in µs).
    let mut redis = redis::Client::open(config.result_backend.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    let _: () = redis::cmd("ZADD")
        .arg("machinery-rs:recent:failure")
        .arg(now)
        .arg(&uuid)
        .query_async(&mut redis)
        .await
        .unwrap();

    let dashboard = start(&config, None).await;
    let addr = dashboard.local_addr();
    let escaped = "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;&lt;img src=x onerror=&quot;alert(1)&quot;&gt;";
    let page = http(addr, "GET", &format!("/tasks/{uuid}"), &[], "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(&format!("boom {escaped}")),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(&format!("evil{escaped}")),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>document"), "{}", page.body);
    assert!(!page.body.contains("<img src=x"), "{}", page.body);
    // And should anything slip through, the browser runs no inline code and no frame shows it.
    let policy = &page.headers["content-security-policy"];
    assert!(policy.contains("default-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(!page.body.contains("<script>"), "no inline script");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["referrer-policy"], "no-referrer");
    let list = http(addr, "GET", "/tasks?state=failure", &[], "").await;
    assert!(list.body.contains(&uuid), "{}", list.body);
    assert!(!list.body.contains("<script>document"), "{}", list.body);
    assert!(!list.body.contains("<img src=x"), "{}", list.body);
    // A UUID full of markup in the path is escaped as well.
    let odd = http(addr, "GET", "/tasks/%3Cscript%3Ex%3C%2Fscript%3E", &[], "").await;
    assert!(!odd.body.contains("<script>x"), "{}", odd.body);
    let _: () = redis::cmd("ZREM")
        .arg("machinery-rs:recent:failure")
        .arg(&uuid)
        .query_async(&mut redis)
        .await
        .unwrap();
    dashboard.shutdown().await;
    common::cleanup(&config).await;
}

/// The tasks page with 100,000 ids in the index: one page of 50 and a link to the next, in
/// time that does not grow with the index.
#[tokio::test]
async fn the_tasks_page_stays_one_page_with_100_000_tasks() {
    let config = config("dash_big", BIG_DB);
    let mut redis = redis::Client::open(config.result_backend.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut redis).await.unwrap();
    let key = "machinery-rs:recent:success";
    let now = chrono::Utc::now().timestamp_micros();
    let filled = Instant::now();
    for batch in 0..10 {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(key);
        for i in 0..10_000i64 {
            let n = batch * 10_000 + i;
            zadd.arg(now - 100_000 + n).arg(format!("task_{n:06}"));
        }
        let _: () = zadd.query_async(&mut redis).await.unwrap();
    }
    let count: u64 = redis::cmd("ZCARD")
        .arg(key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(count, 100_000);
    println!(
        "filled the index with 100,000 ids in {:?}",
        filled.elapsed()
    );
    // The newest 100 have stored states, as after a real run (the rest read as expired).
    let admin = Admin::from_config(&config).await.expect("admin");
    let backend = admin.server().backend().expect("a result backend").clone();
    let states = (99_900..100_000)
        .map(|n| {
            let mut state = TaskState::new(format!("task_{n:06}"), State::Success);
            state.task_name = "dash_big".to_owned();
            state
        })
        .collect();
    backend
        .set_states(states)
        .await
        .expect("store the newest states");

    let dashboard = start(&config, None).await;
    let addr = dashboard.local_addr();
    let _warm = http(addr, "GET", "/tasks?state=success", &[], "").await;
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let started = Instant::now();
        let page = http(addr, "GET", "/tasks?state=success", &[], "").await;
        times.push(started.elapsed());
        last = Some(page);
    }
    let page = last.unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.body.matches("<tr><td><a href=\"/tasks/").count(), 50);
    assert!(page.body.contains("task_099999"), "newest first");
    assert_eq!(
        page.body.matches("<td>dash_big</td>").count(),
        50,
        "with their states"
    );
    assert!(!page.body.contains("task_099949"), "only one page");
    assert!(page.body.contains("1–50 of 100000"), "{}", page.body);
    assert!(page
        .body
        .contains("id=\"next-page\" href=\"/tasks?state=success&amp;offset=50\""));
    // The last page: the same cost.
    let started = Instant::now();
    let deep = http(addr, "GET", "/tasks?state=success&offset=99950", &[], "").await;
    let deep_time = started.elapsed();
    assert_eq!(deep.body.matches("<tr><td><a href=\"/tasks/").count(), 50);
    assert!(deep.body.contains("task_000000"));
    assert!(!deep.body.contains("id=\"next-page\""));
    times.sort();
    println!(
        "tasks page with 100,000 indexed: median {:?} (of {:?}); last page {:?}; {} bytes",
        times[1],
        times,
        deep_time,
        page.body.len()
    );
    assert!(times[1] < Duration::from_secs(2), "{times:?}");
    let _: () = redis::cmd("FLUSHDB").query_async(&mut redis).await.unwrap();
    dashboard.shutdown().await;
    common::cleanup(&config).await;
}

/// The same pages on the Redis broker (Go's list layout): a message that is no task is
/// dead-lettered by the worker, listed with its reason, left alone by a requeue (it would only
/// be dead-lettered again), and purged.
#[tokio::test]
async fn the_pages_work_on_the_redis_broker() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("dash_rb_{}", &id[..10]);
    let redis_url = format!("{}{DB}", common::redis_url());
    let mut config = Config::builder()
        .broker(&redis_url)
        .result_backend(&redis_url)
        .default_queue(&queue)
        .build()
        .unwrap();
    config.redis.delayed_tasks_key = format!("{queue}.delayed");
    let server = machinery::Server::new(config.clone())
        .await
        .expect("server");
    let worker = server
        .worker()
        .name("dash-rb-worker")
        .spawn()
        .await
        .expect("worker");
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&queue)
        .arg("<b>not a task</b>")
        .query_async(&mut redis)
        .await
        .unwrap();
    let admin = Admin::from_config(&config).await.expect("admin");
    let deadline = Instant::now() + common::WAIT;
    while admin
        .queue(&queue)
        .await
        .map(|q| q.dead_letters)
        .unwrap_or(0)
        < 1
    {
        assert!(
            Instant::now() < deadline,
            "the message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dashboard = start(&config, None).await;
    let addr = dashboard.local_addr();
    let overview = http(addr, "GET", "/partials/queues", &[], "").await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(
        overview.body.contains(&format!("data-queue=\"{queue}\"")),
        "{}",
        overview.body
    );
    let page = http(
        addr,
        "GET",
        &format!("/dead-letters?queue={queue}"),
        &[],
        "",
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("&lt;b&gt;not a task&lt;/b&gt;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<b>not a task"), "{}", page.body);
    let csrf = csrf_of(&page.body);
    let requeued = http(
        addr,
        "POST",
        "/dead-letters/requeue",
        &[],
        &format!("csrf={csrf}&queue={queue}"),
    )
    .await;
    assert_eq!(requeued.status, 303, "{}", requeued.body);
    assert!(
        requeued.headers["location"].contains("Requeued%200.%20Left%201"),
        "{:?}",
        requeued.headers
    );
    let purged = http(
        addr,
        "POST",
        "/dead-letters/purge",
        &[],
        &format!("csrf={csrf}&queue={queue}"),
    )
    .await;
    assert!(
        purged.headers["location"].contains("done=Purged%201."),
        "{:?}",
        purged.headers
    );
    assert_eq!(admin.queue(&queue).await.unwrap().dead_letters, 0);

    dashboard.shutdown().await;
    worker.shutdown().await.expect("stop the worker");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{queue}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}
