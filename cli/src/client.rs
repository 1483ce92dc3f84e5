//! The CLI's client of the daemon's local API, and the errors that map to exit codes.

use serde_json::Value;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use chartmesh_api::{ErrorBody, ErrorKind};
use chartmesh_datadir::datadir;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Verification(String),
    #[error("{0}")]
    Failed(String),
    /// The daemon answered with an error of this kind (its exit code follows from the kind).
    #[error("{1}")]
    Api(ErrorKind, String),
    /// The command already printed its outcome (e.g. a JSON report); exit with this code.
    #[error("")]
    Reported(i32),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Api(kind, _) => kind.exit_code(),
            CliError::Reported(c) => *c,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::NotFound(_) => 4,
            CliError::Refused(_) => 5,
            CliError::Verification(_) => 6,
        }
    }
}

/// Where the daemon of `dir` listens, or what is wrong with `dir` in words: missing, not a
/// data directory, or there but not readable by this user (permission denied, with what to
/// do), or the daemon is not running.
fn daemon_address(dir: &Path) -> Result<std::net::SocketAddr, CliError> {
    use std::io::ErrorKind;
    let missing = || {
        CliError::Unreachable(format!(
            "no chartmesh data directory at {}: create one with `chartmesh init --name NAME` or start `chartmeshd` once (or give the daemon's directory with --data-dir or CHARTMESH_DATA_DIR)",
            dir.display()
        ))
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(missing()),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Err(permission_denied(dir, dir));
        }
        Err(e) => {
            return Err(CliError::Failed(format!(
                "cannot read {}: {e}",
                dir.display()
            )));
        }
        Ok(m) if !m.is_dir() => {
            return Err(CliError::Usage(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    // The address the running daemon wrote (readable by staff who may use it), else the
    // configured one.
    let running = std::fs::read_to_string(dir.join(datadir::API_ADDR));
    if let Ok(s) = &running
        && let Ok(a) = s.trim().parse()
    {
        return Ok(a);
    }
    if let Err(e) = &running
        && e.kind() == ErrorKind::PermissionDenied
    {
        return Err(permission_denied(dir, &dir.join(datadir::API_ADDR)));
    }
    match std::fs::read_to_string(dir.join(datadir::CONFIG)) {
        Ok(_) => datadir::api_address(dir).ok_or_else(|| {
            CliError::Failed(format!(
                "cannot read the API address from {}/config.toml (api.listen)",
                dir.display()
            ))
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(missing()),
        // The config is the daemon's own; staff read api.addr, which exists while it runs.
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(CliError::Unreachable(format!(
            "chartmeshd is not running on {} (it writes api.addr there when it starts): start it (`systemctl start chartmeshd`, or `chartmeshd --data-dir {}`)",
            dir.display(),
            dir.display()
        ))),
        Err(e) => Err(CliError::Failed(format!(
            "cannot read {}: {e}",
            dir.join(datadir::CONFIG).display()
        ))),
    }
}

/// A data directory (or a file in it) this user may not read: says so, and how staff are
/// given access (docs/OPERATIONS.md, "Staff access").
fn permission_denied(dir: &Path, what: &Path) -> CliError {
    let who = std::env::var("USER").unwrap_or_else(|_| "this user".into());
    CliError::Failed(format!(
        "permission denied reading {}: {who} may not use the practice's data directory {}. Run the command as the daemon's user, or give staff access (docs/OPERATIONS.md, \"Staff access\"): add {who} to the daemon's group, `chmod 0750 {}` and `chmod 0640 {}`, then log in again",
        what.display(),
        dir.display(),
        dir.display(),
        dir.join(datadir::TOKEN).display()
    ))
}

pub struct Client {
    base: String,
    token: String,
    user: String,
    agent: ureq::Agent,
    dir: String,
}

impl Client {
    pub fn connect(dir: &Path, user: &str) -> Result<Client, CliError> {
        let addr = daemon_address(dir)?;
        let token = datadir::read_token(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                permission_denied(dir, &dir.join(datadir::TOKEN))
            } else {
                CliError::Failed(format!(
                    "cannot read the API token in {}: {e}",
                    dir.display()
                ))
            }
        })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(None)
            .build()
            .into();
        Ok(Client {
            base: format!("http://{addr}/api/v1"),
            token,
            user: user.to_string(),
            agent,
            dir: dir.display().to_string(),
        })
    }

    fn unreachable(&self, e: ureq::Error) -> CliError {
        CliError::Unreachable(format!(
            "chartmeshd is not reachable at {} ({e}): start it with `chartmeshd --data-dir {}`",
            self.base.trim_end_matches("/api/v1"),
            self.dir
        ))
    }

    fn finish(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<Value, CliError> {
        let status = resp.status().as_u16();
        let v: Value = resp
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_json()
            .map_err(|e| {
                CliError::Failed(format!(
                    "the daemon sent an unreadable answer (HTTP {status}): {e}"
                ))
            })?;
        if (200..300).contains(&status) {
            return Ok(v);
        }
        // The error's kind, not its words, decides what it means.
        let Ok(ErrorBody { error }) = serde_json::from_value::<ErrorBody>(v) else {
            return Err(CliError::Failed(format!(
                "the daemon answered HTTP {status} without an error report"
            )));
        };
        Err(match error.kind {
            ErrorKind::Unauthorized => CliError::Failed(format!(
                "{} (is --data-dir the daemon's directory?)",
                error.message
            )),
            kind => CliError::Api(kind, error.message),
        })
    }

    /// Adds the token and the user's name to a request.
    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        r.header("Authorization", format!("Bearer {}", self.token))
            .header("X-Chartmesh-User", &self.user)
    }

    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        let r = self
            .auth(self.agent.get(format!("{}{path}", self.base)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(r)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let r = self
            .auth(self.agent.post(format!("{}{path}", self.base)))
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        self.finish(r)
    }

    pub fn delete(&self, path: &str) -> Result<Value, CliError> {
        let r = self
            .auth(self.agent.delete(format!("{}{path}", self.base)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(r)
    }

    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value, CliError> {
        let r = self
            .auth(self.agent.post(format!("{}{path}", self.base)))
            .header("Content-Type", "application/x-ndjson")
            .send(body)
            .map_err(|e| self.unreachable(e))?;
        self.finish(r)
    }

    /// Streams an export line by line (one chart per line) into `each`.
    pub fn export_lines(
        &self,
        ids: &[String],
        format: &str,
        each: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<usize> {
        let mut url = format!("{}/export?format={format}", self.base);
        if !ids.is_empty() {
            url.push_str(&format!("&ids={}", ids.join(",")));
        }
        let resp = self
            .auth(self.agent.get(url))
            .call()
            .map_err(|e| self.unreachable(e))?;
        if resp.status().as_u16() != 200 {
            return Err(self.finish(resp).unwrap_err().into());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut n = 0;
        for line in reader.split(b'\n') {
            let line =
                line.map_err(|e| CliError::Failed(format!("the export stopped early: {e}")))?;
            each(&line)?;
            n += 1;
        }
        Ok(n)
    }
}
