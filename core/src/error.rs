//! Errors of the core: each says what was wrong and, where it helps, what to do.

use thiserror::Error;

/// A chart record that is not a valid chart. `field` is the JSON path of the offending value
/// (e.g. `patient.birthDate`), empty when the record as a whole is at fault.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error("invalid chart: {0}")]
    Invalid(#[from] ValidationError),
    #[error("stored chart document is corrupt: {0}")]
    CorruptDocument(String),
    #[error("chart document does not have the expected shape: {0}")]
    Shape(String),
    /// A change the chart's rules do not allow as the chart stands now (checked inside the
    /// write, against the latest version): the message says why.
    #[error("{0}")]
    NotAllowed(String),
}

impl ValidationError {
    /// The same error, with its field placed under `path` (e.g. `notes[2]` + `date`).
    pub fn within(mut self, path: &str) -> Self {
        self.field = if self.field.is_empty() {
            path.to_string()
        } else {
            format!("{path}.{}", self.field)
        };
        self
    }
}
