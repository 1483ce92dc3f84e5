//! The CLI's client of the daemon's local API, and the errors that map to exit codes.

use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use chartmesh_daemon::datadir;

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
    /// The command already printed its outcome (e.g. a JSON report); exit with this code.
    #[error("")]
    Reported(i32),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Reported(c) => *c,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::NotFound(_) => 4,
            CliError::Refused(_) => 5,
            CliError::Verification(_) => 6,
        }
    }
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
        if !datadir::is_initialized(dir) {
            return Err(CliError::Unreachable(format!(
                "no chartmesh data directory at {}: create one with `chartmesh init --name NAME` or start `chartmeshd` once",
                dir.display()
            )));
        }
        let addr = datadir::api_address(dir).ok_or_else(|| {
            CliError::Unreachable(format!(
                "cannot read the API address from {}/config.toml",
                dir.display()
            ))
        })?;
        let token = datadir::read_token(dir).map_err(|e| {
            CliError::Failed(format!(
                "cannot read the API token in {}: {e}",
                dir.display()
            ))
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
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or("request failed")
            .to_string();
        Err(match status {
            404 => CliError::NotFound(msg),
            403 => CliError::Refused(msg),
            401 => CliError::Failed(format!("{msg} (is --data-dir the daemon's directory?)")),
            _ => CliError::Failed(msg),
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

    /// Streams an export into `out`; returns the number of charts.
    pub fn export(&self, ids: &[String], out: &mut dyn Write) -> anyhow::Result<usize> {
        self.export_lines(ids, "jsonl", &mut |line| {
            out.write_all(line)?;
            out.write_all(b"\n")?;
            Ok(())
        })
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
