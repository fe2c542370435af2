//! Alipay open-platform RSA2 (SHA256withRSA) signing and verification: requests sign the sorted
//! `key=value&…` string of their parameters; responses sign the raw JSON of their
//! `<method>_response` member; asynchronous notifications sign their sorted form parameters
//! without `sign` and `sign_type`.

use std::collections::BTreeMap;

use crate::payments::crypto::{CryptoError, RsaSigner, Verifier, MERCHANT_SIGNING};

/// The string a request's parameters are signed as: sorted by key, empty values and `sign`
/// left out, joined `k=v&k=v` with raw (unencoded) values.
pub fn request_sign_content(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(k, v)| k.as_str() != "sign" && !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The string a notification is signed as: like a request, also without `sign_type`.
pub fn notify_sign_content(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(k, v)| k.as_str() != "sign" && k.as_str() != "sign_type" && !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs request parameters (adds nothing; returns the Base64 signature).
pub fn sign_params(
    signer: &RsaSigner,
    params: &BTreeMap<String, String>,
) -> Result<String, CryptoError> {
    let content = request_sign_content(params);
    MERCHANT_SIGNING.timed(|| signer.sign(content.as_bytes()))
}

/// The exact text of the `<member>` object in a gateway response, for verification: Alipay
/// signs the bytes as sent, so re-serialising would break the signature.
pub fn response_member<'a>(body: &'a str, member: &str) -> Option<&'a str> {
    let members: BTreeMap<String, &'a serde_json::value::RawValue> =
        serde_json::from_str(body).ok()?;
    members.get(member).map(|r| r.get())
}

/// Verifies a gateway response: the signature over the raw `<method>_response` member.
pub fn verify_response(
    verifier: &Verifier,
    key_id: &str,
    body: &str,
    method: &str,
) -> Result<serde_json::Value, CryptoError> {
    let member = format!("{}_response", method.replace('.', "_"));
    let raw = response_member(body, &member).ok_or(CryptoError::BadSignature)?;
    let v: serde_json::Value = serde_json::from_str(body).map_err(|_| CryptoError::BadSignature)?;
    let sign = v["sign"].as_str().ok_or(CryptoError::BadSignature)?;
    verifier.verify_message(key_id, raw.as_bytes(), sign)?;
    serde_json::from_str(raw).map_err(|_| CryptoError::BadSignature)
}

/// Verifies an asynchronous notification's form parameters.
pub fn verify_notify(
    verifier: &Verifier,
    key_id: &str,
    params: &BTreeMap<String, String>,
) -> Result<(), CryptoError> {
    let sign = params.get("sign").ok_or(CryptoError::BadSignature)?;
    if params.get("sign_type").is_some_and(|t| t != "RSA2") {
        return Err(CryptoError::BadSignature);
    }
    verifier.verify_message(key_id, notify_sign_content(params).as_bytes(), sign)
}

/// Fen as Alipay's yuan string (`1250` → `"12.50"`).
pub fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    // unsigned_abs: i64::MIN has no positive i64.
    let abs = fen.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Alipay's yuan string as fen; `None` for anything but a plain amount with ≤ 2 decimals.
pub fn fen(yuan: &str) -> Option<i64> {
    let (whole, frac) = yuan.split_once('.').unwrap_or((yuan, ""));
    if whole.is_empty()
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac = format!("{frac:0<2}");
    whole
        .parse::<i64>()
        .ok()?
        .checked_mul(100)?
        .checked_add(frac.parse::<i64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = include_str!("../testdata/merchant_key.pem");
    const PUB: &str = include_str!("../testdata/merchant_pub.pem");
    const CONTENT: &str = include_str!("../testdata/alipay_sign_content.txt");
    const OPENSSL_SIG: &str = include_str!("../testdata/alipay_signature.b64");

    fn params() -> BTreeMap<String, String> {
        [
            ("app_id", "2021000000000001"),
            ("method", "zhima.credit.payafteruse.creditbizorder.query"),
            ("format", "JSON"),
            ("charset", "utf-8"),
            ("sign_type", "RSA2"),
            ("timestamp", "2025-11-21 12:00:00"),
            ("version", "1.0"),
            ("notify_url", ""),
            ("biz_content", r#"{"out_order_no":"s_1"}"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn sign_content_and_signature_match_openssl() {
        assert_eq!(request_sign_content(&params()), CONTENT);
        let signer = RsaSigner::from_pem(KEY).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sign_params(&signer, &params()).unwrap_or_default(),
            OPENSSL_SIG.trim()
        );
    }

    #[test]
    fn responses_verify_over_the_raw_member() {
        let signer = RsaSigner::from_pem(KEY).unwrap_or_else(|e| panic!("{e}"));
        let mut v = Verifier::new(300);
        v.add_pem("alipay", PUB).unwrap_or_else(|e| panic!("{e}"));
        // Spacing as sent: re-serialising would change the bytes and break the signature.
        let member = r#"{"code":"10000","msg":"Success", "order_status":"INIT"}"#;
        let sig = signer.sign(member.as_bytes()).unwrap_or_default();
        let body = format!(
            r#"{{"zhima_credit_payafteruse_creditbizorder_query_response":{member},"sign":"{sig}"}}"#
        );
        let got = verify_response(
            &v,
            "alipay",
            &body,
            "zhima.credit.payafteruse.creditbizorder.query",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got["order_status"], "INIT");
        let forged = body.replace("INIT", "TRADE_FINISHED");
        assert!(verify_response(
            &v,
            "alipay",
            &forged,
            "zhima.credit.payafteruse.creditbizorder.query"
        )
        .is_err());
        assert!(
            verify_response(&v, "alipay", &body, "alipay.trade.pay").is_err(),
            "another method's member"
        );
    }

    #[test]
    fn notifications_verify_without_sign_and_sign_type() {
        let signer = RsaSigner::from_pem(KEY).unwrap_or_else(|e| panic!("{e}"));
        let mut v = Verifier::new(300);
        v.add_pem("alipay", PUB).unwrap_or_else(|e| panic!("{e}"));
        let mut p: BTreeMap<String, String> = [
            ("notify_id", "n1"),
            ("out_trade_no", "s_1"),
            ("trade_status", "TRADE_SUCCESS"),
            ("total_amount", "12.50"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let sig = signer
            .sign(notify_sign_content(&p).as_bytes())
            .unwrap_or_default();
        p.insert("sign".into(), sig);
        p.insert("sign_type".into(), "RSA2".into());
        assert_eq!(verify_notify(&v, "alipay", &p), Ok(()));
        p.insert("total_amount".into(), "0.01".into());
        assert!(verify_notify(&v, "alipay", &p).is_err());
    }

    #[test]
    fn amounts_convert_exactly() {
        assert_eq!(yuan(1250), "12.50");
        assert_eq!(yuan(5), "0.05");
        assert_eq!(yuan(0), "0.00");
        assert_eq!(fen("12.50"), Some(1250));
        assert_eq!(fen("12.5"), Some(1250));
        assert_eq!(fen("12"), Some(1200));
        assert_eq!(fen("0.05"), Some(5));
        assert_eq!(fen("1.005"), None);
        assert_eq!(fen("-1"), None);
        assert_eq!(fen("abc"), None);
        assert_eq!(fen(""), None);
    }
}
