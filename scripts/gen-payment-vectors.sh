#!/usr/bin/env bash
# Regenerates the payment crypto test vectors in src/payments/testdata/ with OpenSSL, so the
# Rust implementation (ring) is checked against an independent one. The keys are test-only.
# AES-256-GCM: the openssl CLI's `enc` refuses AEAD ciphers, so that vector comes from OpenSSL's
# libcrypto through Python's `cryptography` package.
set -euo pipefail
cd "$(dirname "$0")/../src/payments/testdata"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out merchant_key.pem 2>/dev/null
openssl pkey -in merchant_key.pem -pubout -out merchant_pub.pem
# The APIv3 string to sign: METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n
printf 'POST\n/v3/payscore/partner/serviceorder\n1763700000\n5K8264ILTKCH16CQ2502SI8ZNMTM67VS\n{"out_order_no":"o_1"}\n' > sign_message.txt
openssl dgst -sha256 -sign merchant_key.pem sign_message.txt | base64 -w0 > sign_signature.b64
python3 - <<'PY'
import base64, json
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key = b"0123456789abcdefghijklmnopqrstuv"          # a 32-byte APIv3 key
nonce = b"fdasflkja484"                            # 12 bytes, as WeChat sends
aad = b"payscore"
plain = json.dumps({"out_order_no": "o_1", "state": "DOING", "state_description": "USER_CONFIRM"}, separators=(",", ":")).encode()
ct = AESGCM(key).encrypt(nonce, plain, aad)        # ciphertext || 16-byte tag
json.dump({"key": key.decode(), "nonce": nonce.decode(), "associated_data": aad.decode(),
           "ciphertext": base64.b64encode(ct).decode(), "plaintext": plain.decode()},
          open("gcm_vector.json", "w"), indent=1)
PY
# Alipay RSA2: the gateway signs the sorted `k=v&…` string of the request parameters.
printf 'app_id=2021000000000001&biz_content={"out_order_no":"s_1"}&charset=utf-8&format=JSON&method=zhima.credit.payafteruse.creditbizorder.query&sign_type=RSA2&timestamp=2025-11-21 12:00:00&version=1.0' > alipay_sign_content.txt
openssl dgst -sha256 -sign merchant_key.pem alipay_sign_content.txt | base64 -w0 > alipay_signature.b64
