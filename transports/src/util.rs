//! `async` conveniences over the poll-based [`Link`] and [`Listener`]
//! traits, for tests, tools and simple programs (a supervisor driving many
//! links usually polls them itself).

use std::future::poll_fn;

use courier_runtime::transport::{Frame, Link, Listener, TransportError};

/// `async` helpers for any [`Link`].
#[allow(async_fn_in_trait)]
pub trait LinkExt: Link {
    /// Waits for room, queues the frame and flushes it.
    async fn send(&mut self, frame: Frame) -> Result<(), TransportError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Waits for room and queues the frame, without flushing.
    async fn feed(&mut self, frame: Frame) -> Result<(), TransportError> {
        poll_fn(|cx| self.poll_ready(cx)).await?;
        self.start_send(frame)
    }

    /// Writes every queued frame out.
    async fn flush(&mut self) -> Result<(), TransportError> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Flushes and closes the sending side.
    async fn close(&mut self) -> Result<(), TransportError> {
        poll_fn(|cx| self.poll_close(cx)).await
    }

    /// The next frame; `None` at a clean end.
    async fn recv(&mut self) -> Option<Result<Frame, TransportError>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<L: Link + ?Sized> LinkExt for L {}

/// `async` helpers for any [`Listener`].
#[allow(async_fn_in_trait)]
pub trait ListenerExt: Listener {
    /// The next incoming link.
    async fn accept(&mut self) -> Result<Box<dyn Link>, TransportError> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }
}

impl<L: Listener + ?Sized> ListenerExt for L {}
