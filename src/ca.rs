//! The device CA for certificate mode. Created on first start and kept in the data dir; it
//! signs the broker's server certificate and one client certificate per cabinet, whose subject
//! Organization (O) is the cabinet id — rumqttd confines that client to `/tenants/{O}/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use cabinet_actors::ids::CabinetId;

const CA_CN: &str = "cabinet-hub device CA";

/// A client certificate and its key, PEM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedCert {
    /// Hex serial.
    pub serial: String,
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8). Shown once; the hub keeps no copy.
    pub key_pem: String,
    /// The CA that signed it (also the broker's trust anchor).
    pub ca_pem: String,
    /// Unix ms.
    pub not_after_ms: i64,
}

/// The CA's files and signing key.
pub struct DeviceCa {
    key: KeyPair,
    ca_pem: String,
    dir: PathBuf,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    dn.push(DnType::OrganizationName, "cabinet-hub");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    crate::private::write_file(path, contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn serial() -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    b[0] &= 0x7f; // a positive DER integer
    Ok(b.to_vec())
}

impl DeviceCa {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        crate::private::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key_path = dir.join("device-ca.key.pem");
        let cert_path = dir.join("device-ca.pem");
        if key_path.exists() && cert_path.exists() {
            // A key written by an older version may be readable by others.
            crate::private::tighten(&key_path)
                .with_context(|| format!("chmod 600 {}", key_path.display()))?;
            let key = KeyPair::from_pem(&fs::read_to_string(&key_path)?)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let ca_pem = fs::read_to_string(&cert_path)?;
            return Ok(Self {
                key,
                ca_pem,
                dir: dir.to_path_buf(),
            });
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params()?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365 * 20);
        let cert = params.self_signed(&key)?;
        write_private(&key_path, &key.serialize_pem())?;
        fs::write(&cert_path, cert.pem())?;
        tracing::info!(path = %cert_path.display(), "created the device CA");
        Ok(Self {
            key,
            ca_pem: cert.pem(),
            dir: dir.to_path_buf(),
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("device-ca.pem")
    }

    fn issuer(&self) -> anyhow::Result<Issuer<'static, &KeyPair>> {
        // The issuer is rebuilt from the same name and key, so leaves chain to the stored CA.
        Ok(Issuer::new(ca_params()?, &self.key))
    }

    /// Writes the broker's server certificate for `names` and returns (cert path, key path).
    pub fn server_cert(&self, names: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("cabinet-hub"),
        );
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(1);
        p.not_after = now + Duration::days(825);
        p.serial_number = Some(serial()?.into());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer()?)?;
        let cert_path = self.dir.join("broker.pem");
        let key_path = self.dir.join("broker.key.pem");
        fs::write(&cert_path, cert.pem())?;
        write_private(&key_path, &key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// Issues a client certificate for a cabinet: subject O = CN = the cabinet id.
    pub fn issue_client(&self, cabinet: &CabinetId, valid_days: i64) -> anyhow::Result<IssuedCert> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cabinet.as_str());
        dn.push(DnType::OrganizationName, cabinet.as_str());
        p.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        let not_after = now + Duration::days(valid_days);
        p.not_after = not_after;
        let serial = serial()?;
        p.serial_number = Some(serial.clone().into());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &self.issuer()?)?;
        Ok(IssuedCert {
            serial: hex::encode(serial),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.ca_pem.clone(),
            not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000) as i64,
        })
    }
}
