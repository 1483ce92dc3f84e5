//! Fuzz target: the frame decoder (zstd stream, 4-byte length, limit) on arbitrary input.
//! Property-driven on the stable toolchain (proptest): arbitrary bytes, and valid streams
//! with bytes flipped, cut or inserted. Must never panic, never allocate past the limit,
//! and read back exactly what was written when the stream is intact.
//!
//! CI runs a short pass; a long run: `PROPTEST_CASES=200000 cargo test -p chartmesh-net
//! --test fuzz_frames --release`. A failing input is written by proptest under
//! `proptest-regressions/` (commit it) and can be kept as a file in `tests/fuzz-fixtures/`,
//! which every run replays.

use chartmesh_net::wire::FrameDecoder;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

const LIMIT: usize = 64 * 1024;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Decodes every frame of `input`; returns them and how the stream ended.
fn decode(input: &[u8]) -> (Vec<Vec<u8>>, Result<(), String>) {
    rt().block_on(async {
        let mut d = FrameDecoder::new(input, LIMIT);
        let mut out = Vec::new();
        loop {
            match d.recv().await {
                Ok(Some(f)) => {
                    assert!(f.len() <= LIMIT, "a frame over the limit was returned");
                    out.push(f)
                }
                Ok(None) => return (out, Ok(())),
                Err(e) => return (out, Err(e.to_string())),
            }
        }
    })
}

/// A valid stream: the frames, length-prefixed, in one zstd stream.
fn encode(frames: &[Vec<u8>], announce: Option<u32>) -> Vec<u8> {
    rt().block_on(async {
        let mut enc = async_compression::tokio::write::ZstdEncoder::new(Vec::new());
        for f in frames {
            let len = announce.unwrap_or(f.len() as u32);
            enc.write_all(&len.to_be_bytes()).await.unwrap();
            enc.write_all(f).await.unwrap();
        }
        enc.shutdown().await.unwrap();
        enc.into_inner()
    })
}

fn frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2000), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode(&input);
    }

    #[test]
    fn intact_streams_read_back_exactly(frames in frames()) {
        let (got, end) = decode(&encode(&frames, None));
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn damaged_streams_fail_cleanly(
        frames in frames(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
        lie in prop::option::of(any::<u32>()),
    ) {
        let s = damage(encode(&frames, lie), &flips, cut);
        // No panic, and nothing over the limit returned (checked in decode).
        let _ = decode(&s);
    }
}

/// Flips the given bytes, then cuts the stream short.
pub fn damage(
    mut s: Vec<u8>,
    flips: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    if s.is_empty() {
        return s;
    }
    for (i, x) in flips {
        let i = i.index(s.len());
        s[i] ^= x;
    }
    if let Some(c) = cut {
        s.truncate(c.index(s.len()));
    }
    s
}

/// Inputs kept from earlier findings, replayed every run.
#[test]
fn fixtures_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-fixtures");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.extension().is_none_or(|x| x != "md") {
            let _ = decode(&std::fs::read(&p).unwrap());
        }
    }
}

/// A frame announced over the limit is refused before its bytes are read or allocated.
#[test]
fn an_oversized_announcement_is_refused() {
    let (got, end) = decode(&encode(&[vec![1, 2, 3]], Some(u32::MAX)));
    assert!(got.is_empty());
    assert!(end.unwrap_err().contains("over the limit"));
}
