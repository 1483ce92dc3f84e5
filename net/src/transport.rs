//! QUIC transport settings (quinn's `TransportConfig`) for the links practices actually have:
//! mobile routers and long rural lines with heavy loss and long round trips.
//!
//! The congestion controller is BBR by default: a loss-based controller (NewReno, Cubic)
//! halves its window on every loss event, and at 15 % random loss it never grows a window
//! worth having, while BBR paces by measured bandwidth and round trip and treats random loss
//! as noise. Measured numbers for each controller are in docs/PERFORMANCE.md.

use std::sync::Arc;
use std::time::Duration;

/// Which congestion controller a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// Model-based (bandwidth and round trip), tolerant of random loss. The default.
    #[default]
    Bbr,
    /// Loss-based, quinn's own default.
    Cubic,
    /// Loss-based, the RFC 9002 reference controller.
    NewReno,
}

impl Congestion {
    /// The names accepted in `sync.congestion`.
    pub const NAMES: &'static str = "\"bbr\", \"cubic\" or \"newreno\"";

    pub fn name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Congestion, String> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            _ => Err(format!(
                "{s:?} is not a congestion controller: use {}",
                Congestion::NAMES
            )),
        }
    }
}

/// Transport settings of an [`Endpoint`](crate::Endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transport {
    pub congestion: Congestion,
    /// A connection with no packet from the peer for this long is lost.
    pub idle_timeout: Duration,
    /// An idle connection sends a ping this often, so the idle timeout is only reached when
    /// the path is really gone (and NAT mappings stay open).
    pub keep_alive: Duration,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            congestion: Congestion::Bbr,
            // Several keep-alives must all be lost before a connection is given up: at 15 %
            // loss each way, six in a row fail with a probability of about 1e-4.
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

impl Transport {
    pub(crate) fn quinn_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(
            self.idle_timeout
                .try_into()
                .expect("idle timeout fits a QUIC varint"),
        ));
        t.keep_alive_interval(Some(self.keep_alive));
        match self.congestion {
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
        };
        // Path MTU discovery sends padded probes from both ends of every connection: with
        // quinn's defaults most of the bytes of a no-op reconnect, and even a single probe
        // each way costs ~3 KB, while larger packets did not measurably speed up a bulk sync
        // (docs/PERFORMANCE.md). Packets stay at QUIC's safe 1200 bytes.
        t.mtu_discovery_config(None);
        // A pull and an emergency request at a time each way, with room for a stream being
        // torn down; control messages (nudges) are single tiny frames. The sync engine refuses
        // more than it serves; this caps what a peer can make us hold.
        t.max_concurrent_bidi_streams(4u32.into());
        t.max_concurrent_uni_streams(8u32.into());
        t
    }
}
