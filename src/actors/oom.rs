//! The OomWatcher actor: one per container, reporting the kernel's
//! out-of-memory kills to the container's actor.
//!
//! The runtime's [`OomWatch`] blocks on a kernel notification (an eventfd
//! on cgroup v1, inotify on `memory.events` on cgroup v2), so a dedicated
//! thread waits on it and sends each rise of the kill count to this actor.
//! The thread holds only a weak address: when the container's actor drops
//! the watcher, the watcher stops and wakes the thread through an eventfd,
//! and the thread ends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread;

use actix::prelude::*;
use slog::{debug, warn, Logger};

use super::stats::{measure_mailbox, MailboxStats};
use super::Introspect;
use crate::runtime::{OomWait, OomWatch};

/// Sent to the container's actor for every rise of the kill count.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct OomKilled {
    /// Processes killed since the previous message.
    pub kills: u64,
    /// The kernel's kill count after these kills.
    pub total: u64,
}

/// Errors of starting a watcher.
#[derive(Debug, thiserror::Error)]
pub enum OomWatcherError {
    #[error("failed to create the stop eventfd of the out-of-memory watcher")]
    StopFd { #[source] source: io::Error },
    #[error("failed to start the out-of-memory watcher thread")]
    Thread { #[source] source: io::Error },
}

/// Watches one container's out-of-memory kills.
pub struct OomWatcher {
    handle: String,
    logger: Logger,
    mailbox: MailboxStats,
    /// Receives every kill; the container's actor.
    recipient: Recipient<OomKilled>,
    /// The kill count already recorded, so a count read again after a
    /// restart is not recorded twice.
    recorded: u64,
    /// Written when the actor stops, to end the thread.
    stop: Arc<OwnedFd>,
    /// Taken by `started`, which moves it to the thread.
    watch: Option<Box<dyn OomWatch>>,
}

/// Sent by the thread when the kernel's count has risen.
#[derive(Message)]
#[rtype(result = "()")]
struct CountRose(u64);

impl OomWatcher {
    /// Builds a watcher that sends kills beyond `recorded` to `recipient`.
    pub fn new(watch: Box<dyn OomWatch>, recipient: Recipient<OomKilled>, recorded: u64, handle: &str, logger: &Logger) -> Result<OomWatcher, OomWatcherError> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new
        // fd that nothing else owns.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(OomWatcherError::StopFd { source: io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a fresh fd with no other owner.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(OomWatcher {
            handle: handle.to_string(),
            // The container's logger already carries the handle.
            logger: logger.clone(),
            mailbox: MailboxStats::default(),
            recipient,
            recorded,
            stop,
            watch: Some(watch),
        })
    }

    fn record(&mut self, total: u64) {
        if total <= self.recorded {
            return;
        }
        let kills = total - self.recorded;
        self.recorded = total;
        warn!(self.logger, "out of memory: the kernel killed a process in the container"; "kills" => kills, "total_kills" => total);
        self.recipient.do_send(OomKilled { kills, total });
    }
}

impl Actor for OomWatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(mut watch) = self.watch.take() else { return };
        // Kills that happened while no watch ran, such as during a server
        // restart, are recorded first.
        self.record(watch.initial_kills());
        let address = ctx.address().downgrade();
        let stop = self.stop.clone();
        let logger = self.logger.clone();
        let spawned = thread::Builder::new().name("trellis-oom".into()).spawn(move || loop {
            match watch.wait(stop.as_fd()) {
                Ok(OomWait::Kills(total)) => match address.upgrade() {
                    Some(address) => address.do_send(CountRose(total)),
                    None => return,
                },
                Ok(OomWait::Stopped) => return,
                Ok(OomWait::Gone) => {
                    debug!(logger, "memory cgroup removed; out-of-memory watch ends");
                    return;
                }
                Err(error) => {
                    warn!(logger, "out-of-memory watch failed; no further kills are reported"; "error" => %error);
                    return;
                }
            }
        });
        if let Err(source) = spawned {
            warn!(self.logger, "out-of-memory watch not started"; "error" => %OomWatcherError::Thread { source });
            ctx.stop();
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        let increment = 1u64.to_ne_bytes();
        // SAFETY: the buffer is valid for eight bytes, the size an eventfd
        // write takes, and the fd is open.
        let written = unsafe { libc::write(self.stop.as_raw_fd(), increment.as_ptr().cast(), increment.len()) };
        if written < 0 {
            warn!(self.logger, "failed to stop the out-of-memory watch thread"; "error" => %io::Error::last_os_error());
        }
    }
}

impl Handler<CountRose> for OomWatcher {
    type Result = ();

    fn handle(&mut self, message: CountRose, _ctx: &mut Context<Self>) {
        self.mailbox.count();
        self.record(message.0);
    }
}

impl Handler<Introspect> for OomWatcher {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = measure_mailbox(self, ctx);
        let mut snapshot = serde_json::json!({ "handle": self.handle, "kills_recorded": self.recorded });
        Box::pin(async move {
            snapshot["mailbox"] = mailbox.await;
            snapshot
        })
    }
}

crate::impl_mailbox_probe!(OomWatcher, mailbox);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeError;
    use std::os::fd::BorrowedFd;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A watch that returns scripted results, then blocks until stopped.
    struct ScriptedWatch {
        initial: u64,
        results: Vec<OomWait>,
        /// Receives a message once the thread reads the stop fd.
        stopped: mpsc::Sender<()>,
    }

    impl OomWatch for ScriptedWatch {
        fn initial_kills(&self) -> u64 {
            self.initial
        }

        fn wait(&mut self, stop: BorrowedFd<'_>) -> Result<OomWait, RuntimeError> {
            if !self.results.is_empty() {
                return Ok(self.results.remove(0));
            }
            crate::linux::syscalls::wait_readable(stop, -1).map_err(|error| RuntimeError::failed(error.to_string()))?;
            let _ = self.stopped.send(());
            Ok(OomWait::Stopped)
        }
    }

    struct Collector(mpsc::Sender<OomKilled>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<OomKilled> for Collector {
        type Result = ();

        fn handle(&mut self, message: OomKilled, _ctx: &mut Context<Self>) {
            let _ = self.0.send(message);
        }
    }

    #[actix::test]
    async fn watcher_forwards_kills_and_stops() {
        let (killed_sender, killed) = mpsc::channel();
        let (stopped_sender, stopped) = mpsc::channel();
        let collector = Collector(killed_sender).start();
        // One kill happened before the watch, of which none was recorded.
        let watch = ScriptedWatch { initial: 1, results: vec![OomWait::Kills(3), OomWait::Kills(3), OomWait::Kills(4)], stopped: stopped_sender };
        let logger = Logger::root(slog::Discard, slog::o!());
        let watcher = OomWatcher::new(Box::new(watch), collector.recipient(), 0, "box", &logger).unwrap().start();

        let mut received = Vec::new();
        while received.len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            received.extend(killed.try_iter());
        }
        assert_eq!(received, vec![OomKilled { kills: 1, total: 1 }, OomKilled { kills: 2, total: 3 }, OomKilled { kills: 1, total: 4 }]);

        drop(watcher);
        let mut waited = Duration::ZERO;
        while stopped.try_recv().is_err() {
            assert!(waited < Duration::from_secs(10), "the watch thread did not see the stop fd");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        }
        assert!(killed.try_recv().is_err(), "no kill beyond the script");
    }
}
