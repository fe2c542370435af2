//! Who may connect: the in-memory directory of registered cabinets and their secrets, and
//! why a connection is refused.

use std::collections::HashMap;
use std::sync::RwLock;

use cabinet_actors::ids::{CabinetId, MerchantId};

use crate::secrets::{constant_time_eq, sha256_hex};
use crate::store::Store;

/// Why a connection was refused. Stable metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum AuthFailure {
    /// The client id is not a valid cabinet id.
    BadClientId,
    /// Username differs from the client id.
    UsernameMismatch,
    /// No such cabinet.
    UnknownCabinet,
    /// Registered but not activated.
    NotActive,
    /// Wrong secret.
    BadSecret,
}

impl AuthFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What the edge knows of a registered cabinet.
#[derive(Debug, Clone)]
pub struct DirectoryEntry {
    /// Owner.
    pub merchant: MerchantId,
    /// SHA-256 hex of the MQTT secret.
    pub secret_hash: String,
    /// Activated.
    pub active: bool,
}

/// The in-memory credential cache: loaded from storage at start, written through by the API
/// on every registration and activation, read on every connect and every uplink message.
#[derive(Debug, Default)]
pub struct Directory {
    map: RwLock<HashMap<CabinetId, DirectoryEntry>>,
}

impl Directory {
    /// Adds or replaces an entry.
    pub fn put(&self, id: CabinetId, entry: DirectoryEntry) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry);
    }

    /// An entry.
    pub fn get(&self, id: &CabinetId) -> Option<DirectoryEntry> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Loads every registered cabinet.
    pub async fn load(store: &Store) -> anyhow::Result<Self> {
        let d = Self::default();
        for c in store.cabinets(None).await? {
            let (Ok(id), Ok(merchant)) =
                (CabinetId::parse(&c.id), MerchantId::parse(&c.merchant_id))
            else {
                tracing::error!(cabinet_id = %c.id, "stored cabinet has an invalid id; skipped");
                continue;
            };
            d.put(
                id,
                DirectoryEntry {
                    merchant,
                    secret_hash: c.secret_hash,
                    active: c.active,
                },
            );
        }
        Ok(d)
    }

    /// Checks a password-mode login.
    pub fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<CabinetId, AuthFailure> {
        let id = CabinetId::parse(client_id).map_err(|_| AuthFailure::BadClientId)?;
        if username != client_id {
            return Err(AuthFailure::UsernameMismatch);
        }
        let entry = self.get(&id).ok_or(AuthFailure::UnknownCabinet)?;
        if !constant_time_eq(&sha256_hex(password), &entry.secret_hash) {
            return Err(AuthFailure::BadSecret);
        }
        if !entry.active {
            return Err(AuthFailure::NotActive);
        }
        Ok(id)
    }
}
