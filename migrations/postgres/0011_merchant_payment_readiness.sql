-- What a merchant needs before the real providers take its shoppers' orders: the
-- customer-service phone the pay-after-use order shows, its Alipay sub-merchant (smid) and the
-- app_auth_token it granted the platform's app when it authorised it.
ALTER TABLE merchants ADD COLUMN service_phone TEXT;
ALTER TABLE merchants ADD COLUMN alipay_smid TEXT;
ALTER TABLE merchants ADD COLUMN alipay_app_auth_token TEXT;
