//! The private service instances fault tests rely on: each must survive a stop and start
//! with its data intact, and be unreachable while stopped. The shared services are never
//! touched.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use pinq_core::amqp::{connect, declare_queue, queue_depth};
use pinq_e2e::private::{PrivatePostgres, PrivateRabbit};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn private_postgres_keeps_its_data_across_an_outage() -> anyhow::Result<()> {
    let began = Instant::now();
    let mut pg = PrivatePostgres::start().await?;
    eprintln!("PrivatePostgres::start took {:?}", began.elapsed());
    assert_ne!(pg.port(), 5432);

    let url = pg.url("postgres");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&url)
        .await?;
    sqlx::query("CREATE TABLE survivors (id int PRIMARY KEY, name text NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO survivors VALUES (1, 'kept')")
        .execute(&pool)
        .await?;

    let began = Instant::now();
    pg.stop().await?;
    eprintln!("PrivatePostgres::stop took {:?}", began.elapsed());
    assert!(
        sqlx::query("SELECT 1").execute(&pool).await.is_err(),
        "a query must fail while the server is down"
    );
    assert!(PgConnection::connect(&url).await.is_err());
    pool.close().await;

    let began = Instant::now();
    pg.start_again().await?;
    eprintln!("PrivatePostgres::start_again took {:?}", began.elapsed());
    let mut conn = PgConnection::connect(&url).await?;
    let name: String = sqlx::query_scalar("SELECT name FROM survivors WHERE id = 1")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(name, "kept");
    conn.close().await?;

    let began = Instant::now();
    pg.restart().await?;
    eprintln!("PrivatePostgres::restart took {:?}", began.elapsed());
    let mut conn = PgConnection::connect(&url).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM survivors")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(n, 1);
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn private_rabbit_keeps_persistent_messages_across_an_outage() -> anyhow::Result<()> {
    let began = Instant::now();
    let mut rabbit = PrivateRabbit::start().await?;
    eprintln!("PrivateRabbit::start took {:?}", began.elapsed());
    assert_ne!(rabbit.port(), 5672);

    let url = rabbit.amqp_url();
    let queue = "pinq.private.survivors";
    let conn = connect(&url, "private-services-test").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare_queue(&channel, queue).await?;
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{\"jobs\":[]}",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    assert!(confirm.is_ack(), "the broker must confirm the publish");
    assert_eq!(queue_depth(&channel, queue).await?, 1);
    let _ = conn.close(200, "bye".into()).await;

    let began = Instant::now();
    rabbit.stop().await?;
    eprintln!("PrivateRabbit::stop took {:?}", began.elapsed());
    assert!(
        connect(&url, "private-services-test").await.is_err(),
        "connecting must fail while the node is down"
    );

    let began = Instant::now();
    rabbit.start_again().await?;
    eprintln!("PrivateRabbit::start_again took {:?}", began.elapsed());
    let conn = connect(&url, "private-services-test").await?;
    let channel = conn.create_channel().await?;
    assert_eq!(queue_depth(&channel, queue).await?, 1);
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}
