//! Compressed framed streams: length-prefixed frames (4-byte big-endian length, then the
//! bytes) inside one zstd stream per direction, flushed after every frame. One compression
//! context spans the whole stream, so many similar chart documents compress together far
//! better than one at a time. The frame limit is checked on the decompressed length before
//! anything is allocated, so a small compressed input cannot make the reader allocate more
//! than one frame.

use async_compression::Level;
use async_compression::tokio::bufread::ZstdDecoder;
use async_compression::tokio::write::ZstdEncoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::FrameError;

/// zstd level used on sync streams (measured in docs/PERFORMANCE.md).
pub const LEVEL: i32 = 3;

pub struct FrameWriter {
    enc: ZstdEncoder<quinn::SendStream>,
}

pub struct FrameReader {
    inner: FrameDecoder<quinn::RecvStream>,
}

/// The decoding half of [`FrameReader`] over any byte stream: what the fuzz tests drive
/// with arbitrary input (net/tests/fuzz_frames.rs).
pub struct FrameDecoder<R> {
    dec: ZstdDecoder<BufReader<R>>,
    limit: usize,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> FrameWriter {
        FrameWriter {
            enc: ZstdEncoder::with_quality(send, Level::Precise(LEVEL)),
        }
    }

    /// Writes one frame and flushes it onto the wire.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), WireError> {
        if payload.len() > crate::MAX_FRAME {
            return Err(FrameError::TooLarge {
                size: payload.len(),
                limit: crate::MAX_FRAME,
            }
            .into());
        }
        self.enc
            .write_all(&(payload.len() as u32).to_be_bytes())
            .await?;
        self.enc.write_all(payload).await?;
        self.enc.flush().await?;
        Ok(())
    }

    /// Abandons the stream at once: the reader sees it reset, not ended.
    pub fn reset(mut self, code: u32) {
        let _ = self.enc.get_mut().reset(quinn::VarInt::from_u32(code));
    }

    /// Ends the stream cleanly (the reader sees the end after the last frame).
    pub async fn finish(mut self) -> Result<(), WireError> {
        self.enc.shutdown().await?;
        Ok(())
    }
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, limit: usize) -> FrameReader {
        FrameReader {
            inner: FrameDecoder::new(recv, limit),
        }
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        self.inner.recv().await
    }
}

impl<R: AsyncRead + Unpin> FrameDecoder<R> {
    pub fn new(input: R, limit: usize) -> FrameDecoder<R> {
        FrameDecoder {
            dec: ZstdDecoder::new(BufReader::new(input)),
            limit,
        }
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = self.dec.read(&mut len[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated.into())
                };
            }
            got += n;
        }
        let size = u32::from_be_bytes(len) as usize;
        if size > self.limit {
            return Err(FrameError::TooLarge {
                size,
                limit: self.limit,
            }
            .into());
        }
        let mut buf = vec![0u8; size];
        match self.dec.read_exact(&mut buf).await {
            Ok(_) => Ok(Some(buf)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(FrameError::Truncated.into())
            }
            Err(e) => Err(e.into()),
        }
    }
}
