//! How long the runtime waits for its peers, in one place.
//!
//! The defaults suit real networks. Tests that are not about a time limit set
//! short ones (see `DISTRIPOOL_TIMING` in the Python package), so that a
//! lost peer is found in a fraction of a second instead of ten.

use std::time::Duration;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often each side shows it is alive.
    pub heartbeat: Duration,
    /// Silence after which a peer is declared gone.
    pub silence: Duration,
    /// Longest a peer may take to complete the handshake.
    pub handshake: Duration,
    /// Longest an agent waits for the orchestrator to accept its connection.
    pub connect: Duration,
    /// First pause between an agent's attempts to join; it doubles after
    /// every failed attempt, up to `backoff_max`.
    pub backoff_start: Duration,
    pub backoff_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(1),
            silence: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(3),
            backoff_start: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl Timing {
    /// The names [`set`](Self::set) accepts, in order.
    pub const NAMES: [&'static str; 6] =
        ["heartbeat", "silence", "handshake", "connect", "backoff_start", "backoff_max"];

    /// Set one value by name, in seconds.
    pub fn set(&mut self, name: &str, seconds: f64) -> Result<()> {
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0) {
            return Err(Error::Config(format!(
                "timing {name} must be a number of seconds above 0 and at most 86400, not {seconds}"
            )));
        }
        let value = Duration::from_secs_f64(seconds);
        let field = match name {
            "heartbeat" => &mut self.heartbeat,
            "silence" => &mut self.silence,
            "handshake" => &mut self.handshake,
            "connect" => &mut self.connect,
            "backoff_start" => &mut self.backoff_start,
            "backoff_max" => &mut self.backoff_max,
            _ => {
                return Err(Error::Config(format!(
                    "unknown timing {name:?}; expected one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        };
        *field = value;
        Ok(())
    }

    /// Refuse values that contradict each other: a peer must be heard from
    /// more than once within the silence limit.
    pub fn validate(&self) -> Result<()> {
        if self.silence < self.heartbeat * 2 {
            return Err(Error::Config(format!(
                "the silence limit ({:?}) must be at least twice the heartbeat ({:?})",
                self.silence, self.heartbeat
            )));
        }
        if self.backoff_max < self.backoff_start {
            return Err(Error::Config(format!(
                "backoff_max ({:?}) must not be below backoff_start ({:?})",
                self.backoff_max, self.backoff_start
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_set_by_name_and_checked_together() {
        let mut t = Timing::default();
        t.set("heartbeat", 0.05).unwrap();
        t.set("silence", 0.5).unwrap();
        assert_eq!(t.heartbeat, Duration::from_millis(50));
        assert!(t.validate().is_ok());
        t.set("silence", 0.08).unwrap();
        assert!(t.validate().unwrap_err().to_string().contains("twice the heartbeat"));
        assert!(t.set("heartbeet", 1.0).unwrap_err().to_string().contains("unknown timing"));
        assert!(t.set("connect", 0.0).is_err());
        assert!(t.set("connect", f64::NAN).is_err());
    }
}
