//! Pipelined requests served inside one task.
//!
//! A connection (an NBD client, a peer link) starts each request it reads by
//! polling it once in place: a request whose I/O finishes at once answers
//! without any task or thread hop. A request that must wait joins the set
//! in flight, which the connection's own task polls again when it is woken.
//! [`Pipeline::finished`] hands over the answers of every request finished
//! by one wake-up (a batch of acknowledgements, several I/O completions),
//! so they leave in one vectored write.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};

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
}
