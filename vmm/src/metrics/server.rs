//! The HTTP side of the exporter: `GET /metrics` (and `HEAD`) answers `200` with a fresh
//! exposition in the Prometheus text format, any other path `404`, another method on `/metrics`
//! `405`. tiny_http reads requests on its own connection threads, so any number of scrapers may
//! be connected at once; [`WORKERS`] threads of ours sample the VM and answer.

use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tiny_http::{Header, Request, Response, Server};

use super::Stop;

/// Threads answering requests.
pub const WORKERS: usize = 2;

/// How long [`Handle::stop`] waits for a worker still answering a request.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The serving threads of one VM's exporter; [`Handle::stop`] ends them.
pub(crate) struct Handle {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Ends the workers (each leaves its wait at once) and drops the server, which closes the
    /// listening socket (tiny_http's accept thread closes it right after this returns).
    ///
    /// Bounded: a worker still writing an answer to a client that does not read (tiny_http has
    /// no write timeout; a few pipelined requests fill the socket buffers) is waited for at most
    /// [`STOP_GRACE`], then left behind, so no client can hold the VM's stop. Such a worker keeps
    /// its reference to the server, and with it the listening socket, until its client goes
    /// away or the process ends; that is logged.
    pub(crate) fn stop(mut self, stop: &Stop) {
        debug_assert!(stop.is_set(), "the workers only leave once the flag is set");
        for _ in &self.workers {
            self.server.unblock(); // one waiter per call; a worker not waiting yet finds it queued
        }
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while self.workers.iter().any(|w| !w.is_finished()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for w in self.workers.drain(..) {
            if !w.is_finished() {
                tracing::warn!(
                    "a metrics server thread is stuck answering a client that does not read: left behind"
                );
                continue;
            }
            if w.join().is_err() {
                tracing::warn!("a metrics server thread panicked");
            }
        }
    }
}

/// Starts [`WORKERS`] threads answering the requests of `server` with `render()`'s text until
/// `stop` is set and the returned handle's [`Handle::stop`] is called.
pub(crate) fn spawn(
    server: Server,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    stop: Arc<Stop>,
) -> std::io::Result<Handle> {
    let server = Arc::new(server);
    let mut handle = Handle { server: server.clone(), workers: Vec::new() };
    for i in 0..WORKERS {
        let (server, render, flag) = (server.clone(), render.clone(), stop.clone());
        let worker = std::thread::Builder::new().name(format!("metrics-http{i}")).spawn(move || loop {
            match server.recv() {
                Ok(request) => answer(request, render.as_ref()),
                Err(_) if flag.is_set() => return,
                Err(e) => tracing::debug!("metrics server: {e}"),
            }
        });
        match worker {
            Ok(w) => handle.workers.push(w),
            Err(e) => {
                stop.set();
                handle.stop(&stop);
                return Err(e);
            }
        }
    }
    Ok(handle)
}

/// What a request gets: (status, body, content type).
pub fn route(method: &str, url: &str, render: &dyn Fn() -> String) -> (u16, String, &'static str) {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => (200, render(), CONTENT_TYPE),
        (_, "/metrics") => (405, "only GET and HEAD are served\n".into(), "text/plain; charset=utf-8"),
        _ => (404, "not found: the metrics are at /metrics\n".into(), "text/plain; charset=utf-8"),
    }
}

fn answer(request: Request, render: &dyn Fn() -> String) {
    let method = request.method().to_string();
    let (status, body, content_type) = route(&method, request.url(), render);
    let mut response = Response::from_string(body).with_status_code(status);
    if let Ok(h) = Header::from_bytes("Content-Type", content_type) {
        response = response.with_header(h);
    }
    if status == 405 {
        if let Ok(h) = Header::from_bytes("Allow", "GET, HEAD") {
            response = response.with_header(h);
        }
    }
    // A scraper that went away is not an error of the VM's.
    if let Err(e) = request.respond(response) {
        tracing::debug!("metrics server: answering a request: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let render = || "x 1\n".to_string();
        assert_eq!(route("GET", "/metrics", &render).0, 200);
        assert_eq!(route("GET", "/metrics?name[]=x", &render).1, "x 1\n");
        assert_eq!(route("HEAD", "/metrics", &render).0, 200);
        assert_eq!(route("POST", "/metrics", &render).0, 405);
        assert_eq!(route("GET", "/", &render).0, 404);
        assert_eq!(route("GET", "/metrics/x", &render).0, 404);
        assert_eq!(route("GET", "/../metrics", &render).0, 404);
    }
}
