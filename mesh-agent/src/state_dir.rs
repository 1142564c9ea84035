//! Files the agent keeps across its own restarts under `--state-dir`: the enrolled pods, the last good config,
//! the trust bundle and the workload certificates. Writes are atomic (a temporary file renamed over the old one,
//! so a crash leaves the old or the new file, never half of one) and private to root (mode 0600 in a 0700
//! directory), since some of them hold private keys.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once this agent handed the node to its successor (the upgrade handover): the files are the successor's
/// from then on, and a late write from the old agent (a config update, a certificate renewal) would overwrite or
/// delete what the successor keeps.
static RELINQUISHED: AtomicBool = AtomicBool::new(false);

/// This process writes and removes nothing under the state dir any more.
pub fn relinquish() {
    RELINQUISHED.store(true, Ordering::Release);
}

fn relinquished(path: &Path) -> bool {
    let gone = RELINQUISHED.load(Ordering::Acquire);
    if gone {
        tracing::debug!(file = %path.display(), "the state dir belongs to the successor; not written");
    }
    gone
}

/// Removes `path` (absent is fine), unless the state dir was relinquished.
pub fn remove(path: &Path) -> io::Result<()> {
    if relinquished(path) {
        return Ok(());
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates `dir` (and its parents) readable by root only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // An existing directory keeps its mode with `create`; tighten it.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// Replaces `path` with `bytes` atomically, mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if relinquished(path) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The file's contents, `None` when it does not exist.
pub fn read_if_present(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_atomically_and_privately() {
        let dir = std::env::temp_dir().join(format!("nodemesh-state-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir.join("certs")).unwrap();
        assert_eq!(std::fs::metadata(dir.join("certs")).unwrap().permissions().mode() & 0o777, 0o700);
        let file = dir.join("certs/a.pem");
        assert_eq!(read_if_present(&file).unwrap(), None);
        write_private(&file, b"one").unwrap();
        write_private(&file, b"two").unwrap();
        assert_eq!(read_if_present(&file).unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!file.with_extension("tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
