//! `config.toml` in the data directory: defaults for everything, overridden by `CHARTMESH_*`
//! environment variables, validated into one typed [`Config`].

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    #[serde(default)]
    pub practice: PracticeConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub emergency: EmergencyConfig,
    #[serde(default)]
    pub backup: BackupConfig,
}

/// Scheduled backups: every `interval`, a verified backup into `dir`, keeping the newest
/// `keep` of them. Off while `interval` is not set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// How often, e.g. `24h`, `6h`, `30m` (seconds to 7 days). Not set: no scheduled backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Where they go: an absolute path outside the data directory, ideally another disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<std::path::PathBuf>,
    /// How many scheduled backups to keep (older ones are deleted after a new one verifies).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_keep() -> usize {
    7
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            interval: None,
            dir: None,
            keep: default_keep(),
        }
    }
}

impl BackupConfig {
    /// The schedule, when one is set: (interval in milliseconds, directory, how many to keep).
    pub fn schedule(&self) -> Result<Option<(i64, std::path::PathBuf, usize)>, String> {
        let Some(interval) = &self.interval else {
            return Ok(None);
        };
        let ms = parse_duration(interval)
            .ok_or_else(|| format!("backup.interval = {interval:?}: use a number with s, m or h, such as \"24h\" (1s to 168h)"))?;
        let Some(dir) = &self.dir else {
            return Err(
                "backup.interval is set but backup.dir is not: give the directory for the backups"
                    .into(),
            );
        };
        if !dir.is_absolute() {
            return Err(format!(
                "backup.dir = {:?} must be an absolute path",
                dir.display().to_string()
            ));
        }
        if self.keep == 0 {
            return Err("backup.keep = 0 would delete every backup: keep at least 1".into());
        }
        Ok(Some((ms, dir.clone(), self.keep)))
    }
}

/// How this practice answers emergency ("break-glass") requests from paired practices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmergencyConfig {
    /// `deny` (the default) or `allow`.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// How long allowed access lasts: a number with `s`, `m` or `h` (e.g. `4h`).
    #[serde(default = "default_duration")]
    pub duration: String,
}

fn default_policy() -> String {
    "deny".into()
}
fn default_duration() -> String {
    "4h".into()
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        EmergencyConfig {
            policy: default_policy(),
            duration: default_duration(),
        }
    }
}

impl EmergencyConfig {
    /// The policy as the emergency rules take it.
    pub fn policy(&self) -> Result<chartmesh_core::emergency::Policy, String> {
        use chartmesh_core::emergency::Policy;
        match self.policy.as_str() {
            "deny" => Ok(Policy::Deny),
            "allow" => Ok(Policy::Allow {
                duration_ms: parse_duration_ms(&self.duration)?,
            }),
            other => Err(format!(
                "emergency.policy = {other:?}: use \"deny\" or \"allow\""
            )),
        }
    }
}

/// `90s`, `30m`, `4h` → milliseconds (at least one second, at most 7 days).
fn parse_duration_ms(s: &str) -> Result<i64, String> {
    parse_duration(s).ok_or_else(|| {
        format!(
            "emergency.duration = {s:?}: use a number with s, m or h, such as \"4h\" (at most 168h)"
        )
    })
}

/// `90s`, `30m`, `4h` in milliseconds, when it is one second to seven days.
fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num.trim().parse().ok()?;
    let ms = match unit {
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return None,
    };
    (1000..=7 * 24 * 3_600_000).contains(&ms).then_some(ms)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PracticeConfig {
    /// The practice's name, shown to peers and in the console.
    #[serde(default = "default_name")]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the local JSON API and console listen. Must be a loopback address.
    #[serde(default = "default_api")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// The UDP address peers reach this practice on (QUIC).
    #[serde(default = "default_sync")]
    pub listen: SocketAddr,
    /// QUIC congestion controller: `bbr` (the default; tolerant of lossy links), `cubic` or
    /// `newreno` (docs/PERFORMANCE.md has measurements of each).
    #[serde(default = "default_congestion")]
    pub congestion: String,
    /// A relay server (`host:port` of a Syncthing relay, `strelaysrv`) through which paired
    /// practices reach this one, and it them, when neither can accept a connection (NAT,
    /// mobile routers). Unset: direct connections only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// The relay's id (the `id=` its URI shows, or the SHA-256 of its certificate in hex):
    /// with it, a server posing as the relay is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_id: Option<String>,
    /// A STUN server (`host:port`, e.g. coturn's default port 3478) that tells this practice
    /// its public address as seen from outside its NAT. With it, two practices connected
    /// through the relay try to reach each other directly (hole punching) and switch to the
    /// direct connection when their NATs allow it. Unset: the relayed connection stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stun: Option<String>,
    /// Announce this practice and find paired ones on the local network (mDNS), so a peer
    /// on the same network needs no address. Only when `listen` is not a loopback address.
    #[serde(default = "default_true")]
    pub lan_discovery: bool,
    /// Ask the router (the default gateway) to forward a public UDP port to the sync port,
    /// by PCP, NAT-PMP or UPnP IGD, where it offers one of them: peers then reach this
    /// practice directly even where hole punching fails. `on` (the default) or `off`. Only
    /// when `listen` is not a loopback address.
    #[serde(
        default = "default_true",
        deserialize_with = "on_off",
        serialize_with = "ser_on_off"
    )]
    pub port_mapping: bool,
}

/// `on`/`off` (or `true`/`false`), as written in config.toml or the environment.
fn parse_on_off(name: &str, v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{name} = {v:?}: use \"on\" or \"off\"")),
    }
}

fn on_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OnOff {
        Bool(bool),
        Text(String),
    }
    match OnOff::deserialize(d)? {
        OnOff::Bool(b) => Ok(b),
        OnOff::Text(t) => parse_on_off("sync.port_mapping", &t).map_err(serde::de::Error::custom),
    }
}

fn ser_on_off<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *v { "on" } else { "off" })
}

fn default_true() -> bool {
    true
}

impl SyncConfig {
    /// The transport settings this configuration asks for.
    pub fn transport(&self) -> Result<chartmesh_net::Transport, String> {
        let congestion = self
            .congestion
            .parse()
            .map_err(|e| format!("sync.congestion = {e}"))?;
        Ok(chartmesh_net::Transport {
            congestion,
            ..Default::default()
        })
    }

    /// The STUN server to ask for this practice's public address, if any (`host:port`).
    pub fn stun_server(&self) -> Result<Option<String>, String> {
        Ok(
            host_port_setting("sync.stun", &self.stun, "stun.example.org:3478")?
                .map(str::to_string),
        )
    }

    /// The relay to keep a connection to, if any.
    pub fn relay_config(&self) -> Result<Option<chartmesh_net::RelayConfig>, String> {
        let Some(addr) = host_port_setting("sync.relay", &self.relay, "relay.example.org:22067")?
        else {
            return Ok(None);
        };
        let pin = match self.relay_id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(id) => Some(parse_relay_id(id).ok_or_else(|| {
                format!(
                    "sync.relay_id = {id:?} is neither the relay's id (as in its relay://...?id= URI) nor 64 hex digits"
                )
            })?),
        };
        Ok(Some(chartmesh_net::RelayConfig {
            addr: addr.to_string(),
            pin,
        }))
    }
}

/// A `host:port` setting (`name`), trimmed; None when unset or empty.
fn host_port_setting<'a>(
    name: &str,
    value: &'a Option<String>,
    example: &str,
) -> Result<Option<&'a str>, String> {
    let Some(addr) = value.as_deref().map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(format!(
            "{name} = {addr:?} is not HOST:PORT (e.g. {example})"
        ));
    }
    Ok(Some(addr))
}

/// A relay's id: a Syncthing device id (base32 in groups, with a check character after
/// every 13) or the certificate's SHA-256 in hex.
pub fn parse_relay_id(s: &str) -> Option<[u8; 32]> {
    let compact: String = s.chars().filter(|c| *c != '-' && *c != ' ').collect();
    if compact.len() == 64 {
        return hex::decode(&compact).ok()?.try_into().ok();
    }
    if compact.len() != 56 {
        return None;
    }
    // Drop the check character ending each group of 14.
    let data: String = compact
        .chars()
        .enumerate()
        .filter(|(i, _)| i % 14 != 13)
        .map(|(_, c)| c.to_ascii_uppercase())
        .collect();
    data_encoding::BASE32_NOPAD
        .decode(data.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `info`, `debug`, ... or a tracing filter such as `chartmesh=debug`.
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_name() -> String {
    "My Practice".into()
}
fn default_api() -> SocketAddr {
    "127.0.0.1:7360".parse().unwrap()
}
fn default_sync() -> SocketAddr {
    "127.0.0.1:7361".parse().unwrap()
}
fn default_congestion() -> String {
    "bbr".into()
}
fn default_level() -> String {
    "info".into()
}
fn default_format() -> String {
    "text".into()
}

impl Default for PracticeConfig {
    fn default() -> Self {
        PracticeConfig {
            name: default_name(),
        }
    }
}
impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api(),
        }
    }
}
impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            listen: default_sync(),
            congestion: default_congestion(),
            relay: None,
            relay_id: None,
            stun: None,
            lan_discovery: true,
            port_mapping: true,
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_level(),
            format: default_format(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads `config.toml`, then applies `CHARTMESH_*` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        let mut c: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        c.apply_env(|k| std::env::var(k).ok())
            .map_err(|m| ConfigError::Invalid {
                path: "environment".into(),
                message: m,
            })?;
        c.validate().map_err(|m| ConfigError::Invalid {
            path: path.display().to_string(),
            message: m,
        })?;
        Ok(c)
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(v) = get("CHARTMESH_API_LISTEN") {
            self.api.listen = v.parse().map_err(|_| {
                format!("CHARTMESH_API_LISTEN={v:?} is not an address like 127.0.0.1:7360")
            })?;
        }
        if let Some(v) = get("CHARTMESH_SYNC_LISTEN") {
            self.sync.listen = v.parse().map_err(|_| {
                format!("CHARTMESH_SYNC_LISTEN={v:?} is not an address like 127.0.0.1:7361")
            })?;
        }
        if let Some(v) = get("CHARTMESH_SYNC_RELAY") {
            self.sync.relay = Some(v);
        }
        if let Some(v) = get("CHARTMESH_SYNC_RELAY_ID") {
            self.sync.relay_id = Some(v);
        }
        if let Some(v) = get("CHARTMESH_SYNC_STUN") {
            self.sync.stun = Some(v);
        }
        if let Some(v) = get("CHARTMESH_SYNC_PORT_MAPPING") {
            self.sync.port_mapping = parse_on_off("CHARTMESH_SYNC_PORT_MAPPING", &v)?;
        }
        if let Some(v) = get("CHARTMESH_SYNC_CONGESTION") {
            self.sync.congestion = v;
        }
        if let Some(v) = get("CHARTMESH_LOG") {
            self.log.level = v;
        }
        if let Some(v) = get("CHARTMESH_LOG_FORMAT") {
            self.log.format = v;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.api.listen.ip().is_loopback() {
            return Err(format!(
                "api.listen = {} is not a loopback address: the local API must only listen on 127.0.0.1 (or ::1)",
                self.api.listen
            ));
        }
        if self.practice.name.trim().is_empty() {
            return Err("practice.name must not be empty".into());
        }
        self.emergency.policy()?;
        self.backup.schedule()?;
        self.sync.transport()?;
        self.sync.relay_config()?;
        self.sync.stun_server()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format = {:?}: use \"text\" or \"json\"",
                self.log.format
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).expect("config serializes");
        format!(
            "# chartmesh configuration. Every setting has a default; see docs/OPERATIONS.md.\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mapping_is_on_by_default_and_reads_on_off_or_booleans() {
        assert!(Config::default().sync.port_mapping);
        let read = |t: &str| toml::from_str::<Config>(t).map(|c| c.sync.port_mapping);
        assert!(!read("[sync]\nport_mapping = \"off\"\n").unwrap());
        assert!(read("[sync]\nport_mapping = \"on\"\n").unwrap());
        assert!(!read("[sync]\nport_mapping = false\n").unwrap());
        assert!(read("[sync]\n").unwrap());
        let e = read("[sync]\nport_mapping = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sync.port_mapping") && e.contains("\"off\""),
            "{e}"
        );
        // Written back as on/off, and read again.
        let mut c = Config::default();
        c.sync.port_mapping = false;
        let text = c.to_toml();
        assert!(text.contains("port_mapping = \"off\""), "{text}");
        assert!(!read(&text).unwrap());
        // The environment overrides it.
        c.apply_env(|k| (k == "CHARTMESH_SYNC_PORT_MAPPING").then(|| "on".into()))
            .unwrap();
        assert!(c.sync.port_mapping);
        assert!(
            c.apply_env(|k| (k == "CHARTMESH_SYNC_PORT_MAPPING").then(|| "x".into()))
                .unwrap_err()
                .contains("CHARTMESH_SYNC_PORT_MAPPING")
        );
    }

    #[test]
    fn relay_settings_are_checked_and_ids_read_in_both_forms() {
        let mut c = Config::default();
        assert_eq!(c.sync.relay_config(), Ok(None));
        c.sync.relay = Some("relay.example.org".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("sync.relay") && e.contains("HOST:PORT"), "{e}");
        c.sync.relay = Some("relay.example.org:22067".into());
        c.sync.relay_id = Some("nope".into());
        assert!(c.validate().unwrap_err().contains("sync.relay_id"));
        let bytes: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        c.sync.relay_id = Some(hex::encode(bytes));
        assert_eq!(c.sync.relay_config().unwrap().unwrap().pin, Some(bytes));
        c.sync.stun = Some("stun.example.org".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("sync.stun") && e.contains("HOST:PORT"), "{e}");
        c.sync.stun = Some("stun.example.org:3478".into());
        assert_eq!(
            c.sync.stun_server(),
            Ok(Some("stun.example.org:3478".into()))
        );
        // The device-id form: base32 in four groups of 13, each followed by a check
        // character, shown in groups of seven.
        let b32 = data_encoding::BASE32_NOPAD.encode(&bytes);
        let with_checks: String = b32
            .as_bytes()
            .chunks(13)
            .flat_map(|g| g.iter().copied().chain([b'Q']))
            .map(char::from)
            .collect();
        let shown: Vec<String> = with_checks
            .as_bytes()
            .chunks(7)
            .map(|g| String::from_utf8(g.to_vec()).unwrap())
            .collect();
        assert_eq!(parse_relay_id(&shown.join("-")), Some(bytes));
        c.sync.congestion = "vegas".into();
        assert!(c.validate().unwrap_err().contains("sync.congestion"));
    }

    #[test]
    fn defaults_round_trip_and_env_overrides() {
        let c = Config::default();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let mut c = Config::default();
        c.apply_env(|k| (k == "CHARTMESH_API_LISTEN").then(|| "127.0.0.1:9999".to_string()))
            .unwrap();
        assert_eq!(c.api.listen.port(), 9999);
        assert!(
            c.apply_env(|k| (k == "CHARTMESH_API_LISTEN").then(|| "nonsense".to_string()))
                .is_err()
        );
    }

    #[test]
    fn emergency_policy_and_duration_are_checked() {
        let mut c = Config::default();
        assert_eq!(
            c.emergency.policy(),
            Ok(chartmesh_core::emergency::Policy::Deny)
        );
        c.emergency.policy = "allow".into();
        c.emergency.duration = "90s".into();
        assert_eq!(
            c.emergency.policy(),
            Ok(chartmesh_core::emergency::Policy::Allow {
                duration_ms: 90_000
            })
        );
        for bad in ["0s", "9d", "h", "1000h", "x4h"] {
            c.emergency.duration = bad.into();
            assert!(c.validate().is_err(), "{bad}");
        }
        c.emergency.duration = "4h".into();
        c.emergency.policy = "maybe".into();
        assert!(c.validate().unwrap_err().contains("emergency.policy"));
    }

    #[test]
    fn a_non_loopback_api_is_refused() {
        let mut c = Config::default();
        c.api.listen = "0.0.0.0:7360".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("loopback"));
    }
}
