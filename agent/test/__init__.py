"""O/TWAMP-Test and STAMP (RFC 4656 §4, RFC 5357 §4, RFC 8762/8972): packets, sender, reflector."""
