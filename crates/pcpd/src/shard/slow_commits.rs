//! The journal writer's warning about slow commits: every reply of a
//! commit's batches waited for its fdatasync, so a commit of 25 ms or more
//! is told in the log, at most once every 10 s, with how many there were
//! and the longest (`pcpd_journal_commit_seconds` counts them all; the log
//! says when). operations.md's troubleshooting table says what to look at.

use std::time::{Duration, Instant};

use pcp_store::Journal;

/// A commit at least this long is reported: every reply of its batches
/// waited that long.
const SLOW_COMMIT: Duration = Duration::from_millis(25);
/// At most one warning about slow commits per this long.
const SLOW_EVERY: Duration = Duration::from_secs(10);

/// Slow commits since the last warning.
#[derive(Default)]
pub(super) struct SlowCommits {
    since: u32,
    longest: Duration,
    warned: Option<Instant>,
}

impl SlowCommits {
    /// A commit took `latency`, at `now`: the slow commits (count and
    /// longest) to warn about, if it is time to. Slow commits held back
    /// are told at the first commit, slow or not, 10 s after the last
    /// warning: a stall that ends is still told.
    fn saw(&mut self, latency: Duration, now: Instant) -> Option<(u32, Duration)> {
        if latency >= SLOW_COMMIT {
            self.since += 1;
            self.longest = self.longest.max(latency);
        }
        if self.since == 0
            || self
                .warned
                .is_some_and(|t| now.duration_since(t) < SLOW_EVERY)
        {
            return None;
        }
        let told = (self.since, self.longest);
        *self = SlowCommits {
            warned: Some(now),
            ..SlowCommits::default()
        };
        Some(told)
    }

    pub(super) fn warn(&mut self, latency: Duration, journal: &Journal) {
        if let Some((commits, longest)) = self.saw(latency, Instant::now()) {
            tracing::warn!(
                journal = %journal.path().display(),
                commits,
                longest_ms = longest.as_millis() as u64,
                "journal commits over {} ms: their replies waited for the disk",
                SLOW_COMMIT.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// Slow commits are told at once, then at most every 10 s with how
    /// many there were since and the longest; fast ones never.
    #[test]
    fn slow_commits_are_told_at_most_every_ten_seconds_and_none_is_left_untold() {
        let mut slow = super::SlowCommits::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(slow.saw(ms(24), t0), None);
        assert_eq!(slow.saw(ms(30), t0), Some((1, ms(30))));
        assert_eq!(slow.saw(ms(90), t0 + ms(1000)), None);
        assert_eq!(slow.saw(ms(5), t0 + ms(2000)), None);
        assert_eq!(slow.saw(ms(40), t0 + ms(9000)), None);
        assert_eq!(slow.saw(ms(26), t0 + ms(10_000)), Some((3, ms(90))));
        assert_eq!(slow.saw(ms(26), t0 + ms(11_000)), None);
        // The last slow ones are told by the first fast commit after 10 s.
        assert_eq!(slow.saw(ms(3), t0 + ms(19_000)), None);
        assert_eq!(slow.saw(ms(3), t0 + ms(20_000)), Some((1, ms(26))));
        assert_eq!(slow.saw(ms(3), t0 + ms(40_000)), None);
    }
}
