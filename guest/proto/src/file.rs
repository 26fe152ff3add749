//! Wire types of the file calls (`WriteFile`, `ReadFile`, `MakeDirectory`,
//! `MakeSymlink`, `StatPath`, `ListDirectory`): kilnd copies files and
//! trees in and out of a guest (or a container's root) chunk by chunk.

use serde::{Deserialize, Serialize};

/// Upper bound of `ReadFileRequest::max_bytes`.
pub const LIMIT_FILE_READ_BYTES: u32 = 1024 * 1024;
/// Most entries one `ListDirectory` returns.
pub const MAX_DIRECTORY_ENTRIES: usize = 65_536;

/// Where a file call works: a path in the guest, or in a container's root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileLocation {
    /// Absolute path, at most 4095 bytes, no NUL. In a container it is
    /// resolved inside the container's root: `..` and symlinks cannot
    /// leave it.
    pub path: String,
    /// Id of a running container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Parameters of `WriteFile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteFileRequest {
    /// The file to write.
    #[serde(flatten)]
    pub at: FileLocation,
    /// Where `data` goes. 0 starts the file afresh (a hidden temporary
    /// next to it); any other offset must equal the bytes written so far.
    pub offset: u64,
    /// The bytes, base64.
    pub data: String,
    /// Last chunk: the file gets `mode`/owner and replaces `path`
    /// atomically (rename).
    pub last: bool,
    /// Permission bits (default 0o644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Owner (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// Parameters of `ReadFile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadFileRequest {
    /// The file to read (a regular file).
    #[serde(flatten)]
    pub at: FileLocation,
    /// First byte to read.
    pub offset: u64,
    /// At most this many bytes (at most [`LIMIT_FILE_READ_BYTES`]).
    pub max_bytes: u32,
}

/// Reply of `ReadFile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadFileReply {
    /// The bytes from `offset`, base64.
    pub data: String,
    /// The file's size now.
    pub size: u64,
}

/// Parameters of `MakeDirectory`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MakeDirectoryRequest {
    /// The directory; its parent must exist. An existing directory is
    /// given the mode and owner.
    #[serde(flatten)]
    pub at: FileLocation,
    /// Permission bits (default 0o755).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Owner (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// Parameters of `MakeSymlink`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MakeSymlinkRequest {
    /// The link to create (replaced if it exists).
    #[serde(flatten)]
    pub at: FileLocation,
    /// What it points to (any text without NUL, at most 4095 bytes).
    pub target: String,
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, FIFO, socket): never copied.
    Other,
}

/// A file's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileInfo {
    /// Name within its directory (the last component for `StatPath`).
    pub name: String,
    /// What it is.
    pub kind: FileKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Reply of `StatPath`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatPathReply {
    /// The path's metadata (a symlink itself, not followed).
    pub info: FileInfo,
}

/// Reply of `ListDirectory`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListDirectoryReply {
    /// The entries, sorted by name, without `.` and `..`.
    pub entries: Vec<FileInfo>,
}

/// Error parameters of `NoSuchFile`, `PermissionDenied`, `NotADirectory`
/// and `IsADirectory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathParameters {
    /// The path of the request.
    pub path: String,
}

/// Error parameters of `FileFailed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileFailedParameters {
    /// The path of the request.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_location_is_flattened_into_the_request() {
        let request: WriteFileRequest = serde_json::from_str(
            r#"{"path":"/a","container":"main","offset":0,"data":"","last":true}"#,
        )
        .unwrap();
        assert_eq!(request.at.path, "/a");
        assert_eq!(request.at.container.as_deref(), Some("main"));
    }
}
