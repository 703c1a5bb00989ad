//! The embedded ring manager's durable state: the ring and its members, rewritten atomically
//! (write a temporary file, then rename) on every change, so that a restarted ring manager
//! recovers the same ring without reshuffling anything.

use std::path::{Path, PathBuf};

pub use ring_client::record::{Saved, SavedMember};

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads the state file at `path`; `None` when it does not exist yet.
pub fn load(path: &Path) -> Result<Option<Saved>, StateFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let saved: Saved = serde_json::from_str(&text).map_err(|e| StateFileError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    saved.ring().map_err(|message| StateFileError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(Some(saved))
}

/// Writes `saved` to `path` atomically.
pub fn store(path: &Path, saved: &Saved) -> Result<(), StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(saved).map_err(|e| StateFileError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{NodeId, Ring, RingNode};

    #[test]
    fn round_trips_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("channelmesh-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ring.json");
        assert!(load(&path).unwrap().is_none());
        let members: Vec<RingNode> = (1..=3)
            .map(|i| RingNode {
                id: NodeId::new(&format!("cs-{i}")).unwrap(),
                addr: format!("127.0.0.1:{i}"),
            })
            .collect();
        let ring = Ring::empty().rebalanced(&members);
        let (epoch, nodes, slot_owner) = Saved::ring_parts(&ring);
        let saved = Saved {
            epoch,
            nodes,
            slot_owner,
            members: vec![SavedMember {
                id: "cs-1".into(),
                addr: "127.0.0.1:1".into(),
                pid: 7,
                state: "active".into(),
                incarnation: 3,
            }],
            next_incarnation: 4,
        };
        store(&path, &saved).unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded, saved);
        assert_eq!(loaded.ring().unwrap(), ring);
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(load(&path), Err(StateFileError::Invalid { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
