//! Webhook deliveries: the WEBHOOKS work stream, signed POSTs, retries, ROUTES_DLQ. Owned by
//! WEBHOOK (to be completed).
