//! The Reaper: grace-time timers of idle containers.
//!
//! Each container has a grace time D (nanoseconds; zero means never), a
//! count of requests in flight and at most one timer. A request for the
//! container pauses the timer (it is discarded, not suspended), and the end
//! of the last request in flight starts it again with the full D. When a
//! timer fires the container is destroyed through the registry, as an API
//! destroy would be. An API destroy defuses the record.
//!
//! With persistence on, the reaper records in the depot's grace timer
//! file ([`crate::state::GRACE_TIMERS_FILE`]) when each container last
//! became idle, or that a request for it is in flight. A restarted server resumes each timer at
//! its original deadline, so a container whose deadline passed while no
//! server ran is reaped right after start-up. A container recorded as
//! busy, or without a record (a depot of an earlier release), gets a full
//! timer, because it became idle only when the old server went away.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use slog::{info, warn, Logger};

use super::registry::DestroyByHandle;
use super::stats::{measure_mailbox, MailboxStats};
use super::{ContainerError, Introspect};
use crate::state::GraceTimerRecord;

struct Record {
    grace_time: i64,
    in_flight: u64,
    timer: Option<SpawnHandle>,
    /// When the running timer fires; meaningful only while `timer` is set.
    deadline: Option<SystemTime>,
    /// When the container last became idle; `None` while a request is in
    /// flight.
    idle_since: Option<SystemTime>,
}

/// The reaper actor.
pub struct Reaper {
    records: HashMap<String, Record>,
    destroyer: Option<Recipient<DestroyByHandle>>,
    logger: Logger,
    mailbox: MailboxStats,
    /// Sends snapshots of the timers to the writer thread; `None` without
    /// persistence.
    persist: Option<std_mpsc::Sender<WriterRequest>>,
    /// Timers the previous server recorded, taken by [`Strap`] with
    /// `resume` set while the registry restores the containers.
    recorded: HashMap<String, GraceTimerRecord>,
}

impl Reaper {
    pub fn new(logger: Logger) -> Reaper {
        Reaper { records: HashMap::new(), destroyer: None, logger, mailbox: MailboxStats::default(), persist: None, recorded: HashMap::new() }
    }

    /// Returns a reaper that records its timers in `depot` and reads those
    /// the previous server recorded there. An unreadable file is logged,
    /// and the restored containers then get full timers.
    pub fn with_persistence(logger: Logger, depot: PathBuf) -> Reaper {
        let recorded = match crate::state::read_grace_timers(&depot) {
            Ok(timers) => timers.timers.into_iter().collect(),
            Err(error) => {
                warn!(logger, "grace timers of the previous run are unreadable; restored containers get full timers"; "error" => #error);
                HashMap::new()
            }
        };
        let (sender, receiver) = std_mpsc::channel();
        let writer_logger = logger.clone();
        std::thread::Builder::new()
            .name("grace-timers".into())
            .spawn(move || write_grace_timers(&depot, &receiver, &writer_logger))
            .expect("the grace timer writer thread starts");
        Reaper { persist: Some(sender), recorded, ..Reaper::new(logger) }
    }

    /// Sends the current timers to the writer thread.
    ///
    /// NOTE: the file is written after the change, not before it takes
    /// effect. A server killed with SIGKILL just after a request began can
    /// leave the container recorded as idle since before that request, and
    /// one killed just after a create leaves it unrecorded (a full timer).
    fn persist(&self) {
        let Some(persist) = &self.persist else { return };
        let timers = self
            .records
            .iter()
            .filter(|(_, record)| record.grace_time != 0)
            .map(|(handle, record)| {
                let idle_since_unix_ns = record.idle_since.map(unix_nanos);
                (handle.clone(), GraceTimerRecord { grace_time: record.grace_time, idle_since_unix_ns })
            })
            .collect();
        // The writer only stops when this sender is dropped.
        let _ = persist.send(WriterRequest::Write(timers));
    }

    /// Starts the timer of an idle container so that it fires one grace
    /// time after `idle_since`, at once when that is past.
    fn arm(&mut self, handle: &str, idle_since: SystemTime, ctx: &mut Context<Self>) {
        let Some(record) = self.records.get_mut(handle) else {
            return;
        };
        if let Some(timer) = record.timer.take() {
            ctx.cancel_future(timer);
        }
        record.idle_since = Some(idle_since);
        if record.grace_time == 0 {
            return;
        }
        // A negative grace time behaves like a timer that fires at once.
        let grace = Duration::from_nanos(u64::try_from(record.grace_time).unwrap_or(0));
        let deadline = idle_since + grace;
        let delay = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        let key = handle.to_string();
        record.timer = Some(ctx.run_later(delay, move |reaper, ctx| reaper.expire(key, ctx)));
        record.deadline = Some(deadline);
    }

    fn expire(&mut self, handle: String, ctx: &mut Context<Self>) {
        if self.records.remove(&handle).is_none() {
            return;
        }
        self.persist();
        let Some(destroyer) = self.destroyer.clone() else {
            return;
        };
        info!(self.logger, "reaping"; "handle" => &handle);
        let logger = self.logger.clone();
        ctx.spawn(
            async move {
                // The record is gone already, so a failed reap is not
                // retried, as in Garden.
                match destroyer.send(DestroyByHandle { handle: handle.clone() }).await {
                    Ok(Ok(())) => info!(logger, "reaped"; "handle" => &handle),
                    Ok(Err(ContainerError::NotFound { .. })) => {}
                    Ok(Err(ContainerError::AlreadyDestroying { .. })) => {
                        info!(logger, "reap skipped: an API destroy of the container is running"; "handle" => &handle)
                    }
                    Ok(Err(error)) => warn!(logger, "destroying idle container failed"; "handle" => &handle, "error" => %error),
                    Err(_) => warn!(logger, "destroying idle container failed: registry stopped"; "handle" => &handle),
                }
            }
            .into_actor(self),
        );
    }

    /// Returns when a restored container became idle, from the previous
    /// server's record, or `None` when it gets a full timer. Logs the
    /// choice.
    fn recorded_idle_since(&mut self, handle: &str, grace_time: i64) -> Option<SystemTime> {
        let recorded = self.recorded.remove(handle)?;
        let Some(idle_since_unix_ns) = recorded.idle_since_unix_ns else {
            info!(self.logger, "grace timer restarted in full: a request was in flight when the previous server stopped"; "handle" => handle);
            return None;
        };
        if recorded.grace_time != grace_time {
            info!(self.logger, "grace timer restarted in full: the recorded grace time differs"; "handle" => handle);
            return None;
        }
        let idle_since = SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(idle_since_unix_ns).unwrap_or(u64::MAX));
        let grace = Duration::from_nanos(u64::try_from(grace_time).unwrap_or(0));
        match (idle_since + grace).duration_since(SystemTime::now()) {
            Ok(left) => info!(self.logger, "grace timer resumed"; "handle" => handle, "left_ms" => left.as_millis() as u64),
            Err(_) => info!(self.logger, "grace time ran out while no server was running"; "handle" => handle),
        }
        Some(idle_since)
    }
}

/// A request to the grace timer writer thread.
enum WriterRequest {
    /// Record these timers, replacing the file.
    Write(BTreeMap<String, GraceTimerRecord>),
    /// Reply once every earlier snapshot is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Writes each snapshot of the timers to the depot, skipping snapshots
/// that a newer one has replaced already. Ends when the reaper is dropped.
fn write_grace_timers(depot: &std::path::Path, requests: &std_mpsc::Receiver<WriterRequest>, logger: &Logger) {
    let mut failures: u64 = 0;
    let mut flushes = Vec::new();
    while let Ok(first) = requests.recv() {
        let mut latest = None;
        for request in std::iter::once(first).chain(requests.try_iter()) {
            match request {
                WriterRequest::Write(timers) => latest = Some(timers),
                WriterRequest::Flush(reply) => flushes.push(reply),
            }
        }
        let result = latest.map(|timers| crate::state::write_grace_timers(depot, &timers));
        // A flush whose caller gave up has a closed receiver; that is fine.
        for reply in flushes.drain(..) {
            let _ = reply.send(());
        }
        let Some(result) = result else { continue };
        match result {
            Ok(()) => failures = 0,
            Err(error) => {
                failures += 1;
                // Logged on the first failure and then every hundredth, so
                // a full disk does not flood the log.
                if failures % 100 == 1 {
                    warn!(logger, "failed to record the grace timers; a restart gives full timers"; "error" => #error, "failures" => failures);
                }
            }
        }
    }
}

impl Actor for Reaper {
    type Context = Context<Self>;
}

/// Sets the recipient that destroys expired containers: the registry,
/// which is started after the reaper.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDestroyer(pub Recipient<DestroyByHandle>);

impl Handler<SetDestroyer> for Reaper {
    type Result = ();

    fn handle(&mut self, message: SetDestroyer, _ctx: &mut Context<Self>) {
        self.mailbox.count();
        self.destroyer = Some(message.0);
    }
}

/// Starts the grace timer of a container that was just created or
/// restored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Strap {
    pub handle: String,
    pub grace_time: i64,
    /// Set for a restored container: its timer resumes from when the
    /// previous server recorded it idle, if it did.
    pub resume: bool,
}

impl Handler<Strap> for Reaper {
    type Result = ();

    fn handle(&mut self, message: Strap, ctx: &mut Context<Self>) {
        self.mailbox.count();
        let record = Record { grace_time: message.grace_time, in_flight: 0, timer: None, deadline: None, idle_since: None };
        // A timer left from an earlier record of the handle must not reap
        // the new container.
        if let Some(Record { timer: Some(timer), .. }) = self.records.insert(message.handle.clone(), record) {
            ctx.cancel_future(timer);
        }
        let recorded = if message.resume { self.recorded_idle_since(&message.handle, message.grace_time) } else { None };
        // A new container must not inherit the record of an earlier one
        // with its handle.
        self.recorded.remove(&message.handle);
        self.arm(&message.handle, recorded.unwrap_or_else(SystemTime::now), ctx);
        self.persist();
    }
}

/// Discards a container's timer because a request for it began.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Pause {
    pub handle: String,
}

impl Handler<Pause> for Reaper {
    type Result = ();

    fn handle(&mut self, message: Pause, ctx: &mut Context<Self>) {
        self.mailbox.count();
        if let Some(record) = self.records.get_mut(&message.handle) {
            record.in_flight += 1;
            if let Some(timer) = record.timer.take() {
                ctx.cancel_future(timer);
            }
            if record.in_flight == 1 {
                record.idle_since = None;
                self.persist();
            }
        }
    }
}

/// Ends one request for a container. The end of the last one in flight
/// restarts the full timer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unpause {
    pub handle: String,
}

impl Handler<Unpause> for Reaper {
    type Result = ();

    fn handle(&mut self, message: Unpause, ctx: &mut Context<Self>) {
        self.mailbox.count();
        let Some(record) = self.records.get_mut(&message.handle) else {
            return;
        };
        record.in_flight = record.in_flight.saturating_sub(1);
        if record.in_flight == 0 {
            self.arm(&message.handle, SystemTime::now(), ctx);
            self.persist();
        }
    }
}

/// Changes the grace time. The timer restarts with the new value if it was
/// running or nothing is in flight, so a zero value then expires at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reset {
    pub handle: String,
    pub grace_time: i64,
}

impl Handler<Reset> for Reaper {
    type Result = ();

    fn handle(&mut self, message: Reset, ctx: &mut Context<Self>) {
        self.mailbox.count();
        let Some(record) = self.records.get_mut(&message.handle) else {
            return;
        };
        record.grace_time = message.grace_time;
        let was_running = match record.timer.take() {
            Some(timer) => {
                ctx.cancel_future(timer);
                true
            }
            None => false,
        };
        if was_running || record.in_flight == 0 {
            // Garden restarts even with zero, which reaps the container now.
            let now = SystemTime::now();
            let delay = Duration::from_nanos(u64::try_from(message.grace_time).unwrap_or(0));
            let key = message.handle.clone();
            record.timer = Some(ctx.run_later(delay, move |reaper, ctx| reaper.expire(key, ctx)));
            record.deadline = Some(now + delay);
            record.idle_since = Some(now);
        }
        self.persist();
    }
}

/// Waits until the recorded grace timers are on disk, before a graceful
/// stop ends the process.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushTimers;

impl Handler<FlushTimers> for Reaper {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _message: FlushTimers, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let (reply, written) = tokio::sync::oneshot::channel();
        if let Some(persist) = &self.persist {
            let _ = persist.send(WriterRequest::Flush(reply));
        }
        Box::pin(async move {
            let _ = written.await;
        })
    }
}

/// Forgets a container that was destroyed through the API.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Defuse {
    pub handle: String,
}

impl Handler<Defuse> for Reaper {
    type Result = ();

    fn handle(&mut self, message: Defuse, ctx: &mut Context<Self>) {
        self.mailbox.count();
        if let Some(record) = self.records.remove(&message.handle) {
            if let Some(timer) = record.timer {
                ctx.cancel_future(timer);
            }
            self.persist();
        }
    }
}

impl Handler<Introspect> for Reaper {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = measure_mailbox(self, ctx);
        let records: Vec<_> = self
            .records
            .iter()
            .map(|(handle, record)| {
                serde_json::json!({
                    "handle": handle,
                    "grace_time_ns": record.grace_time,
                    "in_flight": record.in_flight,
                    "timer_running": record.timer.is_some(),
                    "deadline_unix_ms": record.timer.and(record.deadline).map(unix_millis),
                })
            })
            .collect();
        Box::pin(async move { serde_json::json!({ "records": records, "mailbox": mailbox.await }) })
    }
}

/// Milliseconds since the Unix epoch, for the introspection snapshot.
fn unix_millis(time: SystemTime) -> u128 {
    time.duration_since(SystemTime::UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0)
}

/// Nanoseconds since the Unix epoch, as the grace timer file records them.
fn unix_nanos(time: SystemTime) -> u128 {
    time.duration_since(SystemTime::UNIX_EPOCH).map(|elapsed| elapsed.as_nanos()).unwrap_or(0)
}

crate::impl_mailbox_probe!(Reaper, mailbox);

#[cfg(test)]
mod tests {
    use super::*;

    /// Records destroy requests instead of destroying.
    struct FakeRegistry {
        destroyed: Vec<String>,
    }

    impl Actor for FakeRegistry {
        type Context = Context<Self>;
    }

    impl Handler<DestroyByHandle> for FakeRegistry {
        type Result = Result<(), ContainerError>;

        fn handle(&mut self, message: DestroyByHandle, _ctx: &mut Context<Self>) -> Self::Result {
            self.destroyed.push(message.handle);
            Ok(())
        }
    }

    #[derive(Message)]
    #[rtype(result = "Vec<String>")]
    struct Destroyed;

    impl Handler<Destroyed> for FakeRegistry {
        type Result = MessageResult<Destroyed>;

        fn handle(&mut self, _message: Destroyed, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(self.destroyed.clone())
        }
    }

    fn start() -> (Addr<Reaper>, Addr<FakeRegistry>) {
        let registry = FakeRegistry { destroyed: Vec::new() }.start();
        let reaper = Reaper::new(Logger::root(slog::Discard, slog::o!())).start();
        reaper.do_send(SetDestroyer(registry.clone().recipient()));
        (reaper, registry)
    }

    async fn advance(duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    #[actix::test]
    async fn idle_container_expires() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000, resume: false }).await.unwrap();
        reaper.send(Strap { handle: "forever".into(), grace_time: 0, resume: false }).await.unwrap();
        advance(Duration::from_millis(900)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
        advance(Duration::from_millis(200)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["h".to_string()]);
        advance(Duration::from_secs(3600)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["h".to_string()]);
    }

    #[actix::test]
    async fn requests_in_flight_pause_the_timer() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000, resume: false }).await.unwrap();
        reaper.send(Pause { handle: "h".into() }).await.unwrap();
        advance(Duration::from_secs(5)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
        // Reset while a request is in flight starts nothing.
        reaper.send(Reset { handle: "h".into(), grace_time: 50_000_000 }).await.unwrap();
        advance(Duration::from_secs(1)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
        reaper.send(Unpause { handle: "h".into() }).await.unwrap();
        advance(Duration::from_millis(40)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
        advance(Duration::from_millis(20)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["h".to_string()]);
    }

    #[actix::test]
    async fn zero_reset_on_an_idle_container_expires_at_once() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "idle".into(), grace_time: 3_600_000_000_000, resume: false }).await.unwrap();
        reaper.send(Strap { handle: "busy".into(), grace_time: 3_600_000_000_000, resume: false }).await.unwrap();
        reaper.send(Pause { handle: "busy".into() }).await.unwrap();
        reaper.send(Reset { handle: "idle".into(), grace_time: 0 }).await.unwrap();
        reaper.send(Reset { handle: "busy".into(), grace_time: 0 }).await.unwrap();
        advance(Duration::from_millis(1)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["idle".to_string()]);
        // With a request in flight zero disables expiry, also after it ends.
        reaper.send(Unpause { handle: "busy".into() }).await.unwrap();
        advance(Duration::from_secs(7200)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["idle".to_string()]);
    }

    #[actix::test]
    async fn negative_grace_time_expires_at_once_and_restrap_replaces_timer() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "negative".into(), grace_time: -5, resume: false }).await.unwrap();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000, resume: false }).await.unwrap();
        reaper.send(Strap { handle: "h".into(), grace_time: 0, resume: false }).await.unwrap();
        advance(Duration::from_secs(5)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["negative".to_string()]);
    }

    #[actix::test]
    async fn last_unpause_restarts_the_full_countdown() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000, resume: false }).await.unwrap();
        advance(Duration::from_millis(900)).await;
        reaper.send(Pause { handle: "h".into() }).await.unwrap();
        reaper.send(Pause { handle: "h".into() }).await.unwrap();
        reaper.send(Unpause { handle: "h".into() }).await.unwrap();
        advance(Duration::from_secs(3)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
        reaper.send(Unpause { handle: "h".into() }).await.unwrap();
        advance(Duration::from_millis(950)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty(), "elapsed time was remembered");
        advance(Duration::from_millis(100)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["h".to_string()]);
    }

    #[actix::test]
    async fn defused_container_never_expires() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000, resume: false }).await.unwrap();
        reaper.send(Defuse { handle: "h".into() }).await.unwrap();
        advance(Duration::from_secs(5)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
    }

    /// Waits until the grace timer file in `depot` satisfies `check`;
    /// panics after ten seconds.
    fn wait_for_file(depot: &std::path::Path, check: impl Fn(&BTreeMap<String, GraceTimerRecord>) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let timers = crate::state::read_grace_timers(depot).map(|file| file.timers).unwrap_or_default();
            if check(&timers) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "grace timer file never matched: {timers:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[actix::test]
    async fn idleness_is_recorded() {
        let depot = tempfile::tempdir().unwrap();
        let registry = FakeRegistry { destroyed: Vec::new() }.start();
        let reaper = Reaper::with_persistence(Logger::root(slog::Discard, slog::o!()), depot.path().to_path_buf()).start();
        reaper.do_send(SetDestroyer(registry.recipient()));
        let before = unix_nanos(SystemTime::now());
        reaper.send(Strap { handle: "h".into(), grace_time: 3_600_000_000_000, resume: false }).await.unwrap();
        reaper.send(Strap { handle: "never".into(), grace_time: 0, resume: false }).await.unwrap();
        wait_for_file(depot.path(), |timers| timers.get("h").and_then(|timer| timer.idle_since_unix_ns).is_some_and(|since| since >= before));
        let timers = crate::state::read_grace_timers(depot.path()).unwrap().timers;
        assert_eq!(timers.get("h").map(|timer| timer.grace_time), Some(3_600_000_000_000));
        assert!(!timers.contains_key("never"), "a container without a grace time is recorded: {timers:?}");

        reaper.send(Pause { handle: "h".into() }).await.unwrap();
        wait_for_file(depot.path(), |timers| timers.get("h").is_some_and(|timer| timer.idle_since_unix_ns.is_none()));
        let paused_at = unix_nanos(SystemTime::now());
        reaper.send(Unpause { handle: "h".into() }).await.unwrap();
        wait_for_file(depot.path(), |timers| timers.get("h").and_then(|timer| timer.idle_since_unix_ns).is_some_and(|since| since >= paused_at));
        reaper.send(Defuse { handle: "h".into() }).await.unwrap();
        wait_for_file(depot.path(), |timers| timers.is_empty());
    }

    #[actix::test]
    async fn restored_timers_keep_their_deadline() {
        let depot = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ago = |seconds: u64| Some(unix_nanos(now - Duration::from_secs(seconds)));
        let timers: BTreeMap<String, GraceTimerRecord> = [
            ("passed", GraceTimerRecord { grace_time: 2_000_000_000, idle_since_unix_ns: ago(10) }),
            ("resumed", GraceTimerRecord { grace_time: 2_000_000_000, idle_since_unix_ns: ago(1) }),
            ("busy", GraceTimerRecord { grace_time: 2_000_000_000, idle_since_unix_ns: None }),
            ("changed", GraceTimerRecord { grace_time: 9_000_000_000, idle_since_unix_ns: ago(1) }),
            ("recreated", GraceTimerRecord { grace_time: 2_000_000_000, idle_since_unix_ns: ago(10) }),
        ]
        .into_iter()
        .map(|(handle, timer)| (handle.to_string(), timer))
        .collect();
        crate::state::write_grace_timers(depot.path(), &timers).unwrap();

        tokio::time::pause();
        let registry = FakeRegistry { destroyed: Vec::new() }.start();
        let reaper = Reaper::with_persistence(Logger::root(slog::Discard, slog::o!()), depot.path().to_path_buf()).start();
        reaper.do_send(SetDestroyer(registry.clone().recipient()));
        for handle in ["passed", "resumed", "busy", "changed", "unrecorded"] {
            reaper.send(Strap { handle: handle.into(), grace_time: 2_000_000_000, resume: true }).await.unwrap();
        }
        reaper.send(Strap { handle: "recreated".into(), grace_time: 2_000_000_000, resume: false }).await.unwrap();

        advance(Duration::from_millis(10)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["passed".to_string()], "a deadline passed while down expires at once");
        advance(Duration::from_millis(700)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["passed".to_string()]);
        advance(Duration::from_millis(400)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["passed".to_string(), "resumed".to_string()], "one second was left");
        advance(Duration::from_millis(800)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap().len(), 2, "full timers fired early");
        advance(Duration::from_millis(200)).await;
        let mut destroyed = registry.send(Destroyed).await.unwrap();
        destroyed.sort();
        assert_eq!(destroyed, ["busy", "changed", "passed", "recreated", "resumed", "unrecorded"]);
    }
}
