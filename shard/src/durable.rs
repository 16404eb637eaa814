//! Whole files and directories, changed durably and off the core; the
//! free space of a file system.
//!
//! Small files that must survive a crash whole (the recovery checkpoint,
//! the index files of a closed segment, the broker's `topics.json`) are
//! replaced by write-then-rename: write `<name>.tmp`, fdatasync it, rename
//! it over `<name>`, fsync the directory. A crash leaves either the old or
//! the new file, never a mix; a stray `.tmp` is removed when the partition
//! opens.
//!
//! `std::fs` calls block the calling thread, and on a shard's thread that
//! stalls every task of the core. The async functions here make one hop
//! each to the executor's blocking thread ([`rt::spawn_blocking`]); the
//! `*_blocking` ones are for code that is already there (an open batches
//! its whole file-system work into one hop).

use crate::rt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `dir/name` with `bytes`, atomically and durably.
pub async fn write_durably(dir: &Path, name: &str, bytes: Vec<u8>) -> io::Result<()> {
    let dir = dir.to_path_buf();
    let name = name.to_owned();
    rt::spawn_blocking(move || write_durably_blocking(&dir, &name, &bytes)).await
}

/// [`write_durably`] on the calling thread.
pub fn write_durably_blocking(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, dir.join(name))?;
        sync_dir_blocking(dir)
    })();
    if written.is_err() {
        // A half-written temporary holds space a full disk needs back.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The whole file at `path`.
pub async fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let path = path.as_ref().to_path_buf();
    rt::spawn_blocking(move || std::fs::read(path)).await
}

/// Creates `path` and its missing parents, durably (the parent's entry is
/// synced).
pub async fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref().to_path_buf();
    rt::spawn_blocking(move || {
        std::fs::create_dir_all(&path)?;
        sync_parent_blocking(&path)
    })
    .await
}

/// Removes `path` and everything under it, durably (the parent is synced
/// afterwards). A missing `path` is not an error, so a removal interrupted
/// by a crash can simply be repeated. Needs no free space: it works on a
/// full disk, which is when an operator deletes things.
pub async fn remove_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref().to_path_buf();
    rt::spawn_blocking(move || {
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        sync_parent_blocking(&path)
    })
    .await
}

/// Removes each file of `paths` (missing ones are fine), then syncs `dir`
/// once: one hop for a whole batch of deletions.
pub async fn remove_files(dir: &Path, paths: Vec<PathBuf>) -> io::Result<()> {
    let dir = dir.to_path_buf();
    rt::spawn_blocking(move || {
        remove_files_blocking(&paths)?;
        sync_dir_blocking(&dir)
    })
    .await
}

/// Removes `paths` on the calling thread; one already gone is no error.
/// The caller syncs the directory.
pub fn remove_files_blocking(paths: &[PathBuf]) -> io::Result<()> {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes an unprivileged writer can still use on the file system that
/// holds `path` (statvfs `f_bavail`; the blocks reserved for root are not
/// counted, so this errs on the safe side).
pub async fn free_bytes(path: impl AsRef<Path>) -> io::Result<u64> {
    let path = path.as_ref().to_path_buf();
    rt::spawn_blocking(move || free_bytes_blocking(&path)).await
}

/// [`free_bytes`] on the calling thread.
pub fn free_bytes_blocking(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `s` points at writable
    // memory of the right type, which statvfs fills when it returns 0.
    let r = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `s`.
    let s = unsafe { s.assume_init() };
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub fn sync_dir_blocking(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn sync_parent_blocking(path: &Path) -> io::Result<()> {
    let abs = std::path::absolute(path)?;
    match abs.parent() {
        Some(parent) => sync_dir_blocking(parent),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every helper works from a shard's executor, where `std::fs` must not
    /// run on the executor thread itself.
    #[test]
    fn helpers_work_under_a_local_executor() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let topic = root.join("topic");
                let part = topic.join("0");
                create_dir_all(&part).await.unwrap();
                write_durably(&part, "a.json", b"one".to_vec())
                    .await
                    .unwrap();
                write_durably(&part, "a.json", b"two".to_vec())
                    .await
                    .unwrap();
                assert_eq!(read(part.join("a.json")).await.unwrap(), b"two");
                assert!(!part.join("a.json.tmp").exists(), "no temporary left");
                std::fs::write(part.join("x"), b"x").unwrap();
                remove_files(&part, vec![part.join("x"), part.join("missing")])
                    .await
                    .unwrap();
                assert!(!part.join("x").exists());
                let missing = read(part.join("x")).await.unwrap_err();
                assert_eq!(missing.kind(), io::ErrorKind::NotFound);
                remove_dir_all(&topic).await.unwrap();
                assert!(!topic.exists());
                remove_dir_all(&topic).await.unwrap();
                let free = free_bytes(&root).await.unwrap();
                assert!(free > 0, "the test's file system has room");
                assert!(free_bytes(root.join("missing")).await.is_err());
            })
            .expect("executor starts")
            .join()
            .expect("executor finishes");
    }

    #[test]
    fn write_into_a_missing_directory_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("gone");
        let e = write_durably_blocking(&dir, "a", b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!dir.exists());
    }
}
