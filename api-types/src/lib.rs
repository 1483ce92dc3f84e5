//! # chartmesh-api
//!
//! The types of the daemon's local JSON API (`/api/v1`, docs/API.md) that both sides use:
//! the daemon's routes read these requests and answer errors with these kinds; the CLI
//! writes the same requests and maps the error *kind* (never the message text) to its exit
//! code. Changing a field here changes the API for both at once.
//!
//! Owns: the JSON shapes. Must not touch: I/O, the store, HTTP (no web framework here).

use serde::{Deserialize, Serialize};

/// What went wrong, as the API says it in `{"error": {"kind": …, "message": …}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// A chart, entry, peer or other named thing does not exist (HTTP 404).
    NotFound,
    /// The request is malformed or breaks a rule of the data (HTTP 422).
    Invalid,
    /// An id or patient that matches more than one record (HTTP 422).
    Ambiguous,
    /// The request conflicts with the current state (HTTP 409).
    Conflict,
    /// Refused by consent or policy (HTTP 403).
    Refused,
    /// A medication not added because it raised alerts; `alerts` lists them (HTTP 403).
    Alerts,
    /// No API token, or the wrong one (HTTP 401).
    Unauthorized,
    /// The disk is full: nothing was written (HTTP 507).
    DiskFull,
    /// The daemon is stopping (HTTP 503).
    ShuttingDown,
    /// The store is busy; try again (HTTP 503).
    Busy,
    /// The request or a document is over a size limit (HTTP 413).
    TooLarge,
    /// The store failed (HTTP 500).
    Store,
    /// A kind this side does not know (a newer daemon): treated as a plain error.
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The HTTP status the daemon answers this kind with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Invalid | ErrorKind::Ambiguous => 422,
            ErrorKind::Conflict => 409,
            ErrorKind::Refused | ErrorKind::Alerts => 403,
            ErrorKind::Unauthorized => 401,
            ErrorKind::DiskFull => 507,
            ErrorKind::ShuttingDown | ErrorKind::Busy => 503,
            ErrorKind::TooLarge => 413,
            ErrorKind::Store | ErrorKind::Other => 500,
        }
    }

    /// The `chartmesh` exit code for this kind: 4 not found, 5 refused by consent or
    /// policy (alerts included), 1 any other error.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::NotFound => 4,
            ErrorKind::Refused | ErrorKind::Alerts => 5,
            _ => 1,
        }
    }

    /// The kind as the API writes it (`not-found`, `disk-full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Ambiguous => "ambiguous",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Refused => "refused",
            ErrorKind::Alerts => "alerts",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::DiskFull => "disk-full",
            ErrorKind::ShuttingDown => "shutting-down",
            ErrorKind::Busy => "busy",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::Store => "store",
            ErrorKind::Other => "error",
        }
    }
}

/// An error answer's body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// For [`ErrorKind::Alerts`]: the alerts the medication raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<serde_json::Value>,
}

impl ErrorBody {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ApiError {
                kind,
                message: message.into(),
                alerts: None,
            },
        }
    }
}

/// `POST /peers`: pair with a practice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddPeer {
    /// Its id, plain or checked form.
    pub id: String,
    /// Its sync address, HOST:PORT; empty: reached through the relay (`sync.relay`), found
    /// on the LAN, or dialling in.
    #[serde(default)]
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /sync/pause`, `POST /sync/resume`: a paired practice by id, name or short id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRef {
    pub peer: String,
}

/// `POST /shares` and `POST /revoke`: listed charts, or every chart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareRequest {
    #[serde(default)]
    pub charts: Vec<String>,
    #[serde(default)]
    pub all: bool,
    /// The paired practice: its id (either form), its name, or a unique prefix of its id.
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// `POST /backup`: where to write an online backup (an absolute path of a new file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRequest {
    pub path: std::path::PathBuf,
}

/// The answer to `POST /backup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupDone {
    pub path: String,
    pub bytes: u64,
}

/// `POST /charts/{id}/{section}/{stop|remove}`: a correction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Correction {
    /// The allergy's substance or the medication's name.
    pub target: String,
    pub reason: String,
}

/// The answer to a correction: how many entries changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Corrected {
    pub changed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_read_and_write_as_the_api_spells_them() {
        for k in [
            ErrorKind::NotFound,
            ErrorKind::Invalid,
            ErrorKind::Ambiguous,
            ErrorKind::Conflict,
            ErrorKind::Refused,
            ErrorKind::Alerts,
            ErrorKind::Unauthorized,
            ErrorKind::DiskFull,
            ErrorKind::ShuttingDown,
            ErrorKind::Busy,
            ErrorKind::TooLarge,
            ErrorKind::Store,
        ] {
            let s = serde_json::to_value(k).unwrap();
            assert_eq!(s, k.as_str());
            assert_eq!(serde_json::from_value::<ErrorKind>(s).unwrap(), k);
        }
        let b: ErrorBody =
            serde_json::from_str(r#"{"error":{"kind":"something-new","message":"m"}}"#).unwrap();
        assert_eq!(b.error.kind, ErrorKind::Other);
        assert_eq!(ErrorKind::NotFound.exit_code(), 4);
        assert_eq!(ErrorKind::Alerts.exit_code(), 5);
        assert_eq!(ErrorKind::Invalid.exit_code(), 1);
    }

    #[test]
    fn a_share_request_keeps_its_json_shape() {
        let r: ShareRequest = serde_json::from_str(
            r#"{"charts":["c1"],"all":false,"peer":"P","access":"read","purpose":"referral","expires":null}"#,
        )
        .unwrap();
        assert_eq!(r.charts, ["c1"]);
        assert_eq!(r.purpose.as_deref(), Some("referral"));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["peer"], "P");
        assert!(back.get("expires").is_none());
    }
}
