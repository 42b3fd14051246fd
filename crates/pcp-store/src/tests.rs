use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::{Block, Event, Mapping, MappingExtra, MappingId, MappingKind};
use pcp_wire::{Filter, Nonce};

use super::commits::{COMMIT_MAX, PREALLOC};
use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcp-store-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// An epoch and an empty snapshot in `d`: the journal that follows it.
fn empty_state(d: &Path) -> Journal {
    write_epoch(d, 1).unwrap();
    write_snapshot(d, 0, 1, Vec::new()).unwrap()
}

fn mapping(port: u16, extra: bool) -> Mapping {
    Mapping {
        id: MappingId {
            shard: 0,
            slot: 0,
            generation: 0,
        },
        kind: if port % 2 == 0 {
            MappingKind::Map
        } else {
            MappingKind::Peer {
                remote_addr: "2001:db8::7".parse().unwrap(),
                remote_port: 443,
            }
        },
        internal_addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
        internal_port: port,
        protocol: 6,
        external_addr: Ipv4Addr::new(192, 0, 2, 1),
        external_port: 1024 + port,
        firewall: false,
        port_count: 1,
        nonce: Nonce([port as u8; 12]),
        created_ms: 1000,
        expires_ms: 9_000_000,
        durable_ms: 9_000_000,
        client_port: 5000,
        natpmp: false,
        extra: extra.then(|| {
            Box::new(MappingExtra {
                filters: vec![Filter {
                    prefix_len: 120,
                    remote_port: 0,
                    remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)),
                }],
                description: Some("ünïcode web".into()),
                manager: Some("10.0.0.9".parse().unwrap()),
                prefer_failure: true,
            })
        }),
    }
}

fn block() -> Block {
    Block {
        addr: Ipv4Addr::new(192, 0, 2, 1),
        first: 1024,
        len: 512,
    }
}

fn sub() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))
}

#[test]
fn pinholes_and_natpmp_mappings_round_trip_with_their_flags() {
    let d = dir("pinhole");
    write_epoch(&d, 1).unwrap();
    let mut pinhole = mapping(20, true);
    pinhole.internal_addr = "2001:db8:f00::1".parse().unwrap();
    pinhole.external_addr = Ipv4Addr::UNSPECIFIED;
    pinhole.external_port = pinhole.internal_port;
    pinhole.firewall = true;
    let mut natpmp = mapping(22, false);
    natpmp.natpmp = true;
    natpmp.nonce = Nonce::default();
    let mut j = write_snapshot(&d, 0, 1, vec![Record::Mapping(pinhole.clone())]).unwrap();
    j.append(&Record::Mapping(natpmp.clone()));
    assert!(j.commit().unwrap());
    let st = load(&d).unwrap();
    let mut got: Vec<Mapping> = st.mappings.into_values().collect();
    got.sort_by_key(|m| m.internal_port);
    assert_eq!(got, vec![pinhole, natpmp]);
}

#[test]
fn snapshot_and_journal_round_trip() {
    let d = dir("roundtrip");
    write_epoch(&d, 777).unwrap();
    let snap = vec![
        Record::Block {
            subscriber: sub(),
            block: block(),
            since: 5,
        },
        Record::Mapping(mapping(10, true)),
        Record::Mapping(mapping(11, false)),
    ];
    let mut j = write_snapshot(&d, 0, 1, snap).unwrap();
    let mut recs = Vec::new();
    Record::from_event(&Event::MappingCreated(mapping(12, false)), 50, &mut recs);
    Record::from_event(
        &Event::MappingDeleted {
            mapping: mapping(10, true),
            reason: pcp_engine::DeleteReason::Client,
        },
        60,
        &mut recs,
    );
    for r in &recs {
        j.append(r);
    }
    assert!(j.commit().unwrap());
    assert!(!j.commit().unwrap(), "nothing pending");
    let st = load(&d).unwrap();
    assert_eq!(st.epoch_start, Some(777));
    assert_eq!(st.blocks.len(), 1);
    let mut ports: Vec<u16> = st.mappings.values().map(|m| m.internal_port).collect();
    ports.sort_unstable();
    assert_eq!(ports, vec![11, 12]);
    assert!(st.mappings.values().any(|m| m == &mapping(11, false)));
    assert!(st.warnings.is_empty());
    // Every field survives, extras included.
    let mut j = write_snapshot(&d, 0, 2, vec![Record::Mapping(mapping(10, true))]).unwrap();
    j.append(&Record::History(Holder {
        internal_addr: sub(),
        block: block(),
        from_ms: Some(1),
        to_ms: Some(2),
    }));
    j.commit().unwrap();
    let st = load(&d).unwrap();
    assert_eq!(
        st.mappings.values().collect::<Vec<_>>(),
        vec![&mapping(10, true)]
    );
    assert_eq!(st.history.len(), 1);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn torn_last_record_is_cut_with_a_warning() {
    let d = dir("torn");
    let mut j = empty_state(&d);
    for p in 0..3 {
        j.append(&Record::Mapping(mapping(p * 2, false)));
        j.commit().unwrap();
    }
    let path = j.path().to_path_buf();
    // A crash mid-write leaves half of the last commit: the rest of it is
    // still the preallocated zeros.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0; 10], j.len() - 10).unwrap();
    }
    let st = load(&d).unwrap();
    assert_eq!(
        st.mappings.len(),
        2,
        "the records before the torn one are kept"
    );
    assert_eq!(st.warnings.len(), 1);
    assert!(
        st.warnings[0].contains("torn last record"),
        "{:?}",
        st.warnings
    );
    // The file was cut back to the last good record: loading again is clean.
    let st = load(&d).unwrap();
    assert_eq!((st.mappings.len(), st.warnings.len()), (2, 0));
    // Damage to an earlier commit, even its header, with a whole commit
    // after it, is not a torn write.
    let mut bytes = fs::read(&path).unwrap();
    bytes[HEADER_LEN + 9] ^= 0x55;
    fs::write(&path, &bytes).unwrap();
    let err = load(&d).unwrap_err().to_string();
    assert!(
        err.contains(&format!("damaged at byte {HEADER_LEN}")),
        "{err}"
    );
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn commits_write_over_preallocated_zeros_and_a_torn_commit_may_be_any_of_its_pages() {
    let d = dir("prealloc");
    let mut j = empty_state(&d);
    let size = |j: &Journal| fs::metadata(j.path()).unwrap().len();
    j.append(&Record::Mapping(mapping(2, false)));
    j.commit().unwrap();
    let grown = size(&j);
    assert!(grown >= j.len() + PREALLOC, "{grown}");
    // Small commits land in the zeros: the file keeps its size, so their
    // fdatasync has no metadata to write.
    for p in 2..50 {
        j.append(&Record::Mapping(mapping(p * 2, false)));
        j.commit().unwrap();
    }
    assert_eq!(size(&j), grown);
    // One commit larger than a piece, and than the zeros left: written in
    // pieces, the file grown first.
    for p in 50..20_000u16 {
        j.append(&Record::Mapping(mapping(p * 2, false)));
    }
    assert!(j.buf.len() > 2 * COMMIT_MAX);
    j.commit().unwrap();
    assert!(size(&j) >= j.len() + PREALLOC);
    let st = load(&d).unwrap();
    assert_eq!((st.mappings.len(), st.warnings.len()), (19_999, 0));
    // A crash mid-commit where a later page was written and an earlier one
    // not: a zero frame, then some of the commit, then zeros. Torn.
    let end = j.len();
    j.append(&Record::Mapping(mapping(40_002, false)));
    j.commit().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(j.path()).unwrap();
        f.write_all_at(&[0; 8], end).unwrap();
        f.write_all_at(&[0xab; 100], end + 5000).unwrap();
    }
    let st = load(&d).unwrap();
    assert_eq!(st.mappings.len(), 19_999, "{:?}", st.warnings);
    assert!(
        st.warnings[0].contains("never written whole"),
        "{:?}",
        st.warnings
    );
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn a_journal_of_the_first_format_still_loads() {
    // Records appended one after the other, as pcpd wrote them before
    // commits went over preallocated zeros: an upgrade reads them.
    let d = dir("format1");
    empty_state(&d);
    let mut b = header(JOURNAL_MAGIC, 1).to_vec();
    for p in 0..3 {
        frame(&Record::Mapping(mapping(p * 2, false)), &mut b);
    }
    fs::write(journal_path(&d, 0), &b).unwrap();
    let st = load(&d).unwrap();
    assert_eq!((st.mappings.len(), st.warnings.len()), (3, 0));
    // Its torn last record is cut as it always was.
    fs::write(journal_path(&d, 0), &b[..b.len() - 5]).unwrap();
    let st = load(&d).unwrap();
    assert_eq!((st.mappings.len(), st.warnings.len()), (2, 1));
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn damage_before_the_end_is_an_error_with_offset_and_remedies() {
    let d = dir("corrupt");
    let mut j = empty_state(&d);
    // More committed after the damage than a torn commit could leave.
    for p in 0..10_000u16 {
        j.append(&Record::Mapping(mapping(p * 2, false)));
    }
    j.commit().unwrap();
    assert!(j.len() > 2 * COMMIT_MAX as u64 + 1000);
    let path = j.path().to_path_buf();
    let good = fs::read(&path).unwrap();
    let mut bytes = good.clone();
    bytes[HEADER_LEN + 12] ^= 0xff; // inside the first record's body
    fs::write(&path, &bytes).unwrap();
    let err = load(&d).unwrap_err().to_string();
    assert!(
        err.contains(&format!("damaged at byte {HEADER_LEN}")),
        "{err}"
    );
    assert!(
        err.contains("--discard-state") && err.contains("truncate -s 16"),
        "{err}"
    );
    // A zeroed frame with records after it is damage too, not the end.
    let mut bytes = good;
    bytes[HEADER_LEN..HEADER_LEN + 8].fill(0);
    fs::write(&path, &bytes).unwrap();
    let err = load(&d).unwrap_err().to_string();
    assert!(err.contains("damaged commit before more records"), "{err}");
    // A damaged snapshot is never a torn write.
    let d2 = dir("corrupt-snap");
    write_epoch(&d2, 1).unwrap();
    write_snapshot(&d2, 0, 1, vec![Record::Mapping(mapping(2, false))]).unwrap();
    let sp = d2.join("shard-0.snap");
    let len = fs::metadata(&sp).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&sp)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    assert!(matches!(load(&d2), Err(StoreError::Corrupt { .. })));
    // Not our file at all.
    fs::write(d2.join("shard-1.journal"), b"hello world, not a journal").unwrap();
    assert!(load(&d2).is_err());
    let _ = fs::remove_dir_all(&d);
    let _ = fs::remove_dir_all(&d2);
}

#[test]
fn state_without_epoch_is_refused_and_discard_moves_it_aside() {
    let d = dir("noepoch");
    write_snapshot(&d, 0, 1, vec![Record::Mapping(mapping(2, false))]).unwrap();
    let err = load(&d).unwrap_err().to_string();
    assert!(err.contains("without an epoch file"), "{err}");
    let aside = discard(&d, 42).unwrap().unwrap();
    assert!(aside.join("shard-0.snap").exists());
    let st = load(&d).unwrap();
    assert!(st.is_empty());
    assert_eq!(discard(&d, 43).unwrap(), None, "nothing left to discard");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn newer_generations_win_and_stale_shards_are_removed() {
    let d = dir("gens");
    write_epoch(&d, 1).unwrap();
    // Shard 3 of an older layout, and shard 0 of the newer one, both with port 2.
    let mut old = mapping(2, false);
    old.external_port = 1111;
    write_snapshot(&d, 3, 10, vec![Record::Mapping(old)]).unwrap();
    write_snapshot(&d, 0, 20, vec![Record::Mapping(mapping(2, false))]).unwrap();
    let st = load(&d).unwrap();
    assert_eq!(st.mappings.values().next().unwrap().external_port, 1026);
    remove_stale(&d, 1).unwrap();
    assert!(!d.join("shard-3.snap").exists());
    assert!(d.join("shard-0.snap").exists());
    let _ = fs::remove_dir_all(&d);
}

fn faulty(name: &str) -> (PathBuf, std::sync::Arc<Faults>, Journal) {
    let d = dir(name);
    write_epoch(&d, 1).unwrap();
    let faults = std::sync::Arc::new(Faults::default());
    let j = write_snapshot_with(&d, 0, 1, Vec::new(), Some(faults.clone())).unwrap();
    (d, faults, j)
}

#[test]
fn a_failed_write_is_cut_off_and_poisons_until_a_snapshot() {
    let (d, faults, mut j) = faulty("enospc");
    j.append(&Record::Mapping(mapping(2, false)));
    assert!(j.commit().unwrap());
    let good = j.len();
    // A full disk: the batch is refused and the file ends on a whole record.
    faults.fail_writes(1);
    j.append(&Record::Mapping(mapping(4, false)));
    assert!(matches!(j.commit(), Err(CommitError::Write { .. })));
    assert_eq!(fs::metadata(j.path()).unwrap().len(), good);
    // Space is back, but the journal takes nothing until a snapshot.
    j.append(&Record::Mapping(mapping(6, false)));
    assert!(matches!(j.commit(), Err(CommitError::Poisoned { .. })));
    assert!(j.is_poisoned());
    // A snapshot that cannot be written keeps the old files and the poison.
    faults.fail_writes(1);
    let state = vec![
        Record::Mapping(mapping(2, false)),
        Record::Mapping(mapping(6, false)),
    ];
    assert!(j.compact(2, state.clone()).is_err());
    assert!(j.is_poisoned());
    assert!(
        !d.join("shard-0.snap.tmp").exists(),
        "no half-written copy left"
    );
    assert_eq!(load(&d).unwrap().mappings.len(), 1, "old files intact");
    // Then it can: a new generation, and appends resume behind it.
    j.compact(2, state).unwrap();
    assert!(!j.is_poisoned());
    j.append(&Record::Mapping(mapping(8, false)));
    assert!(j.commit().unwrap());
    let loaded = load(&d).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.mappings.len(), 3);
}

#[test]
fn a_failed_fsync_is_never_retried_as_if_safe() {
    // fsyncgate: after a failed fdatasync the dirty pages may be gone, so
    // the batch is refused and no later commit is trusted either until the
    // state is rewritten from memory.
    let (d, faults, mut j) = faulty("eio");
    faults.fail_syncs(1);
    j.append(&Record::Mapping(mapping(2, false)));
    assert!(matches!(j.commit(), Err(CommitError::Sync { .. })));
    j.append(&Record::Mapping(mapping(4, false)));
    assert!(matches!(j.commit(), Err(CommitError::Poisoned { .. })));
    assert!(
        load(&d).unwrap().mappings.is_empty(),
        "nothing of the failed batch kept"
    );
    j.compact(2, vec![Record::Mapping(mapping(4, false))])
        .unwrap();
    assert_eq!(load(&d).unwrap().mappings.len(), 1);
}

#[test]
fn a_journal_older_than_its_snapshot_is_ignored() {
    // A crash between the snapshot's rename and the journal's.
    let d = dir("interrupted");
    let mut j = empty_state(&d);
    j.append(&Record::Mapping(mapping(2, false)));
    j.commit().unwrap();
    let old_journal = fs::read(j.path()).unwrap();
    write_snapshot(&d, 0, 2, vec![Record::Mapping(mapping(2, false))]).unwrap();
    fs::write(d.join("shard-0.journal"), old_journal).unwrap();
    let loaded = load(&d).unwrap();
    assert_eq!(loaded.mappings.len(), 1);
    assert_eq!(loaded.warnings.len(), 1);
}

/// The ports of the mappings `load` finds.
fn loaded_ports(d: &Path) -> Vec<u16> {
    let mut ports: Vec<u16> = load(d)
        .unwrap()
        .mappings
        .values()
        .map(|m| m.internal_port)
        .collect();
    ports.sort_unstable();
    ports
}

/// A compaction beside the journal (rotation.rs): commits go on in the
/// next journal while the snapshot is written, and a crash at each step
/// (before the snapshot is in place, between the two renames, after)
/// loses no record.
#[test]
fn a_rotation_loses_nothing_at_any_step() {
    let d = dir("rotation");
    write_epoch(&d, 1).unwrap();
    let mut j = write_snapshot(&d, 0, 1, vec![Record::Mapping(mapping(2, false))]).unwrap();
    j.append(&Record::Mapping(mapping(4, false)));
    j.commit().unwrap();
    // The state up to now, as the shard would take it.
    let state = vec![
        Record::Mapping(mapping(2, false)),
        Record::Mapping(mapping(4, false)),
    ];
    let target = j.rotate(2).unwrap();
    assert!(j.is_rotated());
    j.append(&Record::Mapping(mapping(6, false)));
    j.append(&Record::Gone(mapping(2, false).key()));
    j.commit().unwrap();
    // Crash before the snapshot is written: old snapshot, old journal,
    // then the next journal.
    assert_eq!(loaded_ports(&d), vec![4, 6]);
    let tmp = target.write(2, state.into_iter().map(Ok)).unwrap();
    // Crash with the snapshot written but not in place: the same.
    assert_eq!(loaded_ports(&d), vec![4, 6]);
    // Crash between the renames: the old journal is older than the new
    // snapshot (ignored), the next journal follows the snapshot.
    let next = d.join("shard-0.journal.next");
    fs::rename(&tmp, d.join("shard-0.snap")).unwrap();
    let between = load(&d).unwrap();
    let mut ports: Vec<u16> = between.mappings.values().map(|m| m.internal_port).collect();
    ports.sort_unstable();
    assert_eq!(ports, vec![4, 6]);
    assert_eq!(between.warnings.len(), 1, "{:?}", between.warnings);
    // Completed: snapshot and journal of generation 2, commits go on.
    let tmp = target
        .write(
            2,
            [
                Record::Mapping(mapping(2, false)),
                Record::Mapping(mapping(4, false)),
            ]
            .map(Ok),
        )
        .unwrap();
    j.complete_rotation(&tmp).unwrap();
    assert!(!j.is_rotated());
    assert!(!next.exists());
    j.append(&Record::Mapping(mapping(8, false)));
    j.commit().unwrap();
    assert_eq!(loaded_ports(&d), vec![4, 6, 8]);
    assert!(load(&d).unwrap().warnings.is_empty());
    let _ = fs::remove_dir_all(&d);
}

/// A rotation whose snapshot failed (a full disk) keeps committing to the
/// next journal; the synchronous compaction after it replaces every file
/// and removes the next journal.
#[test]
fn a_failed_background_snapshot_leaves_the_next_journal_until_a_compaction() {
    let (d, faults, mut j) = faulty("rotation-fail");
    j.append(&Record::Mapping(mapping(2, false)));
    j.commit().unwrap();
    let target = j.rotate(2).unwrap();
    faults.fail_writes(1);
    assert!(target
        .write(2, [Ok(Record::Mapping(mapping(2, false)))])
        .is_err());
    // A snapshot whose records end in an error (the shard stopped handing
    // them over) is abandoned the same way.
    let abandoned = [
        Ok(Record::Mapping(mapping(2, false))),
        Err(std::io::Error::other("abandoned")),
    ];
    assert!(target.write(2, abandoned).is_err());
    assert!(
        !d.join("shard-0.snap.tmp").exists(),
        "the half-written copy is removed"
    );
    j.append(&Record::Mapping(mapping(4, false)));
    j.commit().unwrap();
    assert_eq!(loaded_ports(&d), vec![2, 4]);
    j.compact(
        3,
        vec![
            Record::Mapping(mapping(2, false)),
            Record::Mapping(mapping(4, false)),
        ],
    )
    .unwrap();
    assert!(!d.join("shard-0.journal.next").exists());
    assert!(!j.is_rotated());
    assert_eq!(loaded_ports(&d), vec![2, 4]);
    assert!(load(&d).unwrap().warnings.is_empty());
    let _ = fs::remove_dir_all(&d);
}
