//! How the rest of the hub talks to a cabinet: a handle with plain async methods. The actor
//! framework stays behind it, in this crate. Today every handle reaches an actor on this node;
//! multi-node routing puts a remote variant behind the same methods.

use actix::Addr;

use crate::actor::{
    AckAlert, CabinetActor, CheckSession, ClearAlert, CloseSession, CommandResult, Deliver,
    GetSnapshot, InjectPanic, SendCommand, SetDesired,
};
use crate::alert::AlertType;
use crate::machine::{CabinetSnapshot, Refusal, SessionPhase};
use crate::protocol::{CabinetConfig, CommandBody, SessionMode, UplinkBody};

/// The cabinet's actor did not answer: its mailbox is closed (stopped) or full.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the cabinet actor did not answer: {0}")]
pub struct Unreachable(String);

/// Why a command has no outcome to report.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    /// The actor could not be asked.
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    /// The actor restarted (its logic panicked) before the command ended.
    #[error("the cabinet actor restarted before the command ended")]
    Restarted,
}

/// One cabinet, wherever its actor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CabinetHandle {
    addr: Addr<CabinetActor>,
}

fn unreachable(e: actix::MailboxError) -> Unreachable {
    Unreachable(e.to_string())
}

impl CabinetHandle {
    pub(crate) fn local(addr: Addr<CabinetActor>) -> Self {
        Self { addr }
    }

    /// Hands over a parsed uplink message without waiting: the uplink pump must never block on
    /// one cabinet.
    pub fn deliver(&self, body: UplinkBody) {
        self.addr.do_send(Deliver(body));
    }

    /// The live state.
    pub async fn snapshot(&self) -> Result<CabinetSnapshot, Unreachable> {
        self.addr.send(GetSnapshot).await.map_err(unreachable)
    }

    /// Whether a session of this mode may start now (`None`), or why not.
    pub async fn check_session(&self, mode: SessionMode) -> Result<Option<Refusal>, Unreachable> {
        self.addr
            .send(CheckSession(mode))
            .await
            .map_err(unreachable)
    }

    /// Sends a command and waits for its truthful outcome (acked, rejected, timed out).
    pub async fn command(&self, body: CommandBody) -> Result<CommandResult, CommandError> {
        self.addr
            .send(SendCommand(body))
            .await
            .map_err(unreachable)?
            .map_err(|_| CommandError::Restarted)
    }

    /// Ends the session `session_id` on the cabinet's side (the cabinet takes new sessions
    /// again); answers the phase it was in, or `None` when the actor does not hold it.
    pub async fn close_session(
        &self,
        session_id: &str,
    ) -> Result<Option<SessionPhase>, Unreachable> {
        self.addr
            .send(CloseSession(session_id.to_owned()))
            .await
            .map_err(unreachable)
    }

    /// A new desired configuration, pushed when the cabinet is online. Does not wait.
    pub fn set_desired(&self, config: CabinetConfig) {
        self.addr.do_send(SetDesired(config));
    }

    /// An operator acknowledged an alert; answers whether it was active.
    pub async fn ack_alert(&self, kind: AlertType) -> Result<bool, Unreachable> {
        self.addr.send(AckAlert(kind)).await.map_err(unreachable)
    }

    /// An operator cleared an alert; answers whether it was active.
    pub async fn clear_alert(&self, kind: AlertType, by: String) -> Result<bool, Unreachable> {
        self.addr
            .send(ClearAlert { kind, by })
            .await
            .map_err(unreachable)
    }

    /// Fault injection for supervision tests: the next step of the logic panics.
    #[doc(hidden)]
    pub async fn inject_panic(&self) -> Result<(), Unreachable> {
        self.addr.send(InjectPanic).await.map_err(unreachable)
    }
}
