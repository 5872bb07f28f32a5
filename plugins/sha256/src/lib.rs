//! Hashes a file: the params are its path as a JSON string, the result its
//! SHA-256 digest in lowercase hex and its size in bytes.
//!
//! A file that cannot be opened because it is missing, is a directory or is
//! not readable is a permanent error: trying again would not change it. Any
//! other I/O error may be passing and is retryable.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::PathBuf;

use plugin_api::{TaskError, export_task};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The digest of one file.
#[derive(Debug, Serialize)]
pub struct FileDigest {
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

fn classify(error: std::io::Error, what: String) -> TaskError {
    let message = format!("{what}: {error}");
    match error.kind() {
        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::IsADirectory => {
            TaskError::permanent(message)
        }
        _ => TaskError::retryable(message),
    }
}

/// Hashes the file at `path`.
pub fn digest(path: PathBuf) -> Result<FileDigest, TaskError> {
    let shown = path.display().to_string();
    let mut file = File::open(&path).map_err(|e| classify(e, format!("cannot open `{shown}`")))?;

    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| classify(e, format!("cannot read `{shown}`")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }

    let sha256 = hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok(FileDigest { sha256, bytes })
}

export_task!(digest);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_a_known_string() {
        let dir = std::env::temp_dir().join(format!("sha256-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abc");
        std::fs::write(&path, b"abc").unwrap();
        let digest = digest(path).unwrap();
        assert_eq!(
            digest.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(digest.bytes, 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_permanent_and_named() {
        let error = digest(PathBuf::from("/nonexistent/file")).unwrap_err();
        assert!(matches!(&error, TaskError::Permanent(m) if m.contains("`/nonexistent/file`")));
    }
}
