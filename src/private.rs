//! Files only the hub's user may read: the data dir (0700), the device CA's key and the SQLite
//! database with its `-wal` and `-shm` (0600), private from the moment they exist rather than
//! tightened after a window in which another user could open them. `main` also sets the umask
//! to 077, so whatever else the process writes is private too; these explicit modes hold
//! without it (the tests build the hub in-process, with the test runner's umask).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

/// Creates `dir` (and missing parents) as 0700. An existing directory is left as it is, with a
/// warning when others may read it: it may be a mount the operator shares on purpose.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        #[cfg(unix)]
        if fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %dir.display(), "the data directory is readable by other users; chmod 700 it");
        }
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    b.mode(0o700);
    b.create(dir)
}

/// Creates or replaces `path` with `contents`, readable by the owner only.
pub fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o.open(path)?;
    // `mode` applies only to a file this call creates: an older one is tightened.
    tighten(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Makes an existing file owner-only; nothing when it does not exist.
pub fn tighten(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    match fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The database file a `sqlite:` URL names; `None` for other URLs and in-memory databases.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|p| p == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// A SQLite database's file and the `-wal` and `-shm` SQLite keeps beside it.
fn sqlite_files(db: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut s = db.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    [db.to_path_buf(), with("-wal"), with("-shm")]
}

/// Before SQLite opens `db`: creates it empty as 0600 when it does not exist yet, so SQLite
/// (which gives `-wal` and `-shm` the database file's permissions) never creates any of the
/// three readable by others; tightens those an older version left readable.
pub fn prepare_sqlite(db: &Path) -> io::Result<()> {
    if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            create_dir(parent)?;
        }
    }
    let mut o = fs::OpenOptions::new();
    o.append(true).create(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(db)?;
    for f in sqlite_files(db) {
        tighten(&f)?;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn sqlite_urls() {
        assert_eq!(
            sqlite_file("sqlite:///var/hub/hub.db?mode=rwc"),
            Some(PathBuf::from("/var/hub/hub.db"))
        );
        assert_eq!(sqlite_file("sqlite:hub.db"), Some(PathBuf::from("hub.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://x.db?mode=memory"), None);
        assert_eq!(sqlite_file("postgres://u@h/db"), None);
    }

    #[test]
    fn files_are_private_from_creation_and_old_ones_are_tightened() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let data = dir.path().join("a/b");
        create_dir(&data).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&data), 0o700);
        let key = data.join("k.pem");
        write_file(&key, b"secret").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&key), 0o600);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        write_file(&key, b"secret").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&key), 0o600);
        let db = data.join("hub.db");
        let wal = data.join("hub.db-wal");
        fs::write(&wal, b"").unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        prepare_sqlite(&db).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&wal), 0o600);
    }
}
