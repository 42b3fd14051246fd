//! The daemon's clocks. Expiry, timers and the epoch run on the *engine
//! clock*: the wall clock read once at start, advanced by the monotonic
//! clock, so an NTP step (forward or back) neither expires every mapping
//! at once nor keeps dead ones alive. The wall clock is used for what is
//! persisted, logged or shown: journal records are written in wall time
//! (shifted by the current difference), NAT log timestamps and API times
//! are wall time, and the next start re-anchors on the wall clock.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pcp_engine::{shift_ms, Millis};

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// The engine clock, in milliseconds: wall time at the first call, then
/// monotonic.
pub fn now_ms() -> Millis {
    static ANCHOR: OnceLock<(Instant, Millis)> = OnceLock::new();
    let (at, wall) = *ANCHOR.get_or_init(|| (Instant::now(), wall_ms()));
    wall + at.elapsed().as_millis() as Millis
}

/// A change of the wall clock's lead under this is jitter (two clocks read
/// a moment apart) or slow drift, not a step.
const STEP_MS: i64 = 1000;

/// How far the wall clock is ahead of the engine clock (negative: behind).
/// Zero until the wall clock is stepped while pcpd runs; it changes only by
/// a step of a second or more, so the same engine instant is the same wall
/// instant in every record written meanwhile.
pub fn wall_offset_ms() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static HELD: AtomicI64 = AtomicI64::new(0);
    let raw = wall_ms() as i64 - now_ms() as i64;
    let held = HELD.load(Ordering::Relaxed);
    if (raw - held).abs() < STEP_MS {
        return held;
    }
    HELD.store(raw, Ordering::Relaxed);
    raw
}

/// An engine-clock instant as wall time (for the API and logs).
pub fn to_wall(ms: Millis) -> Millis {
    shift_ms(ms, wall_offset_ms())
}

/// A wall-clock instant as engine time (for questions asked in wall time).
pub fn from_wall(ms: Millis) -> Millis {
    shift_ms(ms, -wall_offset_ms())
}
