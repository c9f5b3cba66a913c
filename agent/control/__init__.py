"""O/TWAMP-Control (RFC 4656 §3, RFC 5357 §3): codecs, security layer, sans-IO state machines."""
