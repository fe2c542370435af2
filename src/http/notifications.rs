//! The payment providers' notifications. No API key: the provider's signature is the
//! credential, checked by the session supervisor. Each provider is answered in its own format:
//! WeChat takes 204 or a JSON `FAIL`, Alipay the text `success` or anything else.

use actix_web::{web, HttpRequest, HttpResponse};

use super::state::AppState;
use crate::payments::wechat::SignedHeaders;
use crate::sessions::NotificationRefusal;

/// Whether the provider should deliver again: only when the notice could not be applied here.
fn retry_later(r: NotificationRefusal) -> bool {
    match r {
        NotificationRefusal::Storage => true,
        NotificationRefusal::NotConfigured
        | NotificationRefusal::BadHeader
        | NotificationRefusal::Stale
        | NotificationRefusal::BadSignature
        | NotificationRefusal::BadEnvelope
        | NotificationRefusal::DecryptFailed => false,
    }
}

/// WeChat Pay's notifications (APIv3: signed headers, an AES-GCM encrypted resource).
#[utoipa::path(post, path = "/api/v1/payments/wechat/notify", tag = "payments",
    request_body(content = Object, description = "WeChat Pay APIv3 notification"),
    responses((status = 204, description = "applied (or a replay)"),
    (status = 401, description = "refused: bad header, stale, bad signature, bad envelope, not decryptable"),
    (status = 500, description = "not applied; WeChat delivers again")))]
pub async fn wechat_notify(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: String,
) -> HttpResponse {
    let headers = wechat_headers(&req);
    wechat_answer(state.sessions.on_wechat_notification(&headers, &body).await)
}

/// The `Wechatpay-*` headers of a notification.
fn wechat_headers(req: &HttpRequest) -> SignedHeaders {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    SignedHeaders {
        timestamp: h("Wechatpay-Timestamp"),
        nonce: h("Wechatpay-Nonce"),
        signature: h("Wechatpay-Signature"),
        serial: h("Wechatpay-Serial"),
    }
}

/// WeChat's answer: 204 once applied, a JSON `FAIL` otherwise (500: deliver again).
fn wechat_answer(r: Result<(), NotificationRefusal>) -> HttpResponse {
    match r {
        Ok(()) => HttpResponse::NoContent().finish(),
        Err(r) if retry_later(r) => HttpResponse::InternalServerError()
            .json(serde_json::json!({"code": "FAIL", "message": "失败"})),
        Err(r) => HttpResponse::Unauthorized()
            .json(serde_json::json!({"code": "FAIL", "message": r.as_str()})),
    }
}

/// WeChat Pay's notifications to the platform's ordinary merchant account (Native payments:
/// service time), verified and decrypted with that account's keys.
#[utoipa::path(post, path = "/api/v1/payments/wechat/merchant-notify", tag = "payments",
    request_body(content = Object, description = "WeChat Pay APIv3 notification"),
    responses((status = 204, description = "applied (or a replay)"),
    (status = 401, description = "refused: bad header, stale, bad signature, bad envelope, not decryptable"),
    (status = 500, description = "not applied; WeChat delivers again")))]
pub async fn wechat_merchant_notify(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: String,
) -> HttpResponse {
    let headers = wechat_headers(&req);
    wechat_answer(
        state
            .sessions
            .on_wechat_merchant_notification(&headers, &body)
            .await,
    )
}

/// Alipay's notifications: form parameters signed by Alipay; answered `success` once applied.
#[utoipa::path(post, path = "/api/v1/payments/alipay/notify", tag = "payments",
    request_body(content = Object, content_type = "application/x-www-form-urlencoded", description = "Alipay notification"),
    responses((status = 200, description = "`success`", content_type = "text/plain"),
    (status = 400, description = "`fail: <reason>`", content_type = "text/plain"),
    (status = 500, description = "`fail`: not applied; Alipay delivers again", content_type = "text/plain")))]
pub async fn alipay_notify(
    state: web::Data<AppState>,
    form: web::Form<std::collections::BTreeMap<String, String>>,
) -> HttpResponse {
    match state
        .sessions
        .on_alipay_notification(&form.into_inner())
        .await
    {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("success"),
        Err(r) if retry_later(r) => HttpResponse::InternalServerError().body("fail"),
        Err(r) => HttpResponse::BadRequest().body(format!("fail: {}", r.as_str())),
    }
}
