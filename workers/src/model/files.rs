//! Errors that name the file, reading small JSON files, and the identity of a model directory
//! on disk.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug)]
pub enum LoadError {
    /// A file the model needs is not there.
    Missing { path: PathBuf },
    /// A file is there but cannot be read or parsed.
    Invalid { path: PathBuf, reason: String },
    /// The file asks for something forkserve does not implement: refusing is the only way not
    /// to serve vectors that differ from sentence-transformers'.
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
    /// The weights do not fit the architecture the config describes.
    Model { path: PathBuf, reason: String },
}

impl LoadError {
    pub fn invalid(path: &Path, reason: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> LoadError {
        LoadError::Unsupported {
            path: path.into(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Missing { path } => write!(f, "{}: file not found", path.display()),
            LoadError::Invalid { path, reason } => write!(f, "{}: {reason}", path.display()),
            LoadError::Unsupported {
                path,
                field,
                value,
                reason,
            } => write!(
                f,
                "{}: {field} = {value}: not supported: {reason}",
                path.display()
            ),
            LoadError::Model { path, reason } => {
                write!(f, "{}: cannot build the model: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// A JSON file, parsed; errors name it.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(LoadError::invalid(path, e.to_string())),
    };
    serde_json::from_str(&text).map_err(|e| LoadError::invalid(path, e.to_string()))
}

/// A JSON object file if it exists (None if it does not).
pub fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, LoadError> {
    if !path.is_file() {
        return Ok(None);
    }
    let value: serde_json::Value = read_json(path)?;
    if !value.is_object() {
        return Err(LoadError::invalid(path, "expected a JSON object"));
    }
    Ok(Some(value))
}

/// Which files a model was built from: any file of the directory (and of its module
/// subdirectories) replaced by a rename, rewritten or touched gives another identity, and a HUP
/// then reloads the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIdentity {
    files: Vec<(PathBuf, u64, u64, u64, i128)>,
}

impl ModelIdentity {
    /// The identity of `dir`'s files, two levels deep (the modules' own directories). None if
    /// the directory cannot be read (then any later state counts as a change).
    pub fn of(dir: &Path) -> Option<ModelIdentity> {
        use std::os::unix::fs::MetadataExt;
        let mut files = Vec::new();
        let mut pending = vec![(dir.to_path_buf(), 0)];
        while let Some((path, depth)) = pending.pop() {
            for entry in std::fs::read_dir(&path).ok()? {
                let path = entry.ok()?.path();
                // Follows symlinks: what matters is the file the model reads.
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth < 1 {
                        pending.push((path, depth + 1));
                    }
                    continue;
                }
                let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
                files.push((path, meta.dev(), meta.ino(), meta.size(), mtime));
            }
        }
        files.sort();
        Some(ModelIdentity { files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_changes_with_any_file() {
        let dir = std::env::temp_dir().join(format!("forkserve-identity-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("1_Pooling/config.json"), "{}").unwrap();
        let before = ModelIdentity::of(&dir).unwrap();
        assert_eq!(ModelIdentity::of(&dir).unwrap(), before);
        std::fs::write(dir.join("1_Pooling/config.json"), "{\"a\": 1}").unwrap();
        assert_ne!(ModelIdentity::of(&dir).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ModelIdentity::of(&dir), None);
    }

    #[test]
    fn errors_name_file_field_and_value() {
        let e = LoadError::unsupported(
            "/m/1_Pooling/config.json",
            "pooling_mode",
            "\"median\"",
            "unknown mode",
        );
        assert_eq!(
            e.to_string(),
            "/m/1_Pooling/config.json: pooling_mode = \"median\": not supported: unknown mode"
        );
    }
}
