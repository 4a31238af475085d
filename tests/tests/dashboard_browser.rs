//! The web dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
//! driven over WebDriver), against RabbitMQ and Redis (DB 13): send tasks, open the overview,
//! find a task by UUID and read its state, follow a chain link, check a hostile error message
//! renders as text, requeue a dead letter with its button and watch it reach SUCCESS, purge
//! another through the confirmation dialog; sign in with the token on the login form. Each
//! page's screenshot is saved under `target/screenshots/` (the paths are printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::Locator;
use machinery::admin::Admin;
use machinery::dashboard::Dashboard;
use machinery::testing::{BackendOp, Fault, FaultyBackend};
use machinery::{task, Config, Server};

use browser::Browser;

const DB: u32 = 13;
const SHOW: Duration = Duration::from_secs(20);

#[task]
fn dash_add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
fn dash_double(#[chained] x: i64) -> i64 {
    x * 2
}

#[task]
fn dash_fail(message: String) -> Result<(), String> {
    Err(message)
}

fn config() -> Config {
    let mut config = common::unique_config("dash_browser");
    config.result_backend = format!("{}{DB}", common::redis_url());
    config.registry.heartbeat = Duration::from_millis(500);
    config
}

/// Waits until `check` holds, polling every 100 ms.
async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A dead letter that runs when requeued: a worker whose result store fails every write
/// cannot settle the task, and with `max_deliveries` 1 dead-letters it at once; nothing is
/// stored, so the requeued copy runs as a first delivery.
async fn dead_letter_one(config: &Config, server: &Server, admin: &Admin, nth: u64) -> String {
    let mut faulty_config = config.clone();
    faulty_config.max_deliveries = 1;
    // Gives up on the failing store at once instead of riding out an "outage".
    faulty_config.store_retry_timeout = Duration::from_millis(100);
    let backend = FaultyBackend::new(server.backend().expect("a result backend").clone());
    backend.arm(BackendOp::Transition, Fault::always());
    backend.arm(BackendOp::SetState, Fault::always());
    let faulty = Server::from_parts(
        faulty_config,
        server.broker().clone(),
        Some(Arc::new(backend) as Arc<dyn machinery::backend::ResultBackend>),
    );
    let worker = faulty
        .worker()
        .name("dash-faulty")
        .concurrency(1)
        .spawn()
        .await
        .expect("the faulty worker");
    let sent = server.send(dash_add::signature(40, 2)).await.expect("send");
    let uuid = sent.task_uuid().to_owned();
    until("the dead letter", Duration::from_secs(60), || async {
        admin
            .queue(&config.default_queue)
            .await
            .is_ok_and(|q| q.dead_letters >= nth)
    })
    .await;
    worker.shutdown().await.expect("stop the faulty worker");
    uuid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let config = config();
    let server = Server::new(config.clone()).await.expect("server");
    let admin = Admin::from_config(&config).await.expect("admin");
    let started = Instant::now();
    let dead_uuid = dead_letter_one(&config, &server, &admin, 1).await;
    let doomed_uuid = dead_letter_one(&config, &server, &admin, 2).await;
    println!(
        "dead-lettered {dead_uuid} and {doomed_uuid} in {:?}",
        started.elapsed()
    );

    let worker = server
        .worker()
        .name("dash-worker")
        .concurrency(4)
        .spawn()
        .await
        .expect("worker");
    let dashboard = Dashboard::new(admin.clone())
        .listen("127.0.0.1:0".parse().unwrap())
        .sample_every(Duration::from_millis(500))
        .spawn()
        .await
        .expect("dashboard");
    let base = format!("http://{}", dashboard.local_addr());

    // Send tasks: 20 additions, a chain, and a failure whose message is hostile markup.
    let mut sums = Vec::new();
    for i in 0..20 {
        sums.push(server.send(dash_add::signature(i, 1)).await.expect("send"));
    }
    let chain = server
        .send(dash_add::signature(1, 2).then(dash_double::signature()))
        .await
        .expect("send the chain");
    let payload = "boom <script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";
    let failing = server
        .send(dash_fail::signature(payload.to_owned()))
        .await
        .expect("send the failing task");
    for (i, sum) in (0..).zip(&sums) {
        assert_eq!(sum.get_timeout(common::WAIT).await.expect("a sum"), i + 1);
    }
    assert_eq!(chain.get_timeout(common::WAIT).await.expect("the chain"), 6);
    assert!(failing.get_timeout(common::WAIT).await.is_err());

    let started = Instant::now();
    let browser = Browser::start().await;
    println!("chromium session in {:?}", started.elapsed());
    let client = &browser.client;

    // The overview: the queue, the live worker, the chart drawn from the JSON endpoint.
    client
        .goto(&format!("{base}/"))
        .await
        .expect("open the overview");
    let queues = browser.text("#queues-table", SHOW).await;
    assert!(queues.contains(&config.default_queue), "{queues}");
    let deadline = Instant::now() + SHOW;
    loop {
        let workers = browser.text("#workers", SHOW).await;
        if workers.contains("dash-worker") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never showed: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client
        .wait()
        .at_most(SHOW)
        .for_element(Locator::Css("#chart svg path"))
        .await
        .expect("the throughput chart");

    // Find a task by UUID with the search box; its page shows SUCCESS and its result.
    let wanted = sums[7].task_uuid().to_owned();
    let search = client
        .find(Locator::Css("#search-uuid"))
        .await
        .expect("search box");
    search.send_keys(&wanted).await.expect("type the UUID");
    client
        .find(Locator::Css("#search-go"))
        .await
        .expect("search button")
        .click()
        .await
        .expect("search");
    browser.wait_text("#task-uuid", &wanted, SHOW).await;
    assert_eq!(browser.text("#task-state", SHOW).await, "SUCCESS");
    assert_eq!(browser.text("#task-results", SHOW).await, "int64:8");
    assert!(browser.text("#timeline", SHOW).await.contains("SUCCESS"));
    browser.screenshot("task").await;

    // A chain's page links its members: click through to the second.
    let first = chain.task_uuids()[0].clone();
    let second = chain.task_uuids()[1].clone();
    client
        .goto(&format!("{base}/tasks/{first}"))
        .await
        .expect("open the chain");
    let tree = browser.text("#tree", SHOW).await;
    assert!(tree.contains("dash_double"), "{tree}");
    browser.screenshot("chain").await;
    client
        .find(Locator::Css(&format!("#tree a[href='/tasks/{second}']")))
        .await
        .expect("a link to the chain's second task")
        .click()
        .await
        .expect("follow the link");
    browser.wait_text("#task-uuid", &second, SHOW).await;
    assert_eq!(browser.text("#task-state", SHOW).await, "SUCCESS");
    assert_eq!(browser.text("#task-results", SHOW).await, "int64:6");

    // The hostile error message is shown as text and runs nothing.
    client
        .goto(&format!("{base}/tasks/{}", failing.task_uuid()))
        .await
        .expect("open the failed task");
    assert_eq!(browser.text("#task-state", SHOW).await, "FAILURE");
    assert_eq!(browser.text("#task-error", SHOW).await, payload);
    let title = client
        .execute("return document.title", vec![])
        .await
        .expect("read the title");
    assert_eq!(title.as_str(), Some("Task · machinery"));
    let injected = client
        .find_all(Locator::Css("#task-error script, #task-error img"))
        .await
        .expect("query");
    assert!(injected.is_empty());

    // The recent tasks, by state.
    client
        .goto(&format!("{base}/tasks?state=success"))
        .await
        .expect("open the tasks");
    let listed = browser.text("#tasks-table", SHOW).await;
    assert!(
        listed.contains(&sums[19].task_uuid().to_owned()),
        "{listed}"
    );
    browser.screenshot("tasks").await;

    // The dead letter, its reason, and its requeue button; then it runs.
    client
        .goto(&format!(
            "{base}/dead-letters?queue={}",
            config.default_queue
        ))
        .await
        .expect("open the dead letters");
    let row = format!("tr[data-id='{dead_uuid}']");
    let reason = browser.text(&format!("{row} .reason"), SHOW).await;
    assert!(reason.contains("could not be settled"), "{reason}");
    browser.screenshot("dead-letters").await;
    client
        .find(Locator::Css(&format!("{row} button.requeue")))
        .await
        .expect("the requeue button")
        .click()
        .await
        .expect("requeue");
    browser.wait_text("#flash", "Requeued 1.", SHOW).await;
    // Purge asks first; dismissed, nothing happens; accepted, the other dead letter goes.
    let doomed = format!("tr[data-id='{doomed_uuid}']");
    browser.text(&doomed, SHOW).await;
    let purge = client
        .find(Locator::Css("#purge"))
        .await
        .expect("the purge button");
    purge.clone().click().await.expect("purge");
    client.dismiss_alert().await.expect("say no");
    assert!(client.find(Locator::Css(&doomed)).await.is_ok());
    purge.click().await.expect("purge");
    client.accept_alert().await.expect("say yes");
    browser.wait_text("#flash", "Purged 1.", SHOW).await;
    assert!(browser
        .text("#no-dead-letters", SHOW)
        .await
        .contains("No dead letters"));
    client
        .goto(&format!("{base}/tasks/{dead_uuid}"))
        .await
        .expect("open the requeued task");
    browser
        .reload_until("#task-state", "SUCCESS", Duration::from_secs(30))
        .await;
    assert_eq!(browser.text("#task-results", SHOW).await, "int64:42");
    browser.screenshot("requeued-task").await;

    // The overview once more, with rates sampled over the run.
    client
        .goto(&format!("{base}/"))
        .await
        .expect("open the overview");
    browser.text("#workers-table", SHOW).await;
    client
        .wait()
        .at_most(SHOW)
        .for_element(Locator::Css("#chart[data-drawn] svg path"))
        .await
        .expect("the chart");
    browser.screenshot("overview").await;
    // The chart redraws itself (every 5 s) without a reload.
    let drawn = client
        .find(Locator::Css("#chart"))
        .await
        .expect("the chart")
        .attr("data-drawn")
        .await
        .expect("its stamp");
    let deadline = Instant::now() + SHOW;
    loop {
        let now = client
            .find(Locator::Css("#chart"))
            .await
            .expect("the chart")
            .attr("data-drawn")
            .await
            .expect("its stamp");
        if now != drawn {
            break;
        }
        assert!(Instant::now() < deadline, "the chart was not redrawn");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    browser.close().await;
    dashboard.shutdown().await;
    worker.shutdown().await.expect("stop the worker");
    common::cleanup(&config).await;
}

/// With a token, a browser signs in on the login form and then sees every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_with_the_token() {
    let config = config();
    let admin = Admin::from_config(&config).await.expect("admin");
    let token = "browser-test-token-0123456789";
    let dashboard = Dashboard::new(admin)
        .listen("127.0.0.1:0".parse().unwrap())
        .token(Some(token.to_owned()))
        .spawn()
        .await
        .expect("dashboard");
    let base = format!("http://{}", dashboard.local_addr());
    let browser = Browser::start().await;
    let client = &browser.client;
    client.goto(&format!("{base}/tasks")).await.expect("open");
    // Sent to the login form; a wrong token is refused.
    let field = client
        .wait()
        .at_most(SHOW)
        .for_element(Locator::Css("#token"))
        .await
        .expect("the login form");
    field.send_keys("not-the-token").await.expect("type");
    browser.screenshot("login").await;
    client
        .find(Locator::Css("#sign-in"))
        .await
        .expect("sign in")
        .click()
        .await
        .expect("submit");
    browser.wait_text("#error", "Wrong token.", SHOW).await;
    let field = client
        .find(Locator::Css("#token"))
        .await
        .expect("the field");
    field.send_keys(token).await.expect("type");
    client
        .find(Locator::Css("#sign-in"))
        .await
        .expect("sign in")
        .click()
        .await
        .expect("submit");
    browser.wait_text("h1", "Overview", SHOW).await;
    // The session cookie opens the other pages too.
    client.goto(&format!("{base}/tasks")).await.expect("open");
    browser.wait_text("h1", "Recent tasks", SHOW).await;
    browser.close().await;
    dashboard.shutdown().await;
    common::cleanup(&config).await;
}
