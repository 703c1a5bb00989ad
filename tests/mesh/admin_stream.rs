//! The admin API's firehose, Admin/PublishStream (issue 19): a real grpcio client streams
//! thousands of posts to several channels, seen in order by a slack_sdk client; a caller that
//! cancels mid-stream ends the server's work (no stream, no unanswered request left, and the
//! mesh goes on); a caller without the admin token is refused.

use channelmesh::Mesh;
use mesh_proto::admin::admin_client::AdminClient;
use mesh_proto::admin::publish_stream_request::Body;
use mesh_proto::admin::{PostMessageRequest, PublishStreamReply, PublishStreamRequest};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::Code;

use crate::metrics::{scrape, value};
use crate::real_clients::{python, repo, run};
use crate::support::{WAIT, admin, admin_at, eventually, mesh, post};

/// The admin server's gauge `name`, scraped from its `/metrics`.
async fn gauge(mesh: &Mesh, name: &str) -> Option<f64> {
    let (_, addr) = mesh
        .http
        .iter()
        .find(|(service, _)| service.starts_with("admin"))?;
    Some(value(&scrape(*addr).await, name, &[]))
}

fn request(id: u64, channel: &str, text: &str) -> PublishStreamRequest {
    PublishStreamRequest {
        id,
        body: Some(Body::Post(PostMessageRequest {
            channel: channel.into(),
            user: "UWEBAPP".into(),
            text: text.into(),
            team: String::new(),
            idempotency_key: String::new(),
        })),
    }
}

/// The next reply, within the test's wait.
async fn next(replies: &mut tonic::Streaming<PublishStreamReply>) -> PublishStreamReply {
    tokio::time::timeout(WAIT, replies.message())
        .await
        .expect("a reply in time")
        .expect("the stream goes on")
        .expect("the stream is not over")
}

#[tokio::test]
async fn grpcio_streams_thousands_of_posts_answered_by_id_in_order_and_slack_sdk_sees_them() {
    let mesh = mesh().await;
    let channels: Vec<String> = (0..5).map(|i| format!("CFIREHOSE{i}")).collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let config = json!({
        "us_east": mesh.rtm_base_url("us-east").unwrap(),
        "token": mesh.token("UREADER", "T1", &names).unwrap(),
        "channels": channels,
        "admin_addr": mesh.admin.to_string(),
        "admin_token": mesh.admin_token,
        "proto_root": repo().join("proto"),
    });
    let script = repo().join("tests/clients/python/admin_publish_stream.py");
    run(&python(), &script, config).await;
    // The script cancelled its last stream mid-flight: the server's side of it ended.
    nothing_left(&mesh).await;
}

/// Waits until the admin server has no PublishStream open and no request unanswered.
async fn nothing_left(mesh: &Mesh) {
    eventually("no stream open and nothing unanswered", || async {
        let open = gauge(mesh, "channelmesh_admin_publish_streams").await?;
        let unanswered = gauge(mesh, "channelmesh_admin_publish_stream_unanswered").await?;
        (open == 0.0 && unanswered == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_caller_that_cancels_mid_stream_leaves_nothing_running_and_the_mesh_goes_on() {
    let mesh = mesh().await;
    let mut admin = admin(&mesh).await;
    let (tx, rx) = mpsc::channel(64);
    let mut replies = admin
        .publish_stream(futures::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|r| (r, rx))
        }))
        .await
        .expect("the stream opens")
        .into_inner();
    let first = next(&mut replies).await;
    assert_eq!((first.id, first.code), (0, 0));
    assert!(first.max_unanswered > 0, "{first:?}");
    // Requests keep coming from a task of their own until the stream is dropped.
    let sender = tokio::spawn(async move {
        let mut id = 0u64;
        loop {
            id += 1;
            let channel = format!("CCANCEL{}", id % 4);
            if tx
                .send(request(id, &channel, "cancelled soon"))
                .await
                .is_err()
            {
                return id;
            }
        }
    });
    for _ in 0..200 {
        let reply = next(&mut replies).await;
        assert_eq!(reply.code, 0, "{reply:?}");
    }
    eventually("the stream is counted open", || async {
        (gauge(&mesh, "channelmesh_admin_publish_streams").await? == 1.0).then_some(())
    })
    .await;
    // The caller goes mid-flight: its reply stream is dropped and its requests stop (the call
    // is reset once neither is held).
    drop(replies);
    sender.abort();
    let _ = sender.await;
    nothing_left(&mesh).await;
    // The mesh goes on: a post, and a new stream answered to its end.
    post(&mut admin, "CCANCEL1", "UWEBAPP", "after the cancel").await;
    let requests = (1..=50).map(|id| request(id, "CCANCEL2", "a whole stream"));
    let mut replies = admin
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("a new stream opens")
        .into_inner();
    assert_eq!(next(&mut replies).await.id, 0);
    let mut last = String::new();
    for id in 1..=50 {
        let reply = next(&mut replies).await;
        assert_eq!((reply.id, reply.code), (id, 0), "{reply:?}");
        assert!(reply.ts > last, "ts increase in send order");
        last = reply.ts;
    }
    let end = tokio::time::timeout(WAIT, replies.message()).await.unwrap();
    assert!(
        matches!(end, Ok(None)),
        "the stream ends after its last reply: {end:?}"
    );
}

#[tokio::test]
async fn a_stream_without_the_admin_token_is_refused_unauthenticated() {
    let mesh = mesh().await;
    let requests = || futures::stream::iter([request(1, "CNOAUTH", "not allowed")]);
    let channel = mesh_transport::public_endpoint(&mesh.admin.to_string(), None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = AdminClient::new(channel)
        .publish_stream(requests())
        .await
        .expect_err("no token: refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = admin_at(mesh.admin, "not-the-token")
        .await
        .publish_stream(requests())
        .await
        .expect_err("a wrong token: refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(
        gauge(&mesh, "channelmesh_admin_publish_streams").await,
        Some(0.0),
        "no stream was opened"
    );
}
