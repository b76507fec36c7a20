//! How a response body ends, and the chunked-coding follower that finds
//! where a chunked body ends as it passes through unchanged.

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes; the client's connection closes after it.
    Close,
}

/// Follows a chunked body as it goes through unchanged, to know where it
/// ends; refuses anything that is not well-formed chunked coding.
#[derive(Debug, Default)]
pub(super) struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u8,
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

pub(super) const MAX_CHUNK_LINE: usize = 4096;

impl Chunks {
    /// Consumes `data` up to the end of the body; returns how many bytes
    /// belong to it.
    pub(super) fn feed(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() && self.state != Done {
            if self.state == Data {
                let take = (data.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err("chunk line too long");
            }
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err("chunk size too large");
                    }
                    self.size = self.size * 16 + u64::from((b as char).to_digit(16).unwrap_or(0));
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk line"),
                (Extension, _) => Extension,
                (SizeLf, b'\n') => {
                    self.line = 0;
                    self.digits = 0;
                    if self.size == 0 {
                        TrailerStart
                    } else {
                        Data
                    }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.line = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b'\n') => return Err("bare LF in a trailer"),
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => {
                    self.line = 0;
                    TrailerStart
                }
                (EndLf, b'\n') => Done,
                _ => return Err("malformed chunked body"),
            };
        }
        Ok(i)
    }

    pub(super) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_end_where_they_say() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let mut c = Chunks::default();
        assert_eq!(c.feed(body).unwrap(), body.len() - 4);
        assert!(c.done());
        // The same, a byte at a time.
        let mut c = Chunks::default();
        let mut used = 0;
        for b in body.iter() {
            used += c.feed(std::slice::from_ref(b)).unwrap();
            if c.done() {
                break;
            }
        }
        assert_eq!(used, body.len() - 4);
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"5\nhello", b"ffffffffffffffff1\r\n", b"\r\n"] {
            assert!(Chunks::default().feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
