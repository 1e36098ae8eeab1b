//! The liveness clock: when to send a heartbeat, when a peer is dead.
//!
//! It owns no timer. The caller reports when bytes were sent and received,
//! asks [`Liveness::poll_timeout`] when to wake, and calls
//! [`Liveness::handle_timeout`] then.

use std::time::{Duration, Instant};

/// Heartbeat settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// A heartbeat goes out when nothing was sent for this long.
    pub interval: Duration,
    /// The peer is dead when nothing arrived for this long.
    pub timeout: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
        }
    }
}

impl LivenessConfig {
    /// Checks that the timeout leaves room for at least one heartbeat.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.interval.is_zero() {
            return Err("heartbeat interval must be above zero");
        }
        if self.timeout <= self.interval {
            return Err("heartbeat timeout must be longer than the interval");
        }
        Ok(())
    }
}

/// What the clock wants done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessAction {
    /// Nothing is due.
    Idle,
    /// Send a heartbeat now.
    SendHeartbeat,
    /// The peer is dead: nothing arrived for `silent_for`.
    PeerDead {
        /// How long the peer was silent.
        silent_for: Duration,
    },
}

/// Tracks one peer's liveness.
#[derive(Clone, Debug)]
pub struct Liveness {
    config: LivenessConfig,
    last_recv: Instant,
    last_send: Instant,
}

impl Liveness {
    /// Starts the clock at `now`, as if bytes had just gone both ways.
    pub fn new(config: LivenessConfig, now: Instant) -> Self {
        Self {
            config,
            last_recv: now,
            last_send: now,
        }
    }

    /// Bytes arrived at `now`.
    pub fn on_recv(&mut self, now: Instant) {
        self.last_recv = self.last_recv.max(now);
    }

    /// Bytes went out at `now`.
    pub fn on_send(&mut self, now: Instant) {
        self.last_send = self.last_send.max(now);
    }

    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Instant {
        (self.last_send + self.config.interval).min(self.last_recv + self.config.timeout)
    }

    /// What is due at `now`. A heartbeat it asks for counts as sent.
    pub fn handle_timeout(&mut self, now: Instant) -> LivenessAction {
        let silent_for = now.saturating_duration_since(self.last_recv);
        if silent_for >= self.config.timeout {
            return LivenessAction::PeerDead { silent_for };
        }
        if now.saturating_duration_since(self.last_send) >= self.config.interval {
            self.last_send = now;
            return LivenessAction::SendHeartbeat;
        }
        LivenessAction::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn heartbeats_then_death() {
        let t0 = Instant::now();
        let cfg = LivenessConfig {
            interval: 100 * MS,
            timeout: 300 * MS,
        };
        let mut l = Liveness::new(cfg, t0);
        assert_eq!(l.poll_timeout(), t0 + 100 * MS);
        assert_eq!(l.handle_timeout(t0 + 50 * MS), LivenessAction::Idle);
        assert_eq!(
            l.handle_timeout(t0 + 100 * MS),
            LivenessAction::SendHeartbeat
        );
        assert_eq!(l.poll_timeout(), t0 + 200 * MS);
        l.on_recv(t0 + 150 * MS);
        assert_eq!(
            l.handle_timeout(t0 + 200 * MS),
            LivenessAction::SendHeartbeat
        );
        assert_eq!(
            l.handle_timeout(t0 + 300 * MS),
            LivenessAction::SendHeartbeat
        );
        assert_eq!(l.poll_timeout(), t0 + 400 * MS);
        assert_eq!(
            l.handle_timeout(t0 + 450 * MS),
            LivenessAction::PeerDead {
                silent_for: 300 * MS
            }
        );
    }

    #[test]
    fn sending_postpones_heartbeats_but_not_death() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        for i in 1..=5 {
            let now = t0 + Duration::from_millis(900 * i);
            l.on_send(now);
            if i < 4 {
                assert_eq!(l.handle_timeout(now), LivenessAction::Idle);
            }
        }
        assert!(matches!(
            l.handle_timeout(t0 + Duration::from_secs(3)),
            LivenessAction::PeerDead { .. }
        ));
    }

    #[test]
    fn config_is_checked() {
        assert!(LivenessConfig::default().validate().is_ok());
        let bad = LivenessConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        };
        assert!(bad.validate().is_err());
    }
}
