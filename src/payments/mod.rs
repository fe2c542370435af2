//! Payment providers. Real endpoints cannot be reached from the development machines: the
//! clients here implement the providers' real security (signing, verification, decryption) and
//! are tested against vectors made independently with OpenSSL.

pub mod alipay;
pub mod alipay_crypto;
mod journal;
pub mod sim_alipay;
pub mod sim_wechat;
pub mod wechat;
pub mod wechat_crypto;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
use sim_wechat::{SimConfig, WechatSim};
use wechat::{WechatClient, WechatConfig};

const DEV_MERCHANT_KEY: &str = include_str!("../../config/dev-keys/wechat-merchant.key.pem");
const DEV_MERCHANT_PUB: &str = include_str!("../../config/dev-keys/wechat-merchant.pub.pem");
const DEV_PLATFORM_KEY: &str = include_str!("../../config/dev-keys/wechat-platform.key.pem");
const DEV_PLATFORM_PUB: &str = include_str!("../../config/dev-keys/wechat-platform.pub.pem");
/// The simulator's APIv3 key (development only).
pub const DEV_API_V3_KEY: &str = "cabinethubsimulatorapiv3key00001";

/// The WeChat client, and the simulator it talks to when `payments.simulator` is on (then the
/// simulator is served by this hub at `http://{http}/sim/wechatpay`).
pub fn build_wechat(
    settings: &Settings,
    http: SocketAddr,
) -> anyhow::Result<(Option<Arc<WechatClient>>, Option<WechatSim>)> {
    if !settings.payments.simulator {
        let Some(cfg) = settings.payments.wechat.clone() else {
            return Ok((None, None));
        };
        return Ok((
            Some(Arc::new(
                WechatClient::new(cfg).map_err(|e| anyhow::anyhow!("payments.wechat: {e}"))?,
            )),
            None,
        ));
    }
    let sim = WechatSim::new(SimConfig {
        mchid: "1900000001".into(),
        merchant_serial: "DEV_MERCHANT_SERIAL".into(),
        merchant_public_key_pem: DEV_MERCHANT_PUB.into(),
        platform_serial: "PUB_KEY_ID_SIMULATOR".into(),
        platform_key_pem: DEV_PLATFORM_KEY.into(),
        api_v3_key: DEV_API_V3_KEY.into(),
        retry_scale: settings.payments.simulator_retry_scale,
        confirm_delay: Duration::from_millis(settings.payments.simulator_confirm_ms),
        cancel_after_complete: false,
        persist: Some(settings.data_dir.join("wechat-simulator.jsonl")),
        finished_kept: Duration::from_secs(settings.payments.simulator_orders_kept_s),
    })?;
    // WeChat retries deductions on its own; a minute, scaled like the notification schedule.
    sim.start_deduction_retries(Duration::from_secs_f64(
        (60.0 * settings.payments.simulator_retry_scale).max(0.05),
    ));
    let cfg = WechatConfig {
        base_url: format!("http://{http}{}", sim_wechat::PREFIX),
        mchid: "1900000001".into(),
        merchant_serial: "DEV_MERCHANT_SERIAL".into(),
        merchant_key_path: String::new(),
        platform_serial: "PUB_KEY_ID_SIMULATOR".into(),
        platform_public_key_path: String::new(),
        api_v3_key: DEV_API_V3_KEY.into(),
        service_id: "500001".into(),
        appid: "wxsimulator".into(),
        notify_url: format!("http://{http}/api/v1/payments/wechat/notify"),
    };
    let client = WechatClient::with_keys(cfg, DEV_MERCHANT_KEY, DEV_PLATFORM_PUB)
        .map_err(|e| anyhow::anyhow!("simulator client: {e}"))?;
    Ok((Some(Arc::new(client)), Some(sim)))
}

const DEV_ALIPAY_APP_KEY: &str = include_str!("../../config/dev-keys/alipay-app.key.pem");
const DEV_ALIPAY_APP_PUB: &str = include_str!("../../config/dev-keys/alipay-app.pub.pem");
const DEV_ALIPAY_KEY: &str = include_str!("../../config/dev-keys/alipay-platform.key.pem");
const DEV_ALIPAY_PUB: &str = include_str!("../../config/dev-keys/alipay-platform.pub.pem");

/// The Alipay client, and its simulator when `payments.simulator` is on (served by this hub at
/// `http://{http}/sim/alipay/gateway.do`); otherwise from `[payments.alipay]`.
pub fn build_alipay(
    settings: &Settings,
    http: SocketAddr,
) -> anyhow::Result<(
    Option<Arc<alipay::AlipayClient>>,
    Option<sim_alipay::AlipaySim>,
)> {
    if !settings.payments.simulator {
        let Some(a) = &settings.payments.alipay else {
            return Ok((None, None));
        };
        return Ok((
            Some(Arc::new(
                a.client()
                    .map_err(|e| anyhow::anyhow!("payments.alipay: {e}"))?,
            )),
            None,
        ));
    }
    let sim = sim_alipay::AlipaySim::new(sim_alipay::AlipaySimConfig {
        app_id: "2021000000000001".into(),
        app_public_key_pem: DEV_ALIPAY_APP_PUB.into(),
        alipay_key_pem: DEV_ALIPAY_KEY.into(),
        retry_scale: settings.payments.simulator_retry_scale,
        confirm_delay: Duration::from_millis(settings.payments.simulator_confirm_ms),
    })?;
    let cfg = alipay::AlipayConfig {
        gateway: format!("http://{http}{}/gateway.do", sim_alipay::PREFIX),
        app_id: "2021000000000001".into(),
        notify_url: format!("http://{http}/api/v1/payments/alipay/notify"),
    };
    let client = alipay::AlipayClient::new(cfg, DEV_ALIPAY_APP_KEY, DEV_ALIPAY_PUB)
        .map_err(|e| anyhow::anyhow!("simulator client: {e}"))?;
    Ok((Some(Arc::new(client)), Some(sim)))
}
