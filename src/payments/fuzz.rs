//! Property-based fuzzing of the payment providers' parse, verify and decrypt entry points:
//! whatever the headers, body or parameters, the answer is an error (or, for a genuinely signed
//! and encrypted message, a value), never a panic. `PROPTEST_CASES` sets the number of cases.

use proptest::prelude::*;

use super::alipay::crypto::{fen, response_member, verify_notify, verify_response, yuan};
use super::crypto::{
    decrypt_resource, encrypt_resource, response_message, CryptoError, RsaSigner, Verifier,
};
use super::wechat::{NotificationError, SignedHeaders, WechatClient, WechatConfig};

const KEY: &str = include_str!("testdata/merchant_key.pem");
const PUB: &str = include_str!("testdata/merchant_pub.pem");
const API_V3_KEY: &str = "0123456789abcdef0123456789abcdef";
const SERIAL: &str = "PUB_KEY_ID_1";

/// Cases per property: `PROPTEST_CASES` when set, else `default` (kept small where every case
/// signs with RSA, so the default run stays quick on a busy 2-core box).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

fn client() -> WechatClient {
    let cfg = WechatConfig {
        base_url: "http://127.0.0.1:9".into(),
        mchid: "1900000001".into(),
        merchant_serial: "M1".into(),
        merchant_key_path: String::new(),
        platform_serial: SERIAL.into(),
        platform_public_key_path: String::new(),
        api_v3_key: API_V3_KEY.into(),
        apiv2_key: "fuzzapiv2key".into(),
        service_id: "S1".into(),
        appid: "wx1".into(),
        notify_url: "http://127.0.0.1:9/n".into(),
    };
    // The test key pair stands in for the platform's: what it signs verifies.
    WechatClient::with_keys(cfg, KEY, PUB).unwrap_or_else(|e| panic!("{e}"))
}

fn signer() -> RsaSigner {
    RsaSigner::from_pem(KEY).unwrap_or_else(|e| panic!("{e}"))
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Headers signed over `body` now, as the platform sends them.
fn signed_headers(body: &str, nonce: &str) -> SignedHeaders {
    let ts = now_s();
    let sig = signer()
        .sign(response_message(ts, nonce, body).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    SignedHeaders {
        timestamp: Some(ts.to_string()),
        nonce: Some(nonce.to_owned()),
        signature: Some(sig),
        serial: Some(SERIAL.to_owned()),
    }
}

fn header() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "\\PC{0,40}".prop_map(Some),
        any::<i64>().prop_map(|n| Some(n.to_string())),
        Just(Some(SERIAL.to_owned())),
        Just(Some("WECHATPAY/SIGNTEST/x".to_owned())),
    ]
}

/// JSON-ish text: arbitrary strings, arbitrary bytes as lossy UTF-8, and JSON values.
fn body() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "\\PC{0,30}".prop_map(serde_json::Value::from),
    ];
    let json = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("id".to_owned()),
                    Just("event_type".to_owned()),
                    Just("resource".to_owned()),
                    Just("algorithm".to_owned()),
                    Just("nonce".to_owned()),
                    Just("ciphertext".to_owned()),
                    Just("associated_data".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        "\\PC{0,200}",
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        json.prop_map(|v| v.to_string()),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    /// Arbitrary headers and body: refused (unsigned), never a panic.
    #[test]
    fn wechat_notification_with_arbitrary_headers_and_body(
        timestamp in header(), nonce in header(), signature in header(), serial in header(),
        body in body(),
    ) {
        let h = SignedHeaders { timestamp, nonce, signature, serial };
        prop_assert!(client().parse_notification(&h, &body).is_err());
    }

    /// The verifier alone, with any timestamp (the skew check must not overflow).
    #[test]
    fn verifier_with_arbitrary_input(
        ts in any::<i64>(), now in any::<i64>(), nonce in "\\PC{0,40}", body in body(),
        sig in "[A-Za-z0-9+/=]{0,400}",
    ) {
        let mut v = Verifier::new(300);
        v.add_pem(SERIAL, PUB).unwrap_or_else(|e| panic!("{e}"));
        prop_assert!(v.verify(SERIAL, ts, &nonce, &body, &sig, now).is_err());
    }

    /// Decryption with arbitrary nonce, associated data and ciphertext: an error.
    #[test]
    fn decrypt_with_arbitrary_input(
        key in proptest::collection::vec(any::<u8>(), 0..40),
        nonce in "\\PC{0,20}", aad in "\\PC{0,40}", ct in "\\PC{0,200}",
    ) {
        let _ = decrypt_resource(&key, &nonce, &aad, &ct);
        prop_assert!(decrypt_resource(API_V3_KEY.as_bytes(), &nonce, &aad, &ct).is_err());
    }

    /// Alipay: arbitrary gateway bodies and methods into the response verifier, arbitrary
    /// form parameters into the notification verifier, arbitrary amounts both ways.
    #[test]
    fn alipay_with_arbitrary_input(
        body in body(), method in "\\PC{0,40}",
        params in proptest::collection::btree_map(
            prop_oneof![Just("sign".to_owned()), Just("sign_type".to_owned()), "\\PC{0,12}"],
            "\\PC{0,60}",
            0..8,
        ),
        amount in "\\PC{0,24}", n in any::<i64>(),
    ) {
        let mut v = Verifier::new(300);
        v.add_pem("alipay", PUB).unwrap_or_else(|e| panic!("{e}"));
        let _ = response_member(&body, &method);
        prop_assert!(verify_response(&v, "alipay", &body, &method).is_err());
        prop_assert!(verify_notify(&v, "alipay", &params).is_err());
        let _ = fen(&amount);
        let y = yuan(n);
        if n >= 0 {
            prop_assert_eq!(fen(&y), Some(n), "{} round trips", n);
        }
    }
}

proptest! {
    // Every case signs with RSA (~ms in a debug build): fewer by default.
    #![proptest_config(cases(48))]

    /// A genuinely signed envelope whose fields are mutated: every path past the signature
    /// (envelope, algorithm, nonce, ciphertext) answers an error, never a panic.
    #[test]
    fn wechat_signed_notification_with_mutated_envelope(
        body in body(),
        nonce in "\\PC{0,20}", aad in "\\PC{0,20}", ct in "\\PC{0,120}",
        algorithm in prop_oneof![Just("AEAD_AES_256_GCM".to_owned()), "\\PC{0,20}"],
    ) {
        let c = client();
        // Arbitrary signed body.
        let _ = c.parse_notification(&signed_headers(&body, "n1"), &body);
        // A well-formed envelope with arbitrary resource fields.
        let env = serde_json::json!({
            "id": "EV-1", "event_type": "PAYSCORE.USER_PAID",
            "resource": {"algorithm": algorithm, "nonce": nonce, "associated_data": aad,
                         "ciphertext": ct},
        })
        .to_string();
        let r = c.parse_notification(&signed_headers(&env, "n2"), &env);
        prop_assert!(
            matches!(r, Err(NotificationError::Envelope(_) | NotificationError::Decrypt)),
            "{:?}", r
        );
    }

    /// Signed and correctly encrypted, with an arbitrary plaintext: JSON resources are
    /// accepted as they are, anything else is an envelope error.
    #[test]
    fn wechat_encrypted_arbitrary_resource(
        plain in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            body().prop_map(String::into_bytes),
        ],
        id in prop_oneof![Just(serde_json::json!("EV-2")), Just(serde_json::json!(7)), Just(serde_json::Value::Null)],
    ) {
        let ct = encrypt_resource(API_V3_KEY.as_bytes(), "0123456789ab", "payscore", &plain)
            .unwrap_or_else(|e| panic!("{e}"));
        let env = serde_json::json!({
            "id": id, "event_type": "PAYSCORE.USER_PAID",
            "resource": {"algorithm": "AEAD_AES_256_GCM", "nonce": "0123456789ab",
                         "associated_data": "payscore", "ciphertext": ct},
        })
        .to_string();
        let r = client().parse_notification(&signed_headers(&env, "n3"), &env);
        let json_ok = serde_json::from_slice::<serde_json::Value>(&plain).is_ok();
        match r {
            Ok(n) => prop_assert!(json_ok && n.id == "EV-2"),
            Err(e) => prop_assert!(matches!(e, NotificationError::Envelope(_)), "{:?}", e),
        }
    }
}

#[test]
fn extreme_timestamps_are_stale_not_a_panic() {
    let mut v = Verifier::new(300);
    v.add_pem(SERIAL, PUB).unwrap_or_else(|e| panic!("{e}"));
    for (ts, now) in [
        (i64::MIN, 0),
        (i64::MAX, -1),
        (i64::MIN, i64::MAX),
        (0, i64::MIN),
    ] {
        assert!(
            matches!(
                v.verify(SERIAL, ts, "n", "", "x", now),
                Err(CryptoError::Stale(_))
            ),
            "{ts} at {now}"
        );
    }
    assert_eq!(yuan(i64::MIN), "-92233720368547758.08");
}
