//! The Reaper: grace-time timers of idle containers.
//!
//! Each container has a grace time D (nanoseconds; zero means never), a
//! count of requests in flight and at most one timer. A request for the
//! container pauses the timer (it is discarded, not suspended), and the end
//! of the last request in flight starts it again with the full D. When a
//! timer fires the container is destroyed through the registry, as an API
//! destroy would be. An API destroy defuses the record.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use slog::{info, warn, Logger};

use super::registry::DestroyByHandle;
use super::stats::{measure_mailbox, MailboxStats};
use super::{ContainerError, Introspect};

struct Record {
    grace_time: i64,
    in_flight: u64,
    timer: Option<SpawnHandle>,
    /// When the running timer fires; meaningful only while `timer` is set.
    deadline: Option<SystemTime>,
}

/// The reaper actor.
pub struct Reaper {
    records: HashMap<String, Record>,
    destroyer: Option<Recipient<DestroyByHandle>>,
    logger: Logger,
    mailbox: MailboxStats,
}

impl Reaper {
    pub fn new(logger: Logger) -> Reaper {
        Reaper { records: HashMap::new(), destroyer: None, logger, mailbox: MailboxStats::default() }
    }

    fn arm(&mut self, handle: &str, ctx: &mut Context<Self>) {
        let Some(record) = self.records.get_mut(handle) else {
            return;
        };
        if let Some(timer) = record.timer.take() {
            ctx.cancel_future(timer);
        }
        if record.grace_time == 0 {
            return;
        }
        // A negative grace time behaves like a timer that fires at once.
        let delay = Duration::from_nanos(u64::try_from(record.grace_time).unwrap_or(0));
        let key = handle.to_string();
        record.timer = Some(ctx.run_later(delay, move |reaper, ctx| reaper.expire(key, ctx)));
        record.deadline = Some(SystemTime::now() + delay);
    }

    fn expire(&mut self, handle: String, ctx: &mut Context<Self>) {
        if self.records.remove(&handle).is_none() {
            return;
        }
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

/// Starts the grace timer of a container that was just created.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Strap {
    pub handle: String,
    pub grace_time: i64,
}

impl Handler<Strap> for Reaper {
    type Result = ();

    fn handle(&mut self, message: Strap, ctx: &mut Context<Self>) {
        self.mailbox.count();
        let record = Record { grace_time: message.grace_time, in_flight: 0, timer: None, deadline: None };
        // A timer left from an earlier record of the handle must not reap
        // the new container.
        if let Some(Record { timer: Some(timer), .. }) = self.records.insert(message.handle.clone(), record) {
            ctx.cancel_future(timer);
        }
        self.arm(&message.handle, ctx);
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
            self.arm(&message.handle, ctx);
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
            let delay = Duration::from_nanos(u64::try_from(message.grace_time).unwrap_or(0));
            let key = message.handle.clone();
            record.timer = Some(ctx.run_later(delay, move |reaper, ctx| reaper.expire(key, ctx)));
            record.deadline = Some(SystemTime::now() + delay);
        record.deadline = Some(SystemTime::now() + delay);
        }
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
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000 }).await.unwrap();
        reaper.send(Strap { handle: "forever".into(), grace_time: 0 }).await.unwrap();
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
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000 }).await.unwrap();
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
        reaper.send(Strap { handle: "idle".into(), grace_time: 3_600_000_000_000 }).await.unwrap();
        reaper.send(Strap { handle: "busy".into(), grace_time: 3_600_000_000_000 }).await.unwrap();
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
        reaper.send(Strap { handle: "negative".into(), grace_time: -5 }).await.unwrap();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000 }).await.unwrap();
        reaper.send(Strap { handle: "h".into(), grace_time: 0 }).await.unwrap();
        advance(Duration::from_secs(5)).await;
        assert_eq!(registry.send(Destroyed).await.unwrap(), vec!["negative".to_string()]);
    }

    #[actix::test]
    async fn last_unpause_restarts_the_full_countdown() {
        tokio::time::pause();
        let (reaper, registry) = start();
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000 }).await.unwrap();
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
        reaper.send(Strap { handle: "h".into(), grace_time: 1_000_000_000 }).await.unwrap();
        reaper.send(Defuse { handle: "h".into() }).await.unwrap();
        advance(Duration::from_secs(5)).await;
        assert!(registry.send(Destroyed).await.unwrap().is_empty());
    }
}
