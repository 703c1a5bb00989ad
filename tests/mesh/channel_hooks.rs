//! Who is subscribed to each channel, across gateways and regions, as the channel's owner
//! accounts it (the internal `ChannelInfo` and `ListChannels`, called as an admin server), and
//! the channel webhooks it tells from it.

use std::net::SocketAddr;

use channelmesh::Mesh;
use mesh_core::ChannelId;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::channel::{ChannelInfoRequest, ChannelInfoResponse, ListChannelsRequest};
use mesh_transport::Role;
use tonic::transport::Channel;

use crate::support::{Rtm, acting_as, eventually, mesh, ring_at};

/// The channel's owner and the others, with the ring's epoch.
async fn owner_and_others(mesh: &Mesh, channel: &str) -> (SocketAddr, Vec<SocketAddr>, u64) {
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let owner = ring
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .clone();
    let (mut at, mut others) = (None, Vec::new());
    for (id, addr) in &mesh.channel_servers {
        if *id == owner {
            at = Some(*addr);
        } else {
            others.push(*addr);
        }
    }
    (at.unwrap(), others, ring.epoch())
}

/// A channel server's internal API, called as the admin server.
async fn as_admin(addr: SocketAddr) -> ChannelServerClient<Channel> {
    let endpoint =
        mesh_transport::endpoint_with(&addr.to_string(), &acting_as(Role::Admin, "admin")).unwrap();
    ChannelServerClient::new(endpoint.connect().await.unwrap())
}

async fn info(mesh: &Mesh, channel: &str) -> Result<ChannelInfoResponse, tonic::Status> {
    let (owner, _, epoch) = owner_and_others(mesh, channel).await;
    let request = ChannelInfoRequest {
        epoch,
        channel: channel.into(),
    };
    as_admin(owner)
        .await
        .channel_info(request)
        .await
        .map(|r| r.into_inner())
}

/// Per gateway: (gateway, region, subscribers), in gateway order.
fn by_gateway(info: &ChannelInfoResponse) -> Vec<(String, String, u64)> {
    let mut gateways: Vec<_> = info
        .gateways
        .iter()
        .map(|g| (g.gateway.clone(), g.region.clone(), g.subscribers))
        .collect();
    gateways.sort();
    gateways
}

/// ListChannels on every channel server, merged as the admin API does.
async fn list(mesh: &Mesh, prefix: &str, team: &str) -> Vec<(String, u64, u64)> {
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let mut all = Vec::new();
    for (_, addr) in &mesh.channel_servers {
        let request = ListChannelsRequest {
            epoch: ring.epoch(),
            prefix: prefix.into(),
            team: team.into(),
            after: String::new(),
            limit: 0,
        };
        let page = as_admin(*addr)
            .await
            .list_channels(request)
            .await
            .unwrap()
            .into_inner();
        assert!(!page.has_more);
        all.extend(
            page.channels
                .into_iter()
                .map(|c| (c.channel, c.subscribers, c.members)),
        );
    }
    all.sort();
    all
}

#[tokio::test]
async fn the_owner_counts_subscribers_per_gateway_and_region_and_follows_a_user_across_regions() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let (ann, bob) = (
        mesh.token("UANN", "T1", &["CACCT"]).unwrap(),
        mesh.token("UBOB", "T2", &["CACCT"]).unwrap(),
    );
    // Ann twice in us-east, Bob once in eu-west.
    let phone = Rtm::connect(&us, &ann).await.unwrap();
    let laptop = Rtm::connect(&us, &ann).await.unwrap();
    let _bob = Rtm::connect(&eu, &bob).await.unwrap();
    let east = ("us-east-1".to_string(), "us-east".to_string());
    let west = ("eu-west-1".to_string(), "eu-west".to_string());
    eventually("three subscribers of two users in two regions", || async {
        let info = info(&mesh, "CACCT").await.map_err(|s| s.to_string())?;
        let want = vec![
            (west.0.clone(), west.1.clone(), 1),
            (east.0.clone(), east.1.clone(), 2),
        ];
        match (info.subscribers, info.members, by_gateway(&info)) {
            (3, 2, gateways) if gateways == want => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    // Each user's own channel is one subscriber; ListChannels finds them by prefix and team.
    assert_eq!(
        list(&mesh, "CACCT", "").await,
        [("CACCT".to_string(), 3, 2)]
    );
    assert_eq!(list(&mesh, "CACCT", "T2").await.len(), 1);
    assert!(list(&mesh, "CACCT", "T9").await.is_empty());
    assert_eq!(list(&mesh, "UANN", "").await, [("UANN".to_string(), 2, 1)]);
    // Ann moves to eu-west: us-east lets go, eu-west holds all three.
    drop((phone, laptop));
    let _moved = Rtm::connect(&eu, &ann).await.unwrap();
    eventually("Ann's connection counted in eu-west only", || async {
        let info = info(&mesh, "CACCT").await.map_err(|s| s.to_string())?;
        match (info.subscribers, info.members, by_gateway(&info)) {
            (2, 2, gateways) if gateways == vec![(west.0.clone(), west.1.clone(), 2)] => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    // Only the owner answers; another channel server names it.
    let (_, others, epoch) = owner_and_others(&mesh, "CACCT").await;
    let refusal = as_admin(others[0])
        .await
        .channel_info(ChannelInfoRequest {
            epoch,
            channel: "CACCT".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
    assert!(refusal.message().starts_with("wrong_owner"), "{refusal:?}");
    // A gateway may not ask.
    let owner = owner_and_others(&mesh, "CACCT").await.0;
    let endpoint =
        mesh_transport::endpoint_with(&owner.to_string(), &acting_as(Role::Gateway, "us-east-1"))
            .unwrap();
    let denied = ChannelServerClient::new(endpoint.connect().await.unwrap())
        .channel_info(ChannelInfoRequest {
            epoch,
            channel: "CACCT".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
}
