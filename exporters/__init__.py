"""Exporters: Prometheus exposition of xwamp measurements and SA state."""
