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
    /// A client certificate that was revoked (or re-issued) or was never issued by this hub.
    RevokedCertificate,
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
    /// Serials (normalised, see [`normal_serial`]) of each cabinet's valid client certificates.
    certificates: RwLock<HashMap<CabinetId, Vec<String>>>,
    /// Counts changes of the set of cabinets, for readers of an external broker to
    /// subscribe to new ones.
    changes: tokio::sync::watch::Sender<u64>,
}

/// A serial as lowercase hex without leading zero bytes: how the broker reads it off the
/// certificate (DER drops them), whatever the issuer stored.
fn normal_serial(hex: &str) -> String {
    let hex = hex.to_ascii_lowercase();
    let mut s = hex.as_str();
    while s.len() > 2 && s.starts_with("00") {
        s = &s[2..];
    }
    s.to_owned()
}

impl Directory {
    /// Adds or replaces an entry.
    pub fn put(&self, id: CabinetId, entry: DirectoryEntry) {
        let new = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry)
            .is_none();
        if new {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Every registered cabinet's id.
    pub fn ids(&self) -> Vec<CabinetId> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Told of every cabinet added or removed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// An entry.
    pub fn get(&self, id: &CabinetId) -> Option<DirectoryEntry> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The cabinet's valid certificates from now on (empty: none; revocation takes effect
    /// at the next connect).
    pub fn set_certificates(&self, id: CabinetId, serials: &[&str]) {
        let serials = serials.iter().map(|s| normal_serial(s)).collect();
        self.certificates
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, serials);
    }

    /// Checks a certificate-mode connection: the certificate (its chain and validity already
    /// verified by TLS) must be one the hub issued to an active cabinet and has not revoked.
    pub fn check_certificate(&self, tenant: &str, serial: &str) -> Result<CabinetId, AuthFailure> {
        let id = CabinetId::parse(tenant).map_err(|_| AuthFailure::BadClientId)?;
        let entry = self.get(&id).ok_or(AuthFailure::UnknownCabinet)?;
        let serial = normal_serial(serial);
        let valid = self
            .certificates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|s| s.contains(&serial));
        if !valid {
            return Err(AuthFailure::RevokedCertificate);
        }
        if !entry.active {
            return Err(AuthFailure::NotActive);
        }
        Ok(id)
    }

    /// Reads one cabinet's entry and certificates again from storage: another node changed
    /// them (registered, activated, a new secret, a certificate issued or revoked).
    pub async fn reload(&self, store: &Store, id: &CabinetId) -> anyhow::Result<()> {
        let serials = store.valid_certificates_of(id.as_str()).await?;
        let serials: Vec<&str> = serials.iter().map(String::as_str).collect();
        self.set_certificates(id.clone(), &serials);
        match store.cabinet(id.as_str()).await? {
            Some(c) => {
                let merchant = MerchantId::parse(&c.merchant_id).map_err(|_| {
                    anyhow::anyhow!("stored cabinet {} has an invalid merchant id", c.id)
                })?;
                self.put(
                    id.clone(),
                    DirectoryEntry {
                        merchant,
                        secret_hash: c.secret_hash,
                        active: c.active,
                    },
                );
            }
            None => {
                self.map
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                self.changes.send_modify(|n| *n += 1);
            }
        }
        Ok(())
    }

    /// Reads every entry and certificate again (changes another node made may have been
    /// missed): replaced whole, so what was removed meanwhile goes too.
    pub async fn reload_all(&self, store: &Store) -> anyhow::Result<()> {
        let fresh = Self::load(store).await?;
        let map = std::mem::take(&mut *fresh.map.write().unwrap_or_else(|p| p.into_inner()));
        let certificates = std::mem::take(
            &mut *fresh
                .certificates
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
        *self.certificates.write().unwrap_or_else(|p| p.into_inner()) = certificates;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Loads every registered cabinet and its valid certificates.
    pub async fn load(store: &Store) -> anyhow::Result<Self> {
        let d = Self::default();
        let mut certificates: HashMap<CabinetId, Vec<String>> = HashMap::new();
        for (cabinet, serial) in store.valid_certificates().await? {
            if let Ok(id) = CabinetId::parse(&cabinet) {
                certificates
                    .entry(id)
                    .or_default()
                    .push(normal_serial(&serial));
            }
        }
        *d.certificates.write().unwrap_or_else(|p| p.into_inner()) = certificates;
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
