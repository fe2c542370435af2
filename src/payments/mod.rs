//! Payment providers. Real endpoints cannot be reached from the development machines: the
//! clients here implement the providers' real security (signing, verification, decryption) and
//! are tested against vectors made independently with OpenSSL.

pub mod sim_wechat;
pub mod wechat;
pub mod wechat_crypto;
