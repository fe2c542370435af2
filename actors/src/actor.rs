//! The actix shell around [`CabinetMachine`]: feeds it messages and timers, carries out its
//! effects through [`CabinetPorts`], and is restarted by its supervisor when the logic panics.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::alert::{ActiveAlert, AlertType};
use crate::ids::{CabinetId, MerchantId};
use crate::machine::{
    CabinetMachine, CabinetSnapshot, CommandOutcome, Effect, Input, Refusal, SessionPhase, Timing,
};
use crate::protocol::{CabinetConfig, Command, CommandBody, CommandKind, SessionMode, UplinkBody};

/// What a new actor starts from (read from storage by the caller).
#[derive(Debug, Clone, Default)]
pub struct ActorSeed {
    /// The desired configuration.
    pub desired: Option<CabinetConfig>,
    /// Alerts still active in storage.
    pub alerts: Vec<ActiveAlert>,
    /// What another node last knew of the cabinet live, when it comes over from that node
    /// without a word from the cabinet (a partition of an external broker moving).
    pub live: Option<crate::machine::LiveSeed>,
}

/// A seed still being read from storage. The actor starts at once and takes no message until
/// its seed is in, so whoever starts it never waits for storage.
pub type PendingSeed = Pin<Box<dyn Future<Output = ActorSeed> + Send + 'static>>;

impl ActorSeed {
    /// A seed already at hand.
    pub fn ready(self) -> PendingSeed {
        Box::pin(std::future::ready(self))
    }
}

/// Where time comes from; tests use a fake one.
pub trait Clock: Send + Sync + 'static {
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Who a cabinet belongs to, carried with every effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CabinetMeta {
    /// The cabinet.
    pub id: CabinetId,
    /// Its merchant.
    pub merchant: MerchantId,
}

/// A command could not be handed to the broker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("publish failed: {0}")]
pub struct PublishError(pub String);

/// How the actors reach the world. `src/` implements it over rumqttd, sqlx and Prometheus.
/// Every method must return quickly and never block: it runs on the actor's thread.
pub trait CabinetPorts: Send + Sync + 'static {
    /// Publishes a command on the cabinet's command topic.
    fn publish(&self, cabinet: &CabinetMeta, command: &Command) -> Result<(), PublishError>;
    /// Any other effect: alerts, outcomes, online changes, duplicates, session progress.
    fn effect(&self, cabinet: &CabinetMeta, effect: &Effect);
    /// Visible state changed.
    fn state_changed(&self, cabinet: &CabinetMeta, snapshot: &CabinetSnapshot);
    /// The actor's logic panicked; it is being restarted.
    fn actor_restarted(&self, cabinet: &CabinetMeta);
    /// One uplink message went through the state machine (throughput accounting).
    fn uplink_processed(&self, _cabinet: &CabinetMeta) {}
}

/// The answer to a command request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandResult {
    /// The command's id.
    pub cmd_id: String,
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: CommandKind,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: CommandOutcome,
    /// From request to outcome.
    pub elapsed_ms: u64,
}

/// Deliver a parsed uplink message.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Deliver(pub UplinkBody);

/// Send a command and wait for its truthful outcome. For `unlock`, `session_id`, `mode` and
/// `expires_at` come from the caller.
#[derive(Debug, Message)]
#[rtype(result = "Result<CommandResult, ActorGone>")]
pub(crate) struct SendCommand(pub CommandBody);

/// The actor restarted or stopped before the command ended.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the cabinet actor restarted before the command ended")]
pub struct ActorGone;

/// Read the live state.
#[derive(Debug, Message)]
#[rtype(result = "CabinetSnapshot")]
pub(crate) struct GetSnapshot;

/// Ask whether a session of this mode may start now.
#[derive(Debug, Message)]
#[rtype(result = "Option<Refusal>")]
pub(crate) struct CheckSession(pub SessionMode);

/// An operator or the session supervisor ends a session. Returns the phase the actor held it
/// in, or `None` when it does not hold that session.
#[derive(Debug, Message)]
#[rtype(result = "Option<SessionPhase>")]
pub(crate) struct CloseSession(pub String);

/// A new desired configuration.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct SetDesired(pub CabinetConfig);

/// An operator acknowledged an alert. Returns whether it was active.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub(crate) struct AckAlert(pub AlertType);

/// An operator cleared an alert. Returns whether it was active.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub(crate) struct ClearAlert {
    /// Which.
    pub(crate) kind: AlertType,
    /// The operator's key id.
    pub(crate) by: String,
}

/// Fault injection for supervision tests: the next step of the logic panics.
#[doc(hidden)]
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct InjectPanic;

/// One cabinet's actor.
pub struct CabinetActor {
    meta: CabinetMeta,
    timing: Timing,
    machine: CabinetMachine,
    ports: Arc<dyn CabinetPorts>,
    clock: Arc<dyn Clock>,
    timer: Option<(u64, SpawnHandle)>,
    waiters: HashMap<String, oneshot::Sender<CommandResult>>,
    incarnation: u32,
    panic_next: bool,
    /// Stored state still being read; taken when the actor starts.
    seed: Option<PendingSeed>,
}

fn prefix(now: u64, incarnation: u32) -> String {
    format!("{now:x}{incarnation}")
}

impl CabinetActor {
    /// A new actor; `desired` and `alerts` come from storage.
    pub fn new(
        meta: CabinetMeta,
        timing: Timing,
        ports: Arc<dyn CabinetPorts>,
        clock: Arc<dyn Clock>,
        desired: Option<CabinetConfig>,
        alerts: Vec<ActiveAlert>,
    ) -> Self {
        let machine = CabinetMachine::new(
            meta.id.clone(),
            timing.clone(),
            prefix(clock.now_ms(), 0),
            desired,
            alerts,
        );
        Self {
            meta,
            timing,
            machine,
            ports,
            clock,
            timer: None,
            waiters: HashMap::new(),
            incarnation: 0,
            panic_next: false,
            seed: None,
        }
    }

    /// A new actor whose stored state (`desired`, `alerts`) is still being read. It takes no
    /// message before the seed is in: the machine must know the desired configuration and the
    /// active alerts before it sees the cabinet's first message.
    pub fn seeded_later(
        meta: CabinetMeta,
        timing: Timing,
        ports: Arc<dyn CabinetPorts>,
        clock: Arc<dyn Clock>,
        seed: PendingSeed,
    ) -> Self {
        let mut actor = Self::new(meta, timing, ports, clock, None, Vec::new());
        actor.seed = Some(seed);
        actor
    }

    fn feed(&mut self, input: Input, ctx: &mut Context<Self>) {
        let now = self.clock.now_ms();
        let panic_next = std::mem::take(&mut self.panic_next);
        let machine = &mut self.machine;
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            if panic_next {
                panic!("injected fault");
            }
            machine.handle(input, now)
        }));
        match stepped {
            Ok(effects) => {
                self.apply(effects);
                self.schedule(ctx);
            }
            Err(_) => {
                tracing::error!(cabinet_id = %self.meta.id, "cabinet logic panicked; restarting the actor");
                self.ports.actor_restarted(&self.meta);
                ctx.stop();
            }
        }
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        let mut state_changed = false;
        for effect in effects {
            match &effect {
                Effect::Publish(command) => {
                    if let Err(e) = self.ports.publish(&self.meta, command) {
                        // The broker refused it: the pending entry times out truthfully.
                        tracing::warn!(cabinet_id = %self.meta.id, cmd_id = %command.cmd_id, error = %e, "command not published");
                    }
                }
                Effect::CommandDone {
                    cmd_id,
                    kind,
                    outcome,
                    elapsed_ms,
                } => {
                    if let Some(waiter) = self.waiters.remove(cmd_id) {
                        let _ = waiter.send(CommandResult {
                            cmd_id: cmd_id.clone(),
                            kind: *kind,
                            outcome: outcome.clone(),
                            elapsed_ms: *elapsed_ms,
                        });
                    }
                    self.ports.effect(&self.meta, &effect);
                }
                Effect::StateChanged => state_changed = true,
                _ => self.ports.effect(&self.meta, &effect),
            }
        }
        if state_changed {
            self.ports
                .state_changed(&self.meta, &self.machine.snapshot());
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let next = self.machine.next_deadline();
        match (next, &self.timer) {
            (Some(at), Some((scheduled, _))) if *scheduled == at => return,
            (None, None) => return,
            _ => {}
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        if let Some(at) = next {
            let wait = Duration::from_millis(at.saturating_sub(self.clock.now_ms()));
            let handle = ctx.run_later(wait, |act, ctx| {
                act.timer = None;
                act.feed(Input::Tick, ctx);
            });
            self.timer = Some((at, handle));
        }
    }
}

impl Actor for CabinetActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        let Some(seed) = self.seed.take() else {
            self.schedule(ctx);
            return;
        };
        // `wait` holds the mailbox until the seed is in.
        ctx.wait(seed.into_actor(self).map(|seed, act, ctx| {
            act.machine = CabinetMachine::new(
                act.meta.id.clone(),
                act.timing.clone(),
                prefix(act.clock.now_ms(), act.incarnation),
                seed.desired,
                seed.alerts,
            );
            act.schedule(ctx);
            if let Some(live) = seed.live {
                act.feed(Input::Restore(live), ctx);
            }
        }));
    }
}

impl Supervised for CabinetActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // The logic panicked part-way: keep only what storage also holds (desired
        // configuration, active alerts) and re-learn the rest from the next messages.
        self.incarnation += 1;
        let snapshot = self.machine.snapshot();
        let desired = self.machine_desired();
        self.machine = CabinetMachine::new(
            self.meta.id.clone(),
            self.timing.clone(),
            prefix(self.clock.now_ms(), self.incarnation),
            desired,
            snapshot.alerts,
        );
        self.timer = None;
        self.waiters.clear();
    }
}

impl CabinetActor {
    fn machine_desired(&self) -> Option<CabinetConfig> {
        self.machine.desired().cloned()
    }
}

impl Handler<Deliver> for CabinetActor {
    type Result = ();
    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        self.feed(Input::Uplink(msg.0), ctx);
        self.ports.uplink_processed(&self.meta);
    }
}

impl Handler<SendCommand> for CabinetActor {
    type Result = ResponseFuture<Result<CommandResult, ActorGone>>;
    fn handle(&mut self, msg: SendCommand, ctx: &mut Self::Context) -> Self::Result {
        let cmd_id = self.machine.next_cmd_id();
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(cmd_id.clone(), tx);
        self.feed(
            Input::Command {
                cmd_id,
                body: msg.0,
            },
            ctx,
        );
        Box::pin(async move { rx.await.map_err(|_| ActorGone) })
    }
}

impl Handler<GetSnapshot> for CabinetActor {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _: GetSnapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.machine.snapshot())
    }
}

impl Handler<CheckSession> for CabinetActor {
    type Result = Option<Refusal>;
    fn handle(&mut self, msg: CheckSession, _: &mut Self::Context) -> Self::Result {
        self.machine.session_refusal(msg.0)
    }
}

impl Handler<CloseSession> for CabinetActor {
    type Result = Option<SessionPhase>;
    fn handle(&mut self, msg: CloseSession, ctx: &mut Self::Context) -> Self::Result {
        let phase = self.machine.session_phase(&msg.0);
        if phase.is_some() {
            self.feed(Input::CloseSession { session_id: msg.0 }, ctx);
        }
        phase
    }
}

impl Handler<SetDesired> for CabinetActor {
    type Result = ();
    fn handle(&mut self, msg: SetDesired, ctx: &mut Self::Context) {
        self.feed(Input::DesiredConfig(msg.0), ctx);
    }
}

impl Handler<AckAlert> for CabinetActor {
    type Result = bool;
    fn handle(&mut self, msg: AckAlert, ctx: &mut Self::Context) -> bool {
        let active = self.machine.alerts().any(|a| a.kind == msg.0);
        self.feed(Input::AckAlert(msg.0), ctx);
        active
    }
}

impl Handler<ClearAlert> for CabinetActor {
    type Result = bool;
    fn handle(&mut self, msg: ClearAlert, ctx: &mut Self::Context) -> bool {
        let active = self.machine.alerts().any(|a| a.kind == msg.kind);
        self.feed(
            Input::ClearAlert {
                kind: msg.kind,
                by: msg.by,
            },
            ctx,
        );
        active
    }
}

impl Handler<InjectPanic> for CabinetActor {
    type Result = ();
    fn handle(&mut self, _: InjectPanic, ctx: &mut Self::Context) {
        self.panic_next = true;
        self.feed(Input::Tick, ctx);
    }
}
