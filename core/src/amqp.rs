//! RabbitMQ: the dispatch fabric. A message says "these jobs are due", nothing more; the
//! jobs themselves live in PostgreSQL.
//!
//! Topology: two durable classic queues with `x-max-priority = 9`, published to through
//! the default exchange: the job queue (default `pinq.jobs`), and beside it the urgent
//! queue (`pinq.jobs.urgent`), which carries the messages of priority
//! `PINQ_URGENT_PRIORITY` (default 8) and above. Every worker consumes both, each on a
//! channel with a prefetch window of its own. RabbitMQ orders by priority only the
//! messages it has not delivered yet, so in one queue an urgent message would wait until
//! a worker acknowledged one of the lower-priority messages filling its window, which
//! with slow pins takes as long as a whole message's pins; on a queue of its own it is
//! delivered at once. Messages are persistent, carry the job's priority, and are published
//! with publisher confirms: a publish counts only once the broker acknowledged it.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::model::Priority;

/// Highest message priority the queue honours.
pub const MAX_PRIORITY: u8 = Priority::MAX;

/// The urgent queue beside `queue`: where messages of the urgent priorities go.
pub fn urgent_queue(queue: &str) -> String {
    format!("{queue}.urgent")
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a group of publishes may wait for the broker's confirms.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// The body of a job message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub jobs: Vec<Uuid>,
}

impl JobMessage {
    /// The encoded body of a message for one job.
    pub fn single(id: Uuid) -> Vec<u8> {
        Self::encode(&[id])
    }

    /// The encoded body of a message for several jobs.
    pub fn encode(ids: &[Uuid]) -> Vec<u8> {
        let mut out = String::with_capacity(12 + ids.len() * 39);
        out.push_str(r#"{"jobs":["#);
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(&id.to_string());
            out.push('"');
        }
        out.push_str("]}");
        out.into_bytes()
    }
}

/// Groups jobs into messages: consecutive jobs of one priority share a message of at most
/// `per_message` ids. Order is kept, so a batch's jobs are dispatched in submission order.
pub fn group_messages(jobs: &[(Uuid, Priority)], per_message: usize) -> Vec<(Priority, Vec<Uuid>)> {
    let per_message = per_message.max(1);
    let mut out: Vec<(Priority, Vec<Uuid>)> = Vec::new();
    for (id, priority) in jobs {
        match out.last_mut() {
            Some((p, ids)) if p == priority && ids.len() < per_message => ids.push(*id),
            _ => out.push((*priority, vec![*id])),
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("could not reach RabbitMQ within {0:?}")]
    ConnectTimeout(Duration),
    #[error("RabbitMQ did not confirm the publish within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("RabbitMQ refused (nacked) a publish")]
    Nacked,
    #[error("RabbitMQ error: {0}")]
    Broker(#[from] lapin::Error),
}

/// Opens a connection with a bounded wait.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(AmqpError::ConnectTimeout(CONNECT_TIMEOUT)),
    }
}

/// Declares the job queue (idempotent: every process declares it on connect).
pub async fn declare_queue(channel: &Channel, queue: &str) -> Result<(), AmqpError> {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions::durable(),
            args,
        )
        .await?;
    Ok(())
}

/// Messages waiting in the queue (not counting unacknowledged ones).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, AmqpError> {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    let q = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions::default().passive(),
            args,
        )
        .await?;
    Ok(q.message_count())
}

/// A consumer on one channel of a worker's connection.
pub struct QueueConsumer {
    pub channel: Channel,
    pub consumer: Consumer,
}

/// Opens one connection with a consuming channel per queue: each declares its queue, sets
/// its own prefetch bound and starts a consumer tagged `tag`. The connection is returned so
/// the caller can close it.
pub async fn open_consumers(
    url: &str,
    queues: &[String],
    prefetch: u16,
    tag: &str,
) -> Result<(Connection, Vec<QueueConsumer>), AmqpError> {
    let conn = connect(url, tag).await?;
    match consume_each(&conn, queues, prefetch, tag).await {
        Ok(consumers) => Ok((conn, consumers)),
        Err(e) => {
            let _ = conn.close(320, "could not start consuming".into()).await;
            Err(e)
        }
    }
}

async fn consume_each(
    conn: &Connection,
    queues: &[String],
    prefetch: u16,
    tag: &str,
) -> Result<Vec<QueueConsumer>, AmqpError> {
    let mut consumers = Vec::with_capacity(queues.len());
    for queue in queues {
        let channel = conn.create_channel().await?;
        declare_queue(&channel, queue).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(queue.as_str()),
                ShortString::from(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(QueueConsumer { channel, consumer });
    }
    Ok(consumers)
}

struct Link {
    conn: Connection,
    channel: Channel,
}

/// A confirmed publisher that connects lazily and reconnects after any failure. Shared by
/// the API (fast path after a commit) and the scheduler's relay.
pub struct Publisher {
    url: String,
    queue: String,
    urgent_queue: String,
    /// Messages of this priority and above go to the urgent queue.
    urgent_priority: u8,
    message_jobs: usize,
    link: Mutex<Option<Link>>,
}

impl Publisher {
    /// A publisher to `queue`, and to its urgent queue for messages of `urgent_priority` and
    /// above, whose messages carry at most `message_jobs` job ids.
    pub fn new(url: &str, queue: &str, urgent_priority: u8, message_jobs: u16) -> Self {
        Publisher {
            url: url.to_owned(),
            queue: queue.to_owned(),
            urgent_queue: urgent_queue(queue),
            urgent_priority,
            message_jobs: usize::from(message_jobs.max(1)),
            link: Mutex::new(None),
        }
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn urgent_queue(&self) -> &str {
        &self.urgent_queue
    }

    /// Opens a connection and a confirming channel with the queue declared, all within
    /// [`CONNECT_TIMEOUT`] (the relay holds row locks while it waits here).
    async fn open(&self) -> Result<Link, AmqpError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.open_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(AmqpError::ConnectTimeout(CONNECT_TIMEOUT)),
        }
    }

    async fn open_unbounded(&self) -> Result<Link, AmqpError> {
        let conn = connect(&self.url, "pinq-publisher").await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_queue(&channel, &self.queue).await?;
        declare_queue(&channel, &self.urgent_queue).await?;
        Ok(Link { conn, channel })
    }

    /// Connects if not connected. Used by readiness checks.
    pub async fn ensure_connected(&self) -> Result<(), AmqpError> {
        let mut guard = self.link.lock().await;
        if guard
            .as_ref()
            .is_some_and(|l| l.conn.status().connected() && l.channel.status().connected())
        {
            return Ok(());
        }
        *guard = Some(self.open().await?);
        Ok(())
    }

    /// Messages ready in the job queue and in the urgent queue, asked over this
    /// publisher's connection (opened if needed). The queues always exist here: the
    /// publisher declared them on connecting.
    pub async fn queue_depths(&self) -> Result<(u32, u32), AmqpError> {
        self.ensure_connected().await?;
        let guard = self.link.lock().await;
        let Some(link) = guard.as_ref() else {
            return Err(AmqpError::ConnectTimeout(CONNECT_TIMEOUT));
        };
        Ok((
            queue_depth(&link.channel, &self.queue).await?,
            queue_depth(&link.channel, &self.urgent_queue).await?,
        ))
    }

    /// Publishes the jobs (grouped into messages by priority), pipelined, and waits until
    /// the broker confirmed every message. Any failure drops the connection so the next
    /// call starts afresh.
    pub async fn publish_jobs(&self, jobs: &[(Uuid, Priority)]) -> Result<(), AmqpError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut guard = self.link.lock().await;
        let healthy = guard
            .as_ref()
            .is_some_and(|l| l.conn.status().connected() && l.channel.status().connected());
        if !healthy {
            *guard = None;
            *guard = Some(self.open().await?);
        }
        let Some(link) = guard.as_ref() else {
            return Err(AmqpError::ConnectTimeout(CONNECT_TIMEOUT));
        };
        let result =
            tokio::time::timeout(CONFIRM_TIMEOUT, publish_all(&link.channel, self, jobs)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(AmqpError::ConfirmTimeout(CONFIRM_TIMEOUT)),
        };
        if result.is_err()
            && let Some(link) = guard.take()
        {
            let _ = link.conn.close(320, "publish failed".into()).await;
        }
        result
    }

    /// Closes the connection, if any.
    pub async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            let _ = link.channel.close(200, "bye".into()).await;
            let _ = link.conn.close(200, "bye".into()).await;
        }
    }
}

async fn publish_all(
    channel: &Channel,
    to: &Publisher,
    jobs: &[(Uuid, Priority)],
) -> Result<(), AmqpError> {
    let routine = ShortString::from(to.queue.as_str());
    let urgent = ShortString::from(to.urgent_queue.as_str());
    let messages = group_messages(jobs, to.message_jobs);
    let mut confirms = Vec::with_capacity(messages.len());
    for (priority, ids) in messages {
        let body = JobMessage::encode(&ids);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(priority.get())
            .with_content_type("application/json".into())
            .with_message_id(ids[0].to_string().into());
        let routing_key = if priority.get() >= to.urgent_priority {
            urgent.clone()
        } else {
            routine.clone()
        };
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                routing_key,
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in futures::future::try_join_all(confirms).await? {
        if !confirm.is_ack() {
            return Err(AmqpError::Nacked);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let m = JobMessage {
            jobs: vec![Uuid::nil()],
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"jobs":["00000000-0000-0000-0000-000000000000"]}"#);
        assert_eq!(serde_json::from_str::<JobMessage>(&s).unwrap(), m);
        assert_eq!(JobMessage::single(Uuid::nil()), s.into_bytes());
        let two = JobMessage::encode(&[Uuid::nil(), Uuid::max()]);
        let back: JobMessage = serde_json::from_slice(&two).unwrap();
        assert_eq!(back.jobs, vec![Uuid::nil(), Uuid::max()]);
    }

    #[test]
    fn groups_by_priority_and_size() {
        let p = |n| Priority::new(n).unwrap();
        let ids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
        let jobs = vec![
            (ids[0], p(5)),
            (ids[1], p(5)),
            (ids[2], p(5)),
            (ids[3], p(9)),
            (ids[4], p(5)),
            (ids[5], p(5)),
            (ids[6], p(5)),
        ];
        let groups = group_messages(&jobs, 2);
        let shape: Vec<(u8, usize)> = groups.iter().map(|(p, ids)| (p.get(), ids.len())).collect();
        assert_eq!(shape, vec![(5, 2), (5, 1), (9, 1), (5, 2), (5, 1)]);
        let flat: Vec<Uuid> = groups.into_iter().flat_map(|(_, ids)| ids).collect();
        assert_eq!(flat, ids, "order is kept");
    }
}
