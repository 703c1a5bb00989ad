//! The embedded ring manager's durable state: the ring (with its generation) and its members,
//! the regions draining and the revoked tokens, rewritten atomically and durably on every
//! change — before the change is published or answered — so that a restarted ring manager
//! recovers the same ring without reshuffling anything.
//!
//! A save writes a temporary file beside the state file, fsyncs it, renames it over the state
//! file and fsyncs the directory: after it returns, a crash or power loss leaves the new state,
//! and before it, the old one, never a torn file.

use std::path::{Path, PathBuf};

pub use ring_client::record::{Saved, SavedDrain, SavedMember, SavedRevocation};

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

/// Writes `saved` to `path` atomically and durably: a temporary file, fsynced, renamed over
/// `path`, then the directory fsynced. An error names the file it failed on.
pub fn store(path: &Path, saved: &Saved) -> Result<(), StateFileError> {
    let text = serde_json::to_vec(saved).map_err(|e| StateFileError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    let io = |at: &Path| {
        let at = at.to_path_buf();
        move |source| StateFileError::Io { path: at, source }
    };
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, &text)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
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
        let ring = Ring::empty().with_generation(0x5eed).rebalanced(&members);
        let (epoch, nodes, slot_owner, slot_followers) = Saved::ring_parts(&ring);
        let saved = Saved {
            generation: 0x5eed,
            epoch,
            nodes,
            slot_owner,
            slot_followers,
            members: vec![SavedMember {
                id: "cs-1".into(),
                addr: "127.0.0.1:1".into(),
                pid: 7,
                state: "active".into(),
                incarnation: 3,
            }],
            next_incarnation: 4,
            ..Saved::default()
        };
        store(&path, &saved).unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded, saved);
        assert_eq!(loaded.ring().unwrap(), ring);
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(load(&path), Err(StateFileError::Invalid { .. })));
        assert!(
            !dir.join("ring.tmp").exists(),
            "the temporary file was renamed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_save_that_cannot_be_written_names_the_file_and_leaves_the_old_state() {
        let dir = std::env::temp_dir().join(format!("channelmesh-unsaved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A parent that is a file: no process, root included, can create anything under it.
        let blocker = dir.join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("ring.json");
        let err = store(&path, &Saved::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("not-a-dir/ring.tmp"), "{text}");
        assert!(matches!(err, StateFileError::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
