//! Mailbox counters that every actor keeps for the introspection endpoint.
//!
//! actix does not expose the length of an actor's mailbox, so it is
//! measured: while handling [`Introspect`](super::Introspect), an actor
//! notes how many messages it has handled and sends itself a
//! [`MailboxProbe`]. The mailbox is FIFO, so the messages handled before
//! the probe comes out are exactly those that were queued when the probe
//! went in. Each handler counts its message with [`MailboxStats::count`].

use std::future::Future;

use actix::prelude::*;

/// Message counters of one actor, owned by the actor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MailboxStats {
    handled: u64,
}

impl MailboxStats {
    /// Counts one message taken from the mailbox.
    pub fn count(&mut self) {
        self.handled += 1;
    }

    /// Number of messages handled since the actor started.
    pub fn handled(&self) -> u64 {
        self.handled
    }
}

/// Sent by an actor to itself; the result is its handled count when the
/// probe leaves the mailbox. The probe itself is not counted.
#[derive(Debug, Message)]
#[rtype(result = "u64")]
pub struct MailboxProbe;

/// An actor that keeps [`MailboxStats`] and handles [`MailboxProbe`]
/// (implement the handler with [`impl_mailbox_probe!`](crate::impl_mailbox_probe)).
pub trait Observed: Actor<Context = Context<Self>> + Handler<MailboxProbe> {
    fn mailbox_stats(&self) -> MailboxStats;
}

/// Measures the actor's mailbox from inside one of its handlers. The future
/// resolves to `{"messages_handled": N, "mailbox_depth": D}`, where D is the
/// number of messages that were queued behind the current one.
pub fn measure_mailbox<A: Observed>(actor: &A, ctx: &mut Context<A>) -> impl Future<Output = serde_json::Value> {
    let handled = actor.mailbox_stats().handled();
    // `send` queues the probe now, before any later message can arrive.
    let probe = ctx.address().send(MailboxProbe);
    async move {
        let depth = match probe.await {
            Ok(after) => serde_json::Value::from(after.saturating_sub(handled)),
            // The actor is stopping, so its mailbox is closed.
            Err(_) => serde_json::Value::Null,
        };
        serde_json::json!({ "messages_handled": handled, "mailbox_depth": depth })
    }
}

/// Implements [`Observed`] and the [`MailboxProbe`] handler for an actor
/// whose `MailboxStats` sits in the named field.
#[macro_export]
macro_rules! impl_mailbox_probe {
    ($actor:ty, $field:ident) => {
        impl actix::Handler<$crate::actors::stats::MailboxProbe> for $actor {
            type Result = actix::MessageResult<$crate::actors::stats::MailboxProbe>;

            fn handle(
                &mut self,
                _message: $crate::actors::stats::MailboxProbe,
                _ctx: &mut actix::Context<Self>,
            ) -> Self::Result {
                actix::MessageResult(self.$field.handled())
            }
        }

        impl $crate::actors::stats::Observed for $actor {
            fn mailbox_stats(&self) -> $crate::actors::stats::MailboxStats {
                self.$field
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its messages. `Work` blocks its thread for a while, so a test
    /// can fill its mailbox.
    #[derive(Default)]
    struct Counter {
        mailbox: MailboxStats,
    }

    impl Actor for Counter {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Work(std::time::Duration);

    impl Handler<Work> for Counter {
        type Result = ();

        fn handle(&mut self, message: Work, _ctx: &mut Context<Self>) {
            self.mailbox.count();
            std::thread::sleep(message.0);
        }
    }

    #[derive(Message)]
    #[rtype(result = "serde_json::Value")]
    struct Measure;

    impl Handler<Measure> for Counter {
        type Result = ResponseFuture<serde_json::Value>;

        fn handle(&mut self, _message: Measure, ctx: &mut Context<Self>) -> Self::Result {
            self.mailbox.count();
            Box::pin(measure_mailbox(self, ctx))
        }
    }

    crate::impl_mailbox_probe!(Counter, mailbox);

    #[actix_rt::test]
    async fn depth_counts_messages_queued_behind() {
        let counter = Counter::default().start();
        counter.send(Work(std::time::Duration::ZERO)).await.unwrap();
        let idle = counter.send(Measure).await.unwrap();
        assert_eq!(idle["messages_handled"], 2);
        assert_eq!(idle["mailbox_depth"], 0);

        // The first message blocks the actor's thread while the rest queue
        // up behind it, so the measure handler finds three queued.
        counter.do_send(Work(std::time::Duration::from_millis(200)));
        let measured = counter.send(Measure);
        for _ in 0..3 {
            counter.do_send(Work(std::time::Duration::ZERO));
        }
        let busy = measured.await.unwrap();
        assert_eq!(busy["messages_handled"], 4);
        assert_eq!(busy["mailbox_depth"], 3);
    }
}
