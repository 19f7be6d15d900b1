//! Pipelined requests served inside one task.
//!
//! A connection (an NBD client, a peer link) starts each request it reads by
//! polling it once in place: a request whose I/O finishes at once answers
//! without any task or thread hop. A request that must wait joins the set
//! in flight, which the connection's own task polls again when it is woken.
//! [`Pipeline::finished`] hands over the answers of every request finished
//! by one wake-up (a batch of acknowledgements, several I/O completions),
//! so they leave in one vectored write ([`write_batch`]).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Most buffers one vectored write takes.
pub const MAX_SLICES: usize = 512;

/// Writes every byte of `parts`, in order, with as few vectored writes as
/// the writer allows, then empties `parts`.
pub async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    parts: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            break;
        }
        let slices: Vec<IoSlice<'_>> = parts[first..]
            .iter()
            .take(MAX_SLICES)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = parts[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                parts[first].advance(n);
                n = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

/// A request in flight.
type Request<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The requests of one connection that are in flight.
pub struct Pipeline<'a, T> {
    in_flight: FuturesUnordered<Request<'a, T>>,
}

impl<T> Default for Pipeline<'_, T> {
    fn default() -> Self {
        Pipeline {
            in_flight: FuturesUnordered::new(),
        }
    }
}

impl<'a, T> Pipeline<'a, T> {
    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether no request is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Starts a request: polls it once in place and returns its answer if
    /// it finished; otherwise it joins the requests in flight.
    pub fn start(&mut self, request: impl Future<Output = T> + Send + 'a) -> Option<T> {
        let mut request: Request<'a, T> = Box::pin(request);
        // The first poll uses a no-op waker; a request that must wait is
        // polled again by the set in flight, with the connection's waker.
        match request
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(answer) => Some(answer),
            Poll::Pending => {
                self.in_flight.push(request);
                None
            }
        }
    }

    /// Waits until at least one request in flight has finished, and passes
    /// the answer of every request finished by then to `take`. Pending
    /// forever while nothing is in flight.
    pub fn finished<'p, F>(
        &'p mut self,
        mut take: F,
    ) -> impl Future<Output = ()> + use<'a, 'p, T, F>
    where
        F: FnMut(T) + 'p,
    {
        std::future::poll_fn(move |cx| {
            let mut any = false;
            while let Poll::Ready(Some(answer)) = self.in_flight.poll_next_unpin(cx) {
                take(answer);
                any = true;
            }
            if any {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl<T> Pipeline<'_, T> {
    /// Ends a connection: writes `unsent`, lets every request in flight
    /// finish and writes their answers (`encode` turns one into bytes) for
    /// as long as the writer takes them. Returns whether it still does.
    pub async fn finish<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        mut unsent: Vec<Bytes>,
        mut encode: impl FnMut(T, &mut Vec<Bytes>),
    ) -> bool {
        let mut writable = write_batch(writer, &mut unsent).await.is_ok();
        while !self.is_empty() {
            self.finished(|answer| encode(answer, &mut unsent)).await;
            writable = writable && write_batch(writer, &mut unsent).await.is_ok();
            unsent.clear();
        }
        writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_requests_answer_in_place_and_waiting_ones_in_a_batch() {
        let mut pipeline = Pipeline::default();
        assert_eq!(pipeline.start(async { 1 }), Some(1));
        let (tx_a, rx_a) = tokio::sync::oneshot::channel::<u32>();
        let (tx_b, rx_b) = tokio::sync::oneshot::channel::<u32>();
        assert_eq!(pipeline.start(async { rx_a.await.unwrap() }), None);
        assert_eq!(pipeline.start(async { rx_b.await.unwrap() }), None);
        assert_eq!(pipeline.len(), 2);
        tx_a.send(2).unwrap();
        tx_b.send(3).unwrap();
        let mut answers = Vec::new();
        pipeline.finished(|a| answers.push(a)).await;
        answers.sort();
        assert_eq!(answers, vec![2, 3]);
        assert!(pipeline.is_empty());
        // Nothing in flight: never finishes.
        let nothing = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            pipeline.finished(|_| {}),
        )
        .await;
        assert!(nothing.is_err());
    }

    #[tokio::test]
    async fn a_batch_is_written_whole_and_in_order_across_short_writes() {
        // A pipe smaller than the batch forces partial vectored writes.
        let (mut writer, mut reader) = tokio::io::duplex(7);
        let mut parts: Vec<Bytes> = ["abc", "", "defghij", "k", "", "lmnopqrstuvwxyz"]
            .into_iter()
            .map(|p| Bytes::from_static(p.as_bytes()))
            .collect();
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut all)
                .await
                .unwrap();
            all
        });
        write_batch(&mut writer, &mut parts).await.unwrap();
        assert!(parts.is_empty());
        drop(writer);
        assert_eq!(read.await.unwrap(), b"abcdefghijklmnopqrstuvwxyz");
    }

    #[tokio::test]
    async fn finishing_writes_the_unsent_answers_then_those_in_flight() {
        let mut pipeline = Pipeline::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<&'static str>();
        assert_eq!(pipeline.start(async { rx.await.unwrap() }), None);
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        tx.send("late").unwrap();
        let unsent = vec![Bytes::from_static(b"early,")];
        let writable = pipeline
            .finish(&mut writer, unsent, |answer, out| {
                out.push(Bytes::from_static(answer.as_bytes()))
            })
            .await;
        assert!(writable);
        assert!(pipeline.is_empty());
        drop(writer);
        let mut all = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut all)
            .await
            .unwrap();
        assert_eq!(all, b"early,late");
    }
}
