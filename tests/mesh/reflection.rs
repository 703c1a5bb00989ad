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
            "grpc.reflection.v1.ServerReflection"
        ]
    );
}
