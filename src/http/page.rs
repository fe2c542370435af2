//! The operator web page: three static files compiled into the binary, so the page needs no
//! build step and always matches the API of the hub that serves it.

use actix_web::{http::header, HttpResponse};

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");

// Scripts and styles only from the hub itself: a cabinet id or alert detail that carries markup
// cannot run in an operator's browser even if some rendering path forgot to escape it. Images
// may also be `blob:`: the service order's QR code is fetched with the key by the page's own
// script and shown from memory (an `<img src>` to the API could not send the key).
const CSP: &str =
    "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; style-src 'self'; \
                   script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn file(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(body)
}

/// The operator page.
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200, content_type = "text/html")))]
pub async fn index() -> HttpResponse {
    file(INDEX, "text/html; charset=utf-8")
}

/// The operator page's script.
#[utoipa::path(get, path = "/ui/app.js", tag = "page", responses((status = 200, content_type = "text/javascript")))]
pub async fn app_js() -> HttpResponse {
    file(APP_JS, "text/javascript; charset=utf-8")
}

/// The operator page's styles.
#[utoipa::path(get, path = "/ui/app.css", tag = "page", responses((status = 200, content_type = "text/css")))]
pub async fn app_css() -> HttpResponse {
    file(APP_CSS, "text/css; charset=utf-8")
}
