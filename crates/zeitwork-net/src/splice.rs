//! Forwarding between two TCP sockets that goes zero-copy for bulk data: a
//! read that fills the buffer starts `splice(2)` (socket → pipe → socket inside
//! the kernel, never through user space) until the burst is over; small
//! messages (requests, short responses) take one read and one write, which
//! costs fewer system calls than a splice through a pipe. An end of stream in
//! one direction half-closes the other socket's write side, as
//! `tokio::io::copy_bidirectional` does.

use std::io;

use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the pipe's default capacity).
const CHUNK: usize = 64 * 1024;

/// Forwards both ways until both directions ended; returns the bytes moved
/// (a → b, b → a).
pub async fn splice_bidirectional(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b), one_way(b, a))
}

/// Buffer of the copying path; a read that fills it means bulk data.
const BUFFER: usize = 16 * 1024;

/// Waits until `s` is ready for `interest` and runs `op`, again while it
/// would block. Each socket direction has one waiting future, so the
/// socket's single reader/writer waker slot serves (no waiter list, no lock).
async fn when_ready<R>(s: &TcpStream, interest: Interest, mut op: impl FnMut() -> io::Result<R>) -> io::Result<R> {
    loop {
        std::future::poll_fn(|cx| if interest.is_readable() { s.poll_read_ready(cx) } else { s.poll_write_ready(cx) })
            .await?;
        match s.try_io(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = when_ready(to, Interest::WRITABLE, || rustix::io::write(to, data).map_err(io::Error::from)).await?;
        data = &data[n..];
    }
    Ok(())
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; BUFFER];
    let mut pipe = None;
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let mut total = 0u64;
    loop {
        let n =
            when_ready(from, Interest::READABLE, || rustix::io::read(from, &mut buf).map_err(io::Error::from)).await?;
        if n == 0 {
            let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
            return Ok(total);
        }
        if n < BUFFER {
            // A short read emptied the socket: forget its readiness now
            // rather than learn it from a read that would block (a system
            // call per message saved). Readiness that arrived meanwhile
            // is newer and stays.
            let _ = from.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        }
        write_all(to, &buf[..n]).await?;
        total += n as u64;
        if n < BUFFER {
            continue;
        }
        // Bulk: splice what follows until the socket has nothing more right now.
        if pipe.is_none() {
            pipe = Some(pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?);
        }
        let Some((pipe_r, pipe_w)) = &pipe else { continue };
        loop {
            // The pipe is empty here, so "would block" can only mean the socket has nothing.
            let n = match from.try_io(Interest::READABLE, || Ok(splice(from, None, pipe_w, None, CHUNK, flags)?)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
                return Ok(total);
            }
            let mut left = n;
            while left > 0 {
                left -= when_ready(to, Interest::WRITABLE, || Ok(splice(pipe_r, None, to, None, left, flags)?)).await?;
            }
            total += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected pairs, spliced in the middle: what goes in one end comes
    /// out of the other, both ways, large and with half-closes.
    #[tokio::test]
    async fn bytes_cross_both_ways_and_half_closes_pass_through() {
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l1.local_addr().unwrap()).await.unwrap();
        let (mid_a, _) = l1.accept().await.unwrap();
        let mid_b = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = l2.accept().await.unwrap();
        let relay = tokio::spawn(async move { super::splice_bidirectional(&mid_a, &mid_b).await });

        let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = upload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), upload.len());
        assert!(got == upload, "the bytes arrive unchanged");
        // The server answers after the client's half-close.
        server.write_all(b"thanks").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"thanks");
        let (up, down) = relay.await.unwrap().unwrap();
        assert_eq!((up, down), (upload.len() as u64, 6));
    }
}
