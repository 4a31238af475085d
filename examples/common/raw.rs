//! The raw lapin consumer the benchmarks measure machinery against, one definition for all.

use futures_util::StreamExt;
use lapin::options::BasicAckOptions;

/// The raw consumer: `tasks` deliveries, acked with `multiple = true` every 32.
pub async fn consume_acking(
    consumer: &mut lapin::Consumer,
    channel: &lapin::Channel,
    tasks: usize,
) {
    let mut n = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.expect("delivery");
        n += 1;
        if n % 32 == 0 || n == tasks {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
        if n == tasks {
            break;
        }
    }
}
