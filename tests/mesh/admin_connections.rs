//! Connection and channel management on the admin API (issue 18): DisconnectUser closes a
//! user's live connections (all, or one team's) on every gateway with 4010/4011 and the web
//! app's reason; ListConnections lists them from the user's presence server (across regions,
//! and again after that server crashed); Broadcast publishes to many channels, answered per
//! channel; ListChannels and ChannelInfo see subscribers across gateways. Checked with real
//! clients: Python grpcio against slack_sdk, and @slack/rtm-api.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Instant;

use mesh_core::ChannelId;
use mesh_proto::admin::{
    BroadcastRequest, ChannelInfoRequest, DisconnectUserRequest, ListChannelsRequest,
    ListConnectionsRequest,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

use crate::real_clients::{client_command, node, python, repo, run};
use crate::support::{Admin, Rtm, admin, eventually, mesh, post, ring_at};

/// The (region, team) of each connection ListConnections lists for `user`, sorted.
async fn listed(admin: &Admin, user: &str) -> Result<Vec<(String, String)>, tonic::Status> {
    let request = ListConnectionsRequest { user: user.into() };
    let reply = admin.clone().list_connections(request).await?.into_inner();
    let mut seen: Vec<(String, String)> = reply
        .connections
        .into_iter()
        .map(|c| (c.region, c.team))
        .collect();
    seen.sort();
    Ok(seen)
}

fn pair(region: &str, team: &str) -> (String, String) {
    (region.to_string(), team.to_string())
}

#[tokio::test]
async fn grpcio_disconnects_slack_sdk_clients_with_the_code_and_reason_and_lists_their_connections()
{
    let mesh = mesh().await;
    let config = json!({
        "us_east": mesh.rtm_base_url("us-east").unwrap(),
        "eu_west": mesh.rtm_base_url("eu-west").unwrap(),
        "user": "UDIS",
        "other": "UOTHER",
        "t1_token": mesh.token("UDIS", "T1", &[]).unwrap(),
        "t2_token": mesh.token("UDIS", "T2", &[]).unwrap(),
        "other_token": mesh.token("UOTHER", "T1", &[]).unwrap(),
        "admin_addr": mesh.admin.to_string(),
        "admin_token": mesh.admin_token,
        "proto_root": repo().join("proto"),
    });
    let script = repo().join("tests/clients/python/admin_disconnect.py");
    run(&python(), &script, config).await;
}

#[tokio::test]
async fn grpcio_broadcast_reaches_slack_sdk_clients_in_both_regions_answered_per_channel() {
    let mesh = mesh().await;
    let channels: Vec<String> = (0..40).map(|i| format!("CBCAST{i:02}")).collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let config = json!({
        "us_east": mesh.rtm_base_url("us-east").unwrap(),
        "eu_west": mesh.rtm_base_url("eu-west").unwrap(),
        "east_token": mesh.token("UEAST", "T1", &names).unwrap(),
        "west_token": mesh.token("UWEST", "T1", &names).unwrap(),
        "channels": channels,
        "admin_addr": mesh.admin.to_string(),
        "admin_token": mesh.admin_token,
        "proto_root": repo().join("proto"),
    });
    let script = repo().join("tests/clients/python/admin_broadcast.py");
    run(&python(), &script, config).await;
}

#[tokio::test]
async fn an_rtm_api_client_of_the_disconnected_team_gets_4010_and_the_reason_and_the_other_team_stays()
 {
    let mesh = mesh().await;
    let admin = admin(&mesh).await;
    let reason = "please reconnect: moving you";
    let config = json!({
        "base": mesh.rtm_base_url("us-east").unwrap(),
        "user": "UNODE",
        "t1_token": mesh.token("UNODE", "T1", &[]).unwrap(),
        "t2_token": mesh.token("UNODE", "T2", &[]).unwrap(),
        "code": 4010,
        "reason": reason,
    });
    let script = repo().join("tests/clients/node/rtm_disconnect.js");
    let mut child = client_command(&node(), &script, &config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    let mut next_line = async || {
        let line = tokio::time::timeout(crate::support::WAIT * 3, lines.next_line())
            .await
            .expect("the node client says something in time")
            .expect("its output reads")
            .unwrap_or_else(|| panic!("the node client ended early:\n{}", out.join("\n")));
        println!("node: {line}");
        out.push(line.clone());
        line
    };
    assert_eq!(next_line().await, "CONNECTED");
    // Both connections are known before the disconnect is asked for.
    eventually("both connections are listed", || async {
        let seen = listed(&admin, "UNODE").await.ok()?;
        (seen == [pair("us-east", "T1"), pair("us-east", "T2")]).then_some(())
    })
    .await;
    let asked = Instant::now();
    let reply = admin
        .clone()
        .disconnect_user(DisconnectUserRequest {
            user: "UNODE".into(),
            team: "T1".into(),
            reason: reason.into(),
            reconnect: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.connections, 1, "the T1 connection only");
    assert_eq!(next_line().await, format!("CLOSED 4010 {reason}"));
    println!(
        "DisconnectUser -> the client's close frame: {:?}",
        asked.elapsed()
    );
    post(
        &mut admin.clone(),
        "UNODE",
        "UWEBAPP",
        "after the disconnect",
    )
    .await;
    assert_eq!(next_line().await, "OK");
    let status = tokio::time::timeout(crate::support::WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn list_connections_spans_two_regions_and_comes_back_after_the_presence_server_crashes() {
    let mesh = mesh().await;
    let admin = admin(&mesh).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let before = Instant::now();
    let _a = Rtm::connect(&us, &mesh.token("ULIST", "T1", &[]).unwrap())
        .await
        .unwrap();
    let _b = Rtm::connect(&eu, &mesh.token("ULIST", "T1", &[]).unwrap())
        .await
        .unwrap();
    let _c = Rtm::connect(&eu, &mesh.token("ULIST", "T2", &[]).unwrap())
        .await
        .unwrap();
    let want = vec![
        pair("eu-west", "T1"),
        pair("eu-west", "T2"),
        pair("us-east", "T1"),
    ];
    eventually("three connections listed", || async {
        (listed(&admin, "ULIST").await.ok()? == want).then_some(())
    })
    .await;
    let reply = admin
        .clone()
        .list_connections(ListConnectionsRequest {
            user: "ULIST".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let gateways: BTreeSet<&str> = reply
        .connections
        .iter()
        .map(|c| c.gateway.as_str())
        .collect();
    assert_eq!(gateways.len(), 2, "two gateways: {:?}", reply.connections);
    let opened: Vec<u64> = reply
        .connections
        .iter()
        .map(|c| c.connected_at_ms)
        .collect();
    assert!(opened.is_sorted(), "oldest first: {opened:?}");
    let since = mesh_now_ms() - before.elapsed().as_millis() as u64 - 1_000;
    assert!(
        opened.iter().all(|&t| t >= since),
        "{opened:?} after {since}"
    );

    // The user's presence server crashes: its standby takes the user over and is rebuilt
    // from the gateways' snapshots.
    let user = ChannelId::new("ULIST").unwrap();
    let (ring, _) = ring_at(mesh.presence_ring_manager).await;
    let owner = ring.owner_of(&user).unwrap().id.to_string();
    assert!(mesh.stop_presence_server(&owner));
    eventually("the three connections listed by the new owner", || async {
        let (now, _) = ring_at(mesh.presence_ring_manager).await;
        let moved = now.owner_of(&user).is_some_and(|n| n.id.as_str() != owner);
        (moved && listed(&admin, "ULIST").await.ok()? == want).then_some(())
    })
    .await;

    // Bad input, and a user with no connection.
    let empty = admin
        .clone()
        .list_connections(ListConnectionsRequest { user: "".into() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty}");
    assert_eq!(listed(&admin, "UNOBODY").await.unwrap(), Vec::new());
}

/// Now, Unix milliseconds.
fn mesh_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_broadcast_to_a_thousand_channels_is_answered_per_channel_and_bad_calls_are_refused() {
    let mesh = mesh().await;
    let admin = admin(&mesh).await;
    let channels: Vec<String> = (0..1_000).map(|i| format!("CTHOUSAND{i:04}")).collect();
    let request = BroadcastRequest {
        channels: channels.clone(),
        event_json: json!({"type": "maintenance", "at": "tonight"}).to_string(),
        idempotency_key: "thousand".into(),
        ..BroadcastRequest::default()
    };
    let started = Instant::now();
    let reply = admin
        .clone()
        .broadcast(request.clone())
        .await
        .unwrap()
        .into_inner();
    println!(
        "Broadcast to 1,000 channels answered in {:?}",
        started.elapsed()
    );
    let answered: Vec<&str> = reply.results.iter().map(|r| r.channel.as_str()).collect();
    assert_eq!(answered, channels, "in the order asked");
    assert!(
        reply
            .results
            .iter()
            .all(|r| r.error.is_empty() && !r.ts.is_empty()),
        "{:?}",
        reply.results.iter().find(|r| !r.error.is_empty())
    );
    // Retried: the same ts everywhere.
    let again = admin.clone().broadcast(request).await.unwrap().into_inner();
    assert_eq!(again.results, reply.results);

    for (request, what) in [
        (
            BroadcastRequest {
                channels: (0..1_001).map(|i| format!("C{i}")).collect(),
                user: "U1".into(),
                text: "x".into(),
                ..BroadcastRequest::default()
            },
            "channels: at most 1000 per call",
        ),
        (
            BroadcastRequest {
                channels: vec!["C1".into()],
                user: String::new(),
                text: "x".into(),
                ..BroadcastRequest::default()
            },
            "user: ",
        ),
    ] {
        let refused = admin.clone().broadcast(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
        assert!(refused.message().starts_with(what), "{refused}");
    }
}

#[tokio::test]
async fn list_channels_and_channel_info_see_subscribers_across_gateways_and_teams() {
    let mesh = mesh().await;
    let admin = admin(&mesh).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let channels = ["CLIST1", "CLIST2", "CLIST3", "CLIST4", "CLIST5"];
    // CLIST1: two T1 users on us-east and one T2 user on eu-west, one of whom twice.
    let _a = Rtm::connect(&us, &mesh.token("UL1", "T1", &channels).unwrap())
        .await
        .unwrap();
    let _b = Rtm::connect(&us, &mesh.token("UL2", "T1", &channels[..1]).unwrap())
        .await
        .unwrap();
    let _c = Rtm::connect(&eu, &mesh.token("UL3", "T2", &channels[..1]).unwrap())
        .await
        .unwrap();
    let _c2 = Rtm::connect(&eu, &mesh.token("UL3", "T2", &channels[..1]).unwrap())
        .await
        .unwrap();
    let ts = post(&mut admin.clone(), "CLIST1", "UWEBAPP", "hello").await;

    let info = eventually("CLIST1's subscribers counted", || async {
        let info = admin
            .clone()
            .channel_info(ChannelInfoRequest {
                channel: "CLIST1".into(),
            })
            .await
            .ok()?
            .into_inner();
        (info.subscribers == 4).then_some(info)
    })
    .await;
    assert_eq!(info.channel, "CLIST1");
    assert_eq!(info.members, 3);
    assert_eq!(info.last_ts, ts);
    assert_eq!(info.history_length, 1);
    let mut per_gateway: Vec<(String, u64)> = info
        .gateways
        .iter()
        .map(|g| (g.region.clone(), g.subscribers))
        .collect();
    per_gateway.sort();
    assert_eq!(per_gateway, [("eu-west".into(), 2), ("us-east".into(), 2)]);

    // Every page of every size lists each channel once, in id order, with its counts.
    for limit in [1, 2, 100] {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = admin
                .clone()
                .list_channels(ListChannelsRequest {
                    prefix: "CLIST".into(),
                    team: String::new(),
                    limit,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.channels.len() <= limit as usize);
            seen.extend(
                page.channels
                    .into_iter()
                    .map(|c| (c.channel, c.subscribers)),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let want: Vec<(String, u64)> = channels
            .iter()
            .map(|c| (c.to_string(), if *c == "CLIST1" { 4 } else { 1 }))
            .collect();
        assert_eq!(seen, want, "limit {limit}");
    }
    // By team: only CLIST1 has a T2 subscriber.
    let t2 = admin
        .clone()
        .list_channels(ListChannelsRequest {
            prefix: "CLIST".into(),
            team: "T2".into(),
            ..ListChannelsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = t2.channels.iter().map(|c| c.channel.as_str()).collect();
    assert_eq!(ids, ["CLIST1"]);
    // A token this API did not give is refused.
    let bad = admin
        .clone()
        .list_channels(ListChannelsRequest {
            page_token: "not a token".into(),
            ..ListChannelsRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
}

#[tokio::test]
async fn the_internal_disconnect_and_connections_calls_take_only_admins_and_operators() {
    use mesh_proto::presence::ConnectionsRequest;
    use mesh_proto::presence::presence_client::PresenceClient;
    use mesh_proto::ring::{DisconnectOrder, DisconnectUsersRequest};
    use mesh_transport::Role;

    use crate::support::{acting_as, operator, rm_with};

    let mesh = mesh().await;
    let order = || DisconnectUsersRequest {
        orders: vec![DisconnectOrder {
            user: "UINT".into(),
            reason: "bye".into(),
            ..DisconnectOrder::default()
        }],
    };
    // A gateway may not order disconnects; the operator (the SRE console's) and an admin
    // server may.
    let gateway = acting_as(Role::Gateway, "us-east-1");
    let refused = rm_with(mesh.ring_manager, &gateway)
        .await
        .disconnect_users(order())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    for who in [operator(), &acting_as(Role::Admin, "admin-1")] {
        let done = rm_with(mesh.ring_manager, who)
            .await
            .disconnect_users(order())
            .await
            .unwrap()
            .into_inner();
        assert!(done.version >= 1 && done.held >= 1, "{done:?}");
    }
    // A bad order is refused whole.
    let bad = DisconnectUsersRequest {
        orders: vec![DisconnectOrder::default()],
    };
    let refused = rm_with(mesh.ring_manager, operator())
        .await
        .disconnect_users(bad)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");

    // Only admin servers list a user's connections.
    let (_, presence) = mesh.presence_servers[0].clone();
    let ask = |who: mesh_transport::Transport| async move {
        let channel = mesh_transport::endpoint_with(&presence.to_string(), &who)
            .unwrap()
            .connect()
            .await
            .unwrap();
        PresenceClient::new(channel)
            .connections(ConnectionsRequest {
                user: "UINT".into(),
            })
            .await
    };
    let refused = ask(gateway).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(ask(acting_as(Role::Admin, "admin-1")).await.is_ok());
}
