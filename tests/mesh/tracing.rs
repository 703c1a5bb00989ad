//! Traces: one post is one trace. The mesh exports its spans over OTLP/gRPC to an in-memory
//! collector (a real `TraceService` server on 127.0.0.1:0), and the spans of the admin server,
//! the channel server and both gateways share the post's trace id — the context travelled in
//! gRPC metadata (admin -> channel server) and inside the event (channel server -> gateways).

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{self, Rtm, eventually};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: Vec<u8>,
}

/// The in-memory collector: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| Span {
                    name: s.name,
                    trace_id: s.trace_id,
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

// The OTLP exporter and its batch thread need a multi-threaded runtime: flushing blocks one
// thread while the export runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_post_is_one_trace_across_admin_channel_server_and_gateways() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    // This test's process is its own (nextest): the global subscriber is this test's.
    let tracing = Arc::new(
        mesh_telemetry::init(false, Some(&endpoint), "channelmesh-test").expect("tracing installs"),
    );

    let mesh = support::mesh().await;
    let token = |user: &str| mesh.token(user, "TTRACE", &["CTRACE"]).unwrap();
    let mut us = Rtm::connect(&mesh.rtm_base_url("us-east").unwrap(), &token("UTR1"))
        .await
        .unwrap();
    let mut eu = Rtm::connect(&mesh.rtm_base_url("eu-west").unwrap(), &token("UTR2"))
        .await
        .unwrap();
    let mut admin = support::admin(&mesh).await;
    support::post(&mut admin, "CTRACE", "UWEBAPP", "traced").await;
    for client in [&mut us, &mut eu] {
        client
            .expect("the traced post", |v| v["text"] == json!("traced"))
            .await;
    }

    let (admin_span, spans) = eventually("the post's spans reach the collector", || {
        let (tracing, collector) = (tracing.clone(), collector.clone());
        async move {
            tokio::task::spawn_blocking(move || tracing.flush())
                .await
                .unwrap();
            let spans = collector.spans.lock().unwrap().clone();
            let post = spans
                .iter()
                .find(|s| s.name == "admin.PostMessage")?
                .clone();
            let same: Vec<Span> = spans
                .into_iter()
                .filter(|s| s.trace_id == post.trace_id)
                .collect();
            let delivered = same.iter().filter(|s| s.name == "gateway.deliver").count();
            (same.iter().any(|s| s.name == "channel.Publish") && delivered == 2)
                .then_some((post, same))
        }
    })
    .await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(admin_span.trace_id.len(), 16, "a W3C trace id");
    assert!(names.contains(&"route.publish"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| **n == "channel.Publish").count(),
        1,
        "one publish in the trace: {names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "gateway.deliver").count(),
        2,
        "one delivery per subscribed gateway: {names:?}"
    );

    drop(mesh);
    stop.cancel();
    let _ = server.await;
}
