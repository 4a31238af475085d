//! The RabbitMQ broker behind a slow link (`machinery::testing::SlowLink`): a broker that
//! answers late must not cost a message.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{amqp_url, cleanup, queue_depth, queue_probe, raw_channel, unique_config};
use machinery::broker::amqp::AmqpBroker;
use machinery::broker::{Broker, Message};
use machinery::testing::SlowLink;
use machinery::Config;

/// A link to the test RabbitMQ, and `config` pointed through it (the same credentials and
/// virtual host).
async fn slow(mut config: Config) -> (SlowLink, Config) {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").expect("AMQP_URL has a scheme");
    let (userinfo, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let target = tokio::net::lookup_host(authority)
        .await
        .expect("AMQP_URL's host")
        .next()
        .expect("an address");
    let link = SlowLink::start(target).await.unwrap();
    let at = if userinfo.is_empty() { "" } else { "@" };
    config.broker = format!("{scheme}://{userinfo}{at}{}{path}", link.addr());
    (link, config)
}

/// Waits until `queue` holds `n` messages, or gives up after `within`; returns the last count.
async fn settles_at(queue: &str, n: u32, within: Duration) -> u32 {
    let (_conn, channel) = raw_channel().await;
    let deadline = Instant::now() + within;
    loop {
        let depth = queue_depth(&channel, queue).await;
        if depth >= n || Instant::now() > deadline {
            return depth;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_message_outlives_its_delay_queue_on_a_slow_broker() {
    // Go declares a delay queue with `x-expires` = 2 * delay (v2/brokers/amqp/amqp.go `delay`),
    // and publishing to it does not count as use: a message that reaches the queue late in that
    // lease (the declaration answered late, the publish slow to arrive) is deleted with the
    // queue before its delay is over. Here the link holds each byte 30 ms each way: a delayed
    // message of 100 ms reaches the broker 150 ms after the declaration it relied on, and would
    // leave at 250 ms, after the queue expired (230 ms).
    let (link, config) = slow(unique_config("slow_delay")).await;
    let broker = Arc::new(AmqpBroker::connect(&config).await.unwrap());
    link.set_latency(Duration::from_millis(30));
    let key = config.amqp.binding_key.clone();
    let mut sent = 0u32;
    // Alone, in bursts, and in bursts after the queue expired.
    for round in 0..6u32 {
        let burst = 1 + round % 3;
        let publishes = (0..burst).map(|_| {
            let mut message = Message::new(key.clone(), b"{}".to_vec());
            message.delay = Some(Duration::from_millis(100));
            let broker = broker.clone();
            async move { broker.publish(message).await }
        });
        for outcome in futures_util::future::join_all(publishes).await {
            outcome.unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(if round % 2 == 0 { 60 } else { 400 })).await;
    }
    let arrived = settles_at(&config.default_queue, sent, Duration::from_secs(10)).await;
    assert_eq!(arrived, sent, "delayed messages lost on a slow broker");
    // Kept while it may hold a message, no longer: the queue expires once its lease is over.
    let delay_queue = AmqpBroker::delay_queue(100, &config.amqp.exchange, &key);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Asked less often than it expires (200 ms): a passive declaration renews it too.
    while queue_probe(&delay_queue).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "{delay_queue} is kept declared without end"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(broker);
    drop(link);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_concurrent_publish_gets_its_own_return() {
    // RabbitMQ returns an unroutable `mandatory` message (basic.return), then acknowledges it,
    // and may acknowledge several publishes at once (`multiple`). lapin hands a return to
    // whichever confirm of that range it completes first (lapin 4 `Acknowledgements::
    // complete_pending`): a routed message could be reported unroutable, and an unroutable one
    // reported sent, then silently dropped. Publishes to a bound and an unbound key, all at
    // once on one broker, must each get their own outcome.
    let (link, config) = slow(unique_config("returns")).await;
    let broker = Arc::new(AmqpBroker::connect(&config).await.unwrap());
    link.set_latency(Duration::from_millis(5));
    let bound = config.amqp.binding_key.clone();
    let mut wrong = Vec::new();
    let mut routed = 0u32;
    for round in 0..20 {
        let publishes = (0..400u32).map(|i| {
            let to_nowhere = i % 3 == 0;
            let key = if to_nowhere {
                "nobody_binds_this_key".to_owned()
            } else {
                bound.clone()
            };
            let message =
                Message::new(key, format!("{{\"round\":{round},\"n\":{i}}}").into_bytes());
            let broker = broker.clone();
            async move { (to_nowhere, broker.publish(message).await) }
        });
        for (to_nowhere, outcome) in futures_util::future::join_all(publishes).await {
            match (to_nowhere, &outcome) {
                (false, Ok(())) => routed += 1,
                (true, Err(e)) if e.kind() == machinery::ErrorKind::Rejected => {}
                _ => wrong.push(format!("to nowhere: {to_nowhere}, outcome: {outcome:?}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} publishes got another's outcome: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(
        settles_at(&config.default_queue, routed, Duration::from_secs(10)).await,
        routed
    );
    drop(broker);
    drop(link);
    cleanup(&config).await;
}
