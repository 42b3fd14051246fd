//! RFC 3339 times as the admin API, the NAT log and pcpctl write and read
//! them: Unix milliseconds of wall time, UTC. Shared by the `pcpd` and
//! `pcpctl` binaries (pcpctl includes this file by path).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `ms` (Unix milliseconds) as RFC 3339 in UTC; `None` out of range.
pub(crate) fn format_ms(ms: u64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// An RFC 3339 time as Unix milliseconds; the error says what is wrong.
pub(crate) fn parse_ms(s: &str) -> Result<u64, String> {
    let t =
        OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("{s:?} is not RFC 3339: {e}"))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{s:?} is before 1970"))
}

/// Now, in Unix milliseconds.
#[allow(dead_code)] // pcpctl's; pcpd has its own clock (clock.rs)
pub(crate) fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}
