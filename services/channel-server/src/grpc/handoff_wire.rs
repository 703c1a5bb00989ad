//! The wire side of handoffs: a moved slot's channels sent to their new owner over gRPC in
//! chunks, and channel snapshots to and from their protobuf form. What to send and how to
//! absorb it is decided in `crate::handoff` and the shards. A failed send is logged and retried
//! by its sender, so its statuses are not part of the service's error table.

use std::sync::Arc;
use std::time::Duration;

use channel_client::wire::{event_from_proto, event_to_proto, opt_ts, ts_str};
use mesh_core::{ChannelEvent, ChannelId, NodeId, Ts};
use mesh_proto::channel as pb;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use tonic::Status;

use super::MAX_HANDOFF_MESSAGE;
use crate::handoff::{HANDOFF_CHUNK, HANDOFF_SEND_TIMEOUT, Outgoing};
use crate::idempotency::{MAX_KEY_BYTES, Seen};
use crate::store::{Snapshot, Stored};

/// Streams `handoff`'s snapshots to its new owner, then `done` with the slots' floors, within
/// [`HANDOFF_SEND_TIMEOUT`]; `Ok` once its ack confirms every channel.
pub(super) async fn send(from: &NodeId, epoch: u64, handoff: &Outgoing) -> Result<(), Status> {
    tokio::time::timeout(HANDOFF_SEND_TIMEOUT, attempt(from, epoch, handoff))
        .await
        .map_err(|_| Status::deadline_exceeded("handoff took too long"))?
}

async fn attempt(from: &NodeId, epoch: u64, handoff: &Outgoing) -> Result<(), Status> {
    let Outgoing {
        addr,
        snapshots,
        floors,
        members,
        ..
    } = handoff;
    let channel = mesh_transport::endpoint(addr)
        .map_err(|e| Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let from = from.to_string();
    let mut chunks: Vec<pb::HandoffChunk> = snapshots
        .chunks(HANDOFF_CHUNK)
        .map(|chunk| pb::HandoffChunk {
            from_node: from.clone(),
            epoch,
            channels: chunk.iter().map(snapshot_to_proto).collect(),
            done: false,
            slot_floors: Vec::new(),
            members: Vec::new(),
        })
        .collect();
    chunks.push(pb::HandoffChunk {
        from_node: from,
        epoch,
        channels: Vec::new(),
        done: true,
        members: members
            .iter()
            .map(|(channel, reports)| members_to_proto(channel, reports))
            .collect(),
        slot_floors: floors
            .iter()
            .map(|(slot, ts)| pb::SlotFloor {
                slot: u32::from(*slot),
                ts: ts.to_string(),
            })
            .collect(),
    });
    let mut client =
        ChannelServerClient::new(channel).max_encoding_message_size(MAX_HANDOFF_MESSAGE);
    let ack = client
        .handoff(futures::stream::iter(chunks))
        .await?
        .into_inner();
    if ack.channels as usize != snapshots.len() {
        return Err(Status::data_loss(format!(
            "the new owner confirmed {} of {} channels",
            ack.channels,
            snapshots.len()
        )));
    }
    Ok(())
}

/// A moved slot's floor from its protobuf form.
pub(super) fn floor_from_proto(floor: &pb::SlotFloor) -> Result<(mesh_core::Slot, Ts), String> {
    let ts = Ts::parse(&floor.ts).map_err(|e| e.to_string())?;
    let slot = mesh_core::Slot::try_from(floor.slot)
        .ok()
        .filter(|s| usize::from(*s) < mesh_core::SLOT_COUNT)
        .ok_or_else(|| format!("no slot {}", floor.slot))?;
    Ok((slot, ts))
}

/// A channel's snapshot in its protobuf form.
pub(super) fn snapshot_to_proto(snapshot: &Snapshot) -> pb::ChannelState {
    pb::ChannelState {
        channel: snapshot.channel.to_string(),
        last_ts: snapshot.last_ts.to_string(),
        trimmed_ts: ts_str((snapshot.trimmed != Ts::default()).then_some(snapshot.trimmed)),
        events: snapshot
            .events
            .iter()
            .map(|stored| {
                event_to_proto(&ChannelEvent {
                    channel: snapshot.channel.clone(),
                    ts: Some(stored.ts),
                    body: stored.body.clone(),
                    origin: None,
                })
            })
            .collect(),
        recent_keys: snapshot
            .recent
            .iter()
            .map(|seen| pb::RecentKey {
                key: seen.key.to_string(),
                ts: seen.ts.to_string(),
                seen_micros: seen.seen_micros,
            })
            .collect(),
    }
}

/// The snapshot a protobuf channel state describes (events without a ts are skipped).
pub(super) fn snapshot_from_proto(
    state: pb::ChannelState,
) -> Result<Snapshot, channel_client::wire::WireError> {
    let channel = ChannelId::new(&state.channel)?;
    let last_ts = Ts::parse(&state.last_ts)?;
    let events = state
        .events
        .into_iter()
        .filter_map(|e| match event_from_proto(e) {
            Ok(ChannelEvent {
                ts: Some(ts), body, ..
            }) => Some(Ok(Stored { ts, body })),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let recent = state
        .recent_keys
        .into_iter()
        .filter(|k| !k.key.is_empty() && k.key.len() <= MAX_KEY_BYTES)
        .map(|k| {
            Ok(Seen {
                key: Arc::from(k.key),
                ts: Ts::parse(&k.ts)?,
                seen_micros: k.seen_micros,
            })
        })
        .collect::<Result<Vec<_>, channel_client::wire::WireError>>()?;
    Ok(Snapshot {
        channel,
        last_ts,
        trimmed: opt_ts(&state.trimmed_ts)?.unwrap_or_default(),
        events,
        recent,
    })
}

/// A moved channel's live members as the handoff carries them.
pub fn members_to_proto(
    channel: &ChannelId,
    reports: &[crate::members::Report],
) -> pb::ChannelMembers {
    pb::ChannelMembers {
        channel: channel.to_string(),
        members: reports
            .iter()
            .map(|r| pb::MemberCount {
                user: r.user.to_string(),
                team: r.team.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                connections: r.conns,
                announced: true,
                since_ms: r.since_ms,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_survives_its_protobuf_form() {
        let channel = ChannelId::new("C1").unwrap();
        let snapshot = Snapshot {
            channel: channel.clone(),
            last_ts: Ts::from_micros(30),
            trimmed: Ts::from_micros(10),
            events: vec![Stored {
                ts: Ts::from_micros(20),
                body: mesh_core::EventBody::MemberLeft {
                    user: mesh_core::UserId::new("U1").unwrap(),
                },
            }],
            recent: vec![Seen {
                key: Arc::from("k1"),
                ts: Ts::from_micros(20),
                seen_micros: 1_000,
            }],
        };
        let back = snapshot_from_proto(snapshot_to_proto(&snapshot)).unwrap();
        assert_eq!(back, snapshot);
    }
}
