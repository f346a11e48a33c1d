//! The RabbitMQ that `cargo xtask test` provisions is real and reachable through `lapin`: a
//! message published with a confirm comes back from a queue, and wrong credentials are refused
//! with an error rather than a hang.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn provisioned_rabbitmq_confirms_and_delivers_a_message() {
    let Some(url) = rylm_testkit::amqp_url("provisioned_rabbitmq_confirms_and_delivers_a_message")
    else {
        return;
    };
    let connection = tokio::time::timeout(
        DEADLINE,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ answers within the deadline")
    .expect("connects to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("publisher confirms");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a server-named queue");
    let body = "ünïcode payload".as_bytes();
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.name().as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_content_type("text/plain".into()),
        )
        .await
        .expect("publishes")
        .await
        .expect("the broker confirms");
    assert!(confirm.is_ack(), "the broker acknowledged the message");

    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            match channel
                .basic_get(
                    queue.name().as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get")
            {
                Some(message) => return message,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the message arrives within the deadline");
    assert_eq!(got.delivery.data, body);
    connection.close(200, "done".into()).await.expect("closes");
}

#[tokio::test]
async fn wrong_credentials_are_an_error_not_a_hang() {
    let Some(url) = rylm_testkit::amqp_url("wrong_credentials_are_an_error_not_a_hang") else {
        return;
    };
    let wrong = url.replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(wrong, url, "the provisioned URL carries guest credentials");
    let result = tokio::time::timeout(
        DEADLINE,
        Connection::connect(&wrong, ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ answers within the deadline");
    assert!(result.is_err(), "a wrong password must be refused");
}
