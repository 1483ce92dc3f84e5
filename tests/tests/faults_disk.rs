//! Disk full: the data directory on a small tmpfs mounted by the test (needs root and
//! mount(2); skipped with a message elsewhere). Writes are refused with an error that says
//! the disk is full and what to do, nothing acknowledged is lost or damaged, the daemon
//! keeps serving reads, and writes work again once space is freed.

#[path = "faults_util/mod.rs"]
mod util;

use chartmesh_tests::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use util::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size_mb: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            Some(Tmpfs(dir))
        } else {
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Fills the file system holding `dir` until a write fails; returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    for _ in 0..64 {
        let _ = f.write_all(&[0u8; 512]);
    }
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_disk_refuses_writes_clearly_loses_nothing_and_recovers_when_space_is_freed() {
    let Some(fs) = Tmpfs::mount(48) else {
        println!(
            "SKIPPED: disk-full test needs root and permission to mount a tmpfs (mount -t tmpfs)"
        );
        return;
    };
    let mut a = Practice::new_in(&fs.0, "Full Disk Clinic");
    let lines = bench_lines();
    let (s, v) = a
        .post("/import", lines[..100].join("\n").as_bytes(), "t")
        .unwrap();
    assert_eq!((s, v["imported"].as_u64()), (200, Some(100)), "{v}");
    let mut acked: Vec<String> = lines[..100].iter().map(|l| id_of(l)).collect();
    let filler = fill(&fs.0);

    // Import 20 at a time until the disk refuses (the WAL may still have room for a few).
    let mut refused_at = None;
    for (i, chunk) in lines[100..].chunks(20).enumerate() {
        let file = a.dir.with_extension(format!("c{i}.jsonl"));
        // The test's own files go to /tmp, not the full disk.
        let file = std::env::temp_dir().join(file.file_name().unwrap());
        std::fs::write(&file, chunk.join("\n")).unwrap();
        let out = a.cli(&["import", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&file);
        if out.status.success() {
            acked.extend(chunk.iter().map(|l| id_of(l)));
            continue;
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("disk holding the store is full") && err.contains("free some space"),
            "the CLI should say the disk is full and what to do: {err}"
        );
        refused_at = Some((i, chunk.to_vec()));
        break;
    }
    let (i, refused) = refused_at.expect("a full disk never refused a write");
    println!(
        "disk full: refused the import of chunk {i} after {} charts",
        acked.len()
    );
    assert!(
        a.running(),
        "the daemon died on a full disk; log: {}",
        a.log()
    );

    // An edit is refused the same way (or kept, if it still fit): never half-written.
    let chart = acked[0].clone();
    let (s, v) = a
        .post(&format!("/charts/{chart}/notes"), &note_body("full-1"), "t")
        .unwrap();
    assert!(
        s == 201 || (s == 507 && v["error"]["kind"] == "disk-full"),
        "{s} {v}"
    );
    let edit_kept = s == 201;
    // Every read of a chart is audited, so while no audit entry can be written reads are
    // refused the same way (never served unaudited); the status, which names no chart, works.
    let (s, v) = a.try_get(&format!("/charts/{chart}")).unwrap();
    assert!(
        s == 200 || (s == 507 && v["error"]["kind"] == "disk-full"),
        "{s} {v}"
    );
    assert_eq!(a.try_get("/status").unwrap().0, 200);
    // An export is audited before its first chart leaves: while the entry cannot be
    // written, not one chart is exported (if the entry still fit, all of them are).
    let out = a.cli(&["export"]);
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        (out.status.success() && lines >= acked.len()) || (!out.status.success() && lines == 0),
        "export on a full disk: {:?}, {lines} lines, {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "export on the full disk: {}",
        if out.status.success() {
            "audited and sent (the entry fit)"
        } else {
            "refused, nothing sent"
        }
    );

    // Free the space: reads and writes work again, nothing refused was stored, every
    // acknowledged chart is there, and the refused work now completes.
    std::fs::remove_file(filler).unwrap();
    for id in &acked {
        assert_eq!(a.try_get(&format!("/charts/{id}")).unwrap().0, 200, "{id}");
    }
    for l in &refused {
        assert_eq!(a.try_get(&format!("/charts/{}", id_of(l))).unwrap().0, 404);
    }
    let (s, v) = a
        .post("/import", refused.join("\n").as_bytes(), "t")
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    acked.extend(refused.iter().map(|l| id_of(l)));
    let (s, _) = a
        .post(&format!("/charts/{chart}/notes"), &note_body("full-2"), "t")
        .unwrap();
    assert_eq!(s, 201);
    let c = a.get(&format!("/charts/{chart}"));
    assert!(has_note(&c, "full-2"));
    assert_eq!(has_note(&c, "full-1"), edit_kept);
    assert_eq!(a.get("/audit/verify")["ok"], true);
    assert_eq!(
        a.get("/status")["charts"].as_u64().unwrap(),
        acked.len() as u64
    );
    a.stop();
    assert_eq!(
        assert_store_consistent(&a.dir, "after the full disk"),
        acked.len() as i64
    );
    a.start();
    assert_eq!(
        a.get("/status")["charts"].as_u64().unwrap(),
        acked.len() as u64
    );
    a.stop();
    println!(
        "fault figures: disk full = 1 scenario, refused writes kept nothing, lost acknowledged writes = 0"
    );
}
