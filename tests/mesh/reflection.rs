//! The admin server answers gRPC server reflection, so tools like grpcurl work unconfigured; it
//! lists the public admin API alone (`attacks_tokens` probes it for the internal services).

use std::net::SocketAddr;

use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::mesh;

/// Asks the reflection service at `addr` one question, as grpcurl does; its answer, or the
/// status that ended the stream instead.
pub async fn reflect(
    addr: SocketAddr,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await?.expect("one reply");
    Ok(reply.message_response.expect("an answer"))
}

#[tokio::test]
async fn the_admin_server_lists_its_service_by_reflection() {
    let mesh = mesh().await;
    let answer = reflect(mesh.admin, MessageRequest::ListServices(String::new()))
        .await
        .unwrap();
    let MessageResponse::ListServicesResponse(list) = answer else {
        panic!("unexpected reflection reply {answer:?}");
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "channelmesh.admin.v1.Admin",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"
        ]
    );
}

/// Python's `grpcio-reflection` client speaks only v1alpha: it lists the admin API, builds the
/// calls' messages from what reflection returned (no generated code, as a generic tool does),
/// posts and reads the post back, and cannot see the internal services.
#[tokio::test]
async fn python_grpcio_reflection_lists_and_calls_the_admin_api() {
    let mesh = mesh().await;
    let script = crate::real_clients::repo().join("tests/clients/python/reflect_admin.py");
    let output = tokio::process::Command::new(crate::real_clients::python())
        .arg(&script)
        .args(["--admin", &mesh.admin.to_string(), "--channel", "CREFLECT"])
        .env("CHANNELMESH_ADMIN_TOKEN", &mesh.admin_token)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), output)
        .await
        .expect("the script finishes within a minute")
        .expect("the script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        seen["services"],
        serde_json::json!([
            "channelmesh.admin.v1.Admin",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"
        ])
    );
    let methods: Vec<&str> = seen["methods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert!(
        methods.contains(&"PostMessage") && methods.contains(&"History"),
        "{methods:?}"
    );
    assert!(
        !seen["ts"].as_str().unwrap_or_default().is_empty(),
        "{seen}"
    );
    assert_eq!(seen["history"], serde_json::json!(["posted by reflection"]));
    assert_eq!(seen["internal_hidden"], true, "{seen}");
}
