//! `http.body_timeout_ms`: a request body that has not fully arrived by then is cut off and
//! answered 408, its connection closed. actix bounds the wait for a request's head
//! (`client_request_timeout`) but not for its body: without this a client that sends headers
//! and then trickles a byte now and then (slowloris) holds a connection and a handler forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{HttpMessage, ResponseError};
use futures_util::Stream;

use crate::error::{ApiError, ErrorCode};

/// A body stream that fails once its deadline passes before it ended.
struct Deadline<S> {
    inner: S,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
    done: bool,
}

impl<S> Stream for Deadline<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(item)) => return Poll::Ready(Some(item)),
            Poll::Pending => {}
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.done = true;
            self.expired.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request body timed out",
            )))));
        }
        Poll::Pending
    }
}

/// Whether the request announces a body. The feed's WebSocket stream is not one (it is the
/// socket's life, read as frames); only that route is exempt, so an `Upgrade` header on any
/// other request cannot buy its body unlimited time.
fn has_body(req: &ServiceRequest) -> bool {
    let h = req.headers();
    if h.contains_key(header::UPGRADE)
        && req.method() == actix_web::http::Method::GET
        && req.path() == "/ws"
    {
        return false;
    }
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// The middleware: wraps the body of every request that has one in a `within` deadline, and
/// turns the handler's answer to a timed-out body into 408 `request_timeout`, closing the
/// connection (what is still on its way is not read).
pub async fn body_deadline(
    within: Duration,
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if !has_body(&req) {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    }
    let expired = Arc::new(AtomicBool::new(false));
    let stream = Deadline {
        inner: req.take_payload(),
        sleep: Box::pin(tokio::time::sleep(within)),
        expired: expired.clone(),
        done: false,
    };
    let boxed: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(stream);
    req.set_payload(Payload::from(boxed));
    let res = next.call(req).await;
    if !expired.load(Ordering::SeqCst) {
        return res.map(ServiceResponse::map_into_boxed_body);
    }
    let mut answer = ApiError::new(
        ErrorCode::RequestTimeout,
        format!(
            "the request body did not arrive within {} ms (http.body_timeout_ms)",
            within.as_millis()
        ),
    )
    .error_response();
    answer
        .head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    match res {
        Ok(r) => Ok(r.into_response(answer)),
        // The handler failed on the cut body: answer in its place.
        Err(e) => Err(actix_web::error::InternalError::from_response(e, answer).into()),
    }
}
