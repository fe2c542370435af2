//! The payment providers' simulators, served by the hub itself under `/sim/…` when
//! `payments.simulator` is on: WeChat Pay Score and Alipay 芝麻先享 as their real services
//! behave (signed answers, notifications with retries, scripted shoppers). They carry
//! development keys, so a production build can leave them out (`--no-default-features`).
//! `cabinet-hub simulate` serves them in a process of their own (as the providers' servers are
//! in the field), for a hub started with `payments.simulator_url`.

pub mod alipay;
mod journal;
pub mod wechat;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

use crate::config::Settings;
use crate::payments::alipay::{AlipayClient, AlipayConfig};
use crate::payments::wechat::{WechatClient, WechatConfig};
use crate::payments::Providers;

const DEV_MERCHANT_KEY: &str = include_str!("../../config/dev-keys/wechat-merchant.key.pem");
const DEV_MERCHANT_PUB: &str = include_str!("../../config/dev-keys/wechat-merchant.pub.pem");
const DEV_PLATFORM_KEY: &str = include_str!("../../config/dev-keys/wechat-platform.key.pem");
const DEV_PLATFORM_PUB: &str = include_str!("../../config/dev-keys/wechat-platform.pub.pem");
/// The simulated platform's ordinary merchant account (普通商户), which takes Native payments;
/// `1900000001` is its partner (服务商) account, which cannot.
pub const DEV_MERCHANT_MCHID: &str = "1900000002";
/// The simulator's APIv3 key (development only).
pub const DEV_API_V3_KEY: &str = "cabinethubsimulatorapiv3key00001";
/// The simulator's APIv2 key, which signs the mini-program's `extraData` (development only).
pub const DEV_API_V2_KEY: &str = "cabinethubsimulatorapiv2key00001";
const DEV_ALIPAY_APP_KEY: &str = include_str!("../../config/dev-keys/alipay-app.key.pem");
const DEV_ALIPAY_APP_PUB: &str = include_str!("../../config/dev-keys/alipay-app.pub.pem");
const DEV_ALIPAY_KEY: &str = include_str!("../../config/dev-keys/alipay-platform.key.pem");
const DEV_ALIPAY_PUB: &str = include_str!("../../config/dev-keys/alipay-platform.pub.pem");

/// Both simulators of one hub.
#[derive(Clone)]
pub struct Simulators {
    /// WeChat Pay Score.
    pub wechat: wechat::WechatSim,
    /// Alipay.
    pub alipay: alipay::AlipaySim,
}

impl Simulators {
    /// Starts both simulators, to be served by the hub at `http`, and the real clients
    /// configured to talk to them there.
    pub fn start(settings: &Settings, http: SocketAddr) -> anyhow::Result<(Providers, Self)> {
        let sims = Self::new(settings)?;
        let base = format!("http://{http}");
        Ok((dev_providers(&base, &base)?, sims))
    }

    /// Both simulators with the development keys and the `[payments]` simulator settings; they
    /// keep their state under `data_dir`.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let p = &settings.payments;
        let wechat = wechat::WechatSim::new(wechat::SimConfig {
            mchid: "1900000001".into(),
            direct_mchid: DEV_MERCHANT_MCHID.into(),
            merchant_serial: "DEV_MERCHANT_SERIAL".into(),
            merchant_public_key_pem: DEV_MERCHANT_PUB.into(),
            platform_serial: "PUB_KEY_ID_SIMULATOR".into(),
            platform_key_pem: DEV_PLATFORM_KEY.into(),
            api_v3_key: DEV_API_V3_KEY.into(),
            api_v2_key: DEV_API_V2_KEY.into(),
            retry_scale: p.simulator_retry_scale,
            confirm_delay: Duration::from_millis(p.simulator_confirm_ms),
            cancel_after_complete: false,
            persist: Some(settings.data_dir.join("wechat-simulator.jsonl")),
            finished_kept: Duration::from_secs(p.simulator_orders_kept_s),
        })?;
        // WeChat retries deductions on its own; a minute, scaled like the notification schedule.
        wechat.start_deduction_retries(Duration::from_secs_f64(
            (60.0 * p.simulator_retry_scale).max(0.05),
        ));
        let alipay = alipay::AlipaySim::new(alipay::AlipaySimConfig {
            app_id: "2021000000000001".into(),
            app_public_key_pem: DEV_ALIPAY_APP_PUB.into(),
            alipay_key_pem: DEV_ALIPAY_KEY.into(),
            retry_scale: p.simulator_retry_scale,
            confirm_delay: Duration::from_millis(p.simulator_confirm_ms),
        })?;
        Ok(Self { wechat, alipay })
    }

    /// Mounts both simulators' provider-side endpoints.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        wechat::configure(cfg, self.wechat.clone());
        alipay::configure(cfg, self.alipay.clone());
    }
}

/// The real clients, with the development keys, talking to simulators served at `sim_base`
/// (`http://host:port`: this hub, or a `cabinet-hub simulate` process of its own), with
/// notifications addressed to the hub at `hub_base`.
pub fn dev_providers(sim_base: &str, hub_base: &str) -> anyhow::Result<Providers> {
    let sim_base = sim_base.trim_end_matches('/');
    let hub_base = hub_base.trim_end_matches('/');
    let wechat_config = |mchid: &str, notify: &str| WechatConfig {
        base_url: format!("{sim_base}{}", wechat::PREFIX),
        mchid: mchid.into(),
        merchant_serial: "DEV_MERCHANT_SERIAL".into(),
        merchant_key_path: String::new(),
        platform_serial: "PUB_KEY_ID_SIMULATOR".into(),
        platform_public_key_path: String::new(),
        api_v3_key: DEV_API_V3_KEY.into(),
        apiv2_key: DEV_API_V2_KEY.into(),
        service_id: "500001".into(),
        appid: "wxsimulator".into(),
        notify_url: format!("{hub_base}{notify}"),
    };
    let wechat_client = WechatClient::with_keys(
        wechat_config("1900000001", "/api/v1/payments/wechat/notify"),
        DEV_MERCHANT_KEY,
        DEV_PLATFORM_PUB,
    )
    .map_err(|e| anyhow::anyhow!("simulator client: {e}"))?;
    let merchant_client = WechatClient::with_keys(
        wechat_config(
            DEV_MERCHANT_MCHID,
            "/api/v1/payments/wechat/merchant-notify",
        ),
        DEV_MERCHANT_KEY,
        DEV_PLATFORM_PUB,
    )
    .map_err(|e| anyhow::anyhow!("simulator client: {e}"))?;
    let alipay_client = AlipayClient::new(
        AlipayConfig {
            gateway: format!("{sim_base}{}/gateway.do", alipay::PREFIX),
            app_id: "2021000000000001".into(),
            notify_url: format!("{hub_base}/api/v1/payments/alipay/notify"),
            platform_pid: Some(alipay::PLATFORM_PID.into()),
        },
        DEV_ALIPAY_APP_KEY,
        DEV_ALIPAY_PUB,
    )
    .map_err(|e| anyhow::anyhow!("simulator client: {e}"))?;
    Ok(Providers {
        wechat: Some(Arc::new(wechat_client)),
        wechat_merchant: Some(Arc::new(merchant_client)),
        alipay: Some(Arc::new(alipay_client)),
    })
}

/// `cabinet-hub simulate`: both simulators' provider-side endpoints, and `/healthz`, on `listen`
/// until the process is stopped. Loopback only unless `payments.simulator_public`: they carry
/// development keys.
pub async fn serve(settings: Settings, listen: SocketAddr) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() && !settings.payments.simulator_public {
        anyhow::bail!("simulate --listen {listen}: not a loopback address; the simulators carry development keys (set HUB__PAYMENTS__SIMULATOR_PUBLIC=true for a shared test environment)");
    }
    std::fs::create_dir_all(&settings.data_dir)?;
    let sims = Simulators::new(&settings)?;
    tracing::info!(%listen, "payment simulators serving");
    // Scripting a shopper (as a hub's `PUT /sim/users/{id}` does for its own simulators) is
    // offered on loopback only: there is no key to ask for here.
    let control = listen.ip().is_loopback();
    actix_web::HttpServer::new(move || {
        let sims = sims.clone();
        let scripted = sims.clone();
        let app = actix_web::App::new().route(
            "/healthz",
            web::get().to(|| async { actix_web::HttpResponse::Ok().body("ok") }),
        );
        let app = if control {
            app.route(
                "/sim/users/{user_id}",
                web::put().to(
                    move |path: web::Path<String>,
                          body: web::Json<crate::http::simulators::SimUserBody>| {
                        let sims = scripted.clone();
                        async move {
                            let script = body.script();
                            sims.wechat.set_user(&path, script);
                            sims.alipay.set_user(&path, script);
                            actix_web::HttpResponse::Ok().json(script)
                        }
                    },
                ),
            )
        } else {
            app
        };
        app.configure(move |c| sims.configure(c))
    })
    .bind(listen)?
    .run()
    .await?;
    Ok(())
}
