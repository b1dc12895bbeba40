//! The reader against a real tansu broker: catch up to the end, follow what comes
//! next, and refuse a topic that does not exist.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use fleetgate_test_support::Broker;
use fleetgate_topic::{ReadOptions, TopicError, TopicReader};
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;

const TOPIC: &str = "fleet.device-state.v1";

fn config(broker: &Broker) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", broker.bootstrap());
    c
}

fn key(msg: &impl Message) -> String {
    String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned()
}

#[test]
fn catches_up_then_follows_later_records() {
    let broker = Broker::start().expect("starting tansu");
    let keys = ["a", "b", "c", "d", "e"];
    for k in keys {
        broker
            .produce(TOPIC, k, format!("payload {k}").as_bytes())
            .expect("producing");
    }

    let opts = ReadOptions::default();
    let mut reader =
        TopicReader::open(&config(&broker), TOPIC, opts.request_timeout).expect("opening");
    let mut seen = Vec::new();
    let read = reader
        .catch_up(&opts, |msg| {
            assert_eq!(
                msg.payload(),
                Some(format!("payload {}", key(msg)).as_bytes())
            );
            seen.push(key(msg));
        })
        .expect("catching up");
    seen.sort();
    assert_eq!(read, keys.len());
    assert_eq!(seen, keys);
    // Nothing new: a second catch-up reads nothing and does not re-read.
    assert_eq!(reader.catch_up(&opts, |_| {}).expect("again"), 0);

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let follower = {
        let stop = stop.clone();
        std::thread::spawn(move || reader.follow(&stop, |msg| tx.send(key(msg)).expect("send")))
    };
    broker.produce(TOPIC, "later", b"x").expect("producing");
    let followed = rx.recv_timeout(Duration::from_secs(15));
    stop.store(true, Ordering::Relaxed);
    follower.join().expect("follower thread");
    assert_eq!(followed.as_deref(), Ok("later"));
    assert!(rx.try_recv().is_err(), "only the later record is followed");
}

#[test]
fn missing_topic_is_its_own_error() {
    let broker = Broker::start().expect("starting tansu");
    let err = TopicReader::open(&config(&broker), "no.such.topic", Duration::from_secs(10))
        .err()
        .expect("a missing topic must not open");
    assert!(
        matches!(&err, TopicError::MissingTopic(t) if t == "no.such.topic"),
        "{err:?}"
    );
    assert!(err.to_string().contains("no.such.topic"), "{err}");
}
