//! The HTTP API (API.md): one file per resource, the route table here. Every endpoint enforces
//! role and merchant scope; another merchant's resource is a 404. The OpenAPI document is
//! generated from the handlers' annotations and the reply structs, and a test holds it to the
//! route table.

pub mod access;
pub mod alerts;
pub mod auth;
pub mod bills;
pub mod cabinets;
pub mod catalog;
pub mod deadline;
mod error;
pub mod feed;
pub mod health;
pub mod keys;
pub mod merchants;
pub mod notifications;
pub mod page;
pub mod route;
pub mod service_orders;
pub mod sessions;
#[cfg(feature = "simulators")]
pub mod simulators;
pub mod state;
pub mod stock;

use std::sync::OnceLock;

use actix_web::{web, HttpResponse, ResponseError};
use utoipa::OpenApi;

pub use error::{ErrorBody, ErrorDetail};
pub use state::AppState;

use crate::error::ApiError;

/// Declares the route table once: `ROUTES` lists it (for the contract test) and `mount`
/// registers exactly it, so a route cannot be served without being listed.
macro_rules! routes {
    ($( $method:ident $path:literal => $handler:path ),* $(,)?) => {
        /// Every route the hub serves besides the simulators': (method, path).
        pub const ROUTES: &[(&str, &str)] = &[ $( (stringify!($method), $path) ),* ];

        pub(crate) fn mount(cfg: &mut web::ServiceConfig) {
            $crate::http::mount_grouped(cfg, vec![ $( ($path, web::$method().to($handler)) ),* ]);
        }
    };
}
#[cfg(feature = "simulators")]
pub(crate) use routes;

routes! {
    get "/healthz" => health::healthz,
    get "/readyz" => health::readyz,
    get "/metrics" => health::metrics,
    get "/api/openapi.json" => openapi_json,
    get "/ws" => feed::ws,
    get "/" => page::index,
    get "/ui/app.js" => page::app_js,
    get "/ui/app.css" => page::app_css,
    get "/api/v1/me" => merchants::whoami,
    post "/api/v1/merchants" => merchants::create_merchant,
    put "/api/v1/merchants/{id}/payment" => merchants::merchant_payment,
    get "/api/v1/merchants/{id}/payment" => merchants::merchant_payment_view,
    get "/api/v1/merchants/{id}/recognition" => merchants::recognition_view,
    put "/api/v1/merchants/{id}/recognition" => merchants::set_recognition,
    post "/api/v1/api-keys" => merchants::create_key,
    get "/api/v1/api-keys" => keys::list_keys,
    delete "/api/v1/api-keys/{id}" => keys::revoke_key,
    post "/api/v1/api-keys/{id}/rotate" => keys::rotate_key,
    post "/api/v1/feed-tickets" => keys::feed_ticket,
    post "/api/v1/cabinets" => cabinets::register_cabinet,
    get "/api/v1/cabinets" => cabinets::list_cabinets,
    get "/api/v1/cabinets/{id}" => cabinets::get_cabinet,
    post "/api/v1/cabinets/{id}/activate" => cabinets::activate_cabinet,
    post "/api/v1/cabinets/{id}/certificate" => cabinets::issue_certificate,
    delete "/api/v1/cabinets/{id}/certificate" => cabinets::revoke_certificate,
    post "/api/v1/cabinets/{id}/secret" => cabinets::rotate_secret,
    patch "/api/v1/cabinets/{id}/config" => cabinets::patch_config,
    get "/api/v1/cabinets/{id}/config" => cabinets::get_config,
    post "/api/v1/cabinets/{id}/service" => cabinets::extend_service,
    post "/api/v1/service-orders" => service_orders::create_service_order,
    get "/api/v1/service-orders" => service_orders::list_service_orders,
    get "/api/v1/service-orders/{id}" => service_orders::get_service_order,
    get "/api/v1/service-orders/{id}/qr.svg" => service_orders::service_order_qr,
    post "/api/v1/cabinets/{id}/commands" => cabinets::send_command,
    get "/api/v1/alerts" => alerts::list_alerts,
    post "/api/v1/alerts/{id}/ack" => alerts::ack_alert,
    post "/api/v1/alerts/{id}/clear" => alerts::clear_alert,
    get "/api/v1/products" => catalog::list_products,
    put "/api/v1/products/{sku}" => catalog::put_product,
    put "/api/v1/cabinets/{id}/prices" => catalog::put_prices,
    get "/api/v1/cabinets/{id}/prices" => catalog::get_prices,
    get "/api/v1/cabinets/{id}/stock" => stock::get_stock,
    put "/api/v1/cabinets/{id}/stock/{sku}" => stock::set_low_mark,
    get "/api/v1/stock-discrepancies" => stock::list_discrepancies,
    post "/api/v1/stock-discrepancies/{id}/resolve" => stock::resolve_discrepancy,
    post "/api/v1/product-templates" => stock::create_template,
    get "/api/v1/product-templates" => stock::list_templates,
    post "/api/v1/product-templates/{id}/apply" => stock::apply_template,
    get "/api/v1/restocks" => stock::list_restocks,
    post "/api/v1/cabinets/{id}/quote" => catalog::quote,
    post "/api/v1/promotions" => catalog::create_promotion,
    get "/api/v1/promotions" => catalog::list_promotions,
    post "/api/v1/promotions/{id}/end" => catalog::end_promotion,
    post "/api/v1/sessions" => sessions::start_session,
    get "/api/v1/sessions" => sessions::list_sessions,
    get "/api/v1/sessions/{id}" => sessions::get_session,
    post "/api/v1/sessions/{id}/close" => sessions::close_session,
    get "/api/v1/orders" => sessions::list_orders,
    get "/api/v1/orders/{id}" => sessions::get_order,
    post "/api/v1/orders/{id}/resolve" => sessions::resolve_order,
    post "/api/v1/orders/{id}/refund" => sessions::refund_order,
    post "/api/v1/orders/{id}/settlement/retry" => sessions::retry_settlement,
    get "/api/v1/settlements" => sessions::list_settlements,
    get "/api/v1/bills/{merchant_id}/{date}" => bills::get_bill,
    get "/api/v1/stats/{merchant_id}/{date}" => bills::get_stats,
    get "/api/v1/blacklist" => sessions::list_blacklist,
    get "/api/v1/payment-exceptions" => sessions::list_payment_exceptions,
    get "/api/v1/audit" => sessions::list_audit,
    post "/api/v1/orders/{id}/modify" => sessions::modify_order,
    post "/api/v1/blacklist" => sessions::add_blacklist,
    delete "/api/v1/blacklist/{user_id}" => sessions::remove_blacklist,
    post "/api/v1/payments/wechat/notify" => notifications::wechat_notify,
    post "/api/v1/payments/wechat/merchant-notify" => notifications::wechat_merchant_notify,
    post "/api/v1/payments/alipay/notify" => notifications::alipay_notify,
}

/// Registers routes in their order, those under `/api/v1/{collection}` inside one scope per
/// collection. actix tries resources in turn and matches each dynamic one with a regex capture,
/// so in one flat list a request paid for every `{id}` route ahead of it (2.5 % of the hub's
/// CPU in the shopping rush's profile); a scope's static prefix is compared as a string first.
pub(crate) fn mount_grouped(
    cfg: &mut web::ServiceConfig,
    routes: Vec<(&'static str, actix_web::Route)>,
) {
    let mut scopes: Vec<(&'static str, Vec<(&'static str, actix_web::Route)>)> = Vec::new();
    for (path, route) in routes {
        let Some(rest) = path.strip_prefix("/api/v1/") else {
            cfg.route(path, route);
            continue;
        };
        let cut = "/api/v1/".len() + rest.find('/').unwrap_or(rest.len());
        let (prefix, inner) = path.split_at(cut);
        match scopes.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, group)) => group.push((inner, route)),
            None => scopes.push((prefix, vec![(inner, route)])),
        }
    }
    for (prefix, group) in scopes {
        let scope = group
            .into_iter()
            .fold(web::scope(prefix), |scope, (inner, route)| {
                scope.route(inner, route)
            });
        cfg.service(scope);
    }
}

/// The generated contract.
#[derive(OpenApi)]
#[openapi(
    info(title = "cabinet-hub", description = "The hub's HTTP and WebSocket API (API.md)."),
    modifiers(&BearerAuth),
    paths(
        health::healthz, health::readyz, health::metrics, openapi_json, feed::ws,
        page::index, page::app_js, page::app_css,
        merchants::whoami, merchants::create_merchant, merchants::merchant_payment, merchants::merchant_payment_view, merchants::create_key,
        merchants::recognition_view, merchants::set_recognition,
        keys::list_keys, keys::revoke_key, keys::rotate_key, keys::feed_ticket,
        cabinets::register_cabinet, cabinets::list_cabinets, cabinets::get_cabinet,
        cabinets::activate_cabinet, cabinets::issue_certificate, cabinets::revoke_certificate, cabinets::rotate_secret,
        cabinets::patch_config,
        cabinets::get_config, cabinets::extend_service, cabinets::send_command,
        service_orders::create_service_order, service_orders::list_service_orders, service_orders::get_service_order, service_orders::service_order_qr,
        alerts::list_alerts, alerts::ack_alert, alerts::clear_alert,
        catalog::list_products, catalog::put_product, catalog::put_prices, catalog::get_prices,
        stock::get_stock, stock::set_low_mark, stock::list_discrepancies, stock::resolve_discrepancy,
        stock::create_template, stock::list_templates, stock::apply_template, stock::list_restocks,
        catalog::quote, catalog::create_promotion, catalog::list_promotions, catalog::end_promotion,
        sessions::start_session, sessions::list_sessions, sessions::get_session, sessions::close_session, sessions::list_orders, sessions::get_order,
        sessions::resolve_order, sessions::refund_order, sessions::list_blacklist,
        sessions::list_payment_exceptions, sessions::list_audit, sessions::modify_order,
        sessions::list_settlements, sessions::retry_settlement, bills::get_bill, bills::get_stats,
        sessions::add_blacklist, sessions::remove_blacklist,
        notifications::wechat_notify, notifications::wechat_merchant_notify, notifications::alipay_notify,
    ),
    components(schemas(ErrorBody, ErrorDetail, crate::error::ErrorCode))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole document: the API and, in builds with them, the simulators' control routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi_for(true)
}

/// The document of a hub whose simulators are on (`payments.simulator`) or off: the
/// simulators' control routes are described only where they are served.
pub fn openapi_for(simulators_on: bool) -> utoipa::openapi::OpenApi {
    #[allow(unused_mut)]
    let mut doc = ApiDoc::openapi();
    #[cfg(feature = "simulators")]
    if simulators_on {
        doc.merge(simulators::SimDoc::openapi());
    }
    #[cfg(not(feature = "simulators"))]
    let _ = simulators_on;
    doc
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "health",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json")))]
pub async fn openapi_json(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // Built once per variant: the document is a function of the build and of whether the
    // simulators run, not of the request.
    static WITH_SIMS: OnceLock<Result<String, String>> = OnceLock::new();
    static WITHOUT_SIMS: OnceLock<Result<String, String>> = OnceLock::new();
    let on = state.simulators_on();
    let cell = if on { &WITH_SIMS } else { &WITHOUT_SIMS };
    let doc = cell.get_or_init(|| openapi_for(on).to_json().map_err(|e| e.to_string()));
    match doc {
        Ok(body) => Ok(HttpResponse::Ok()
            .content_type("application/json")
            .body(body.as_str())),
        Err(e) => Err(ApiError::internal(format!("the OpenAPI document: {e}"))),
    }
}

/// Mounts every route; the simulators' control routes only when they run.
pub fn configure(cfg: &mut web::ServiceConfig, simulators_on: bool) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(64 * 1024)
            .error_handler(error::json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(error::query_error))
    .app_data(web::PathConfig::default().error_handler(error::path_error));
    mount(cfg);
    #[cfg(feature = "simulators")]
    if simulators_on {
        simulators::mount(cfg);
    }
    #[cfg(not(feature = "simulators"))]
    let _ = simulators_on;
    cfg.default_service(web::to(|| async {
        ApiError::not_found("route").error_response()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route this build serves.
    fn served() -> Vec<(&'static str, &'static str)> {
        #[allow(unused_mut)]
        let mut routes = ROUTES.to_vec();
        #[cfg(feature = "simulators")]
        routes.extend_from_slice(simulators::ROUTES);
        routes
    }

    /// The routes of `routes` that `doc` does not describe.
    fn missing<'a>(
        doc: &utoipa::openapi::OpenApi,
        routes: &'a [(&'a str, &'a str)],
    ) -> Vec<&'a (&'a str, &'a str)> {
        let v = serde_json::to_value(doc).unwrap_or_default();
        routes
            .iter()
            .filter(|(method, path)| !v["paths"][*path][*method].is_object())
            .collect()
    }

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let routes = served();
        let missing = missing(&openapi(), &routes);
        assert!(
            missing.is_empty(),
            "routes missing from the OpenAPI document: {missing:?}"
        );
    }

    #[test]
    fn the_document_describes_no_route_that_is_not_served() {
        let doc = openapi();
        let routes = served();
        for (path, item) in &doc.paths.paths {
            let Ok(v) = serde_json::to_value(item) else {
                panic!("path item {path} does not serialise");
            };
            for method in ["get", "post", "put", "patch", "delete"] {
                if v[method].is_object() {
                    assert!(
                        routes.contains(&(method, path.as_str())),
                        "{method} {path} is documented but not served"
                    );
                }
            }
        }
    }

    #[test]
    fn without_simulators_the_document_has_no_sim_route() {
        let v = serde_json::to_value(openapi_for(false)).unwrap_or_default();
        let paths = v["paths"].as_object().cloned().unwrap_or_default();
        assert!(paths.contains_key("/api/v1/sessions"));
        assert!(
            !paths.keys().any(|p| p.starts_with("/sim")),
            "{:?}",
            paths.keys()
        );
    }

    #[test]
    fn a_route_left_out_of_the_document_is_caught() {
        // The check above must be able to fail: the same check on a document without a route.
        let mut doc = openapi();
        doc.paths.paths.remove("/api/v1/orders");
        let routes = served();
        assert_eq!(missing(&doc, &routes), vec![&("get", "/api/v1/orders")]);
    }
}
