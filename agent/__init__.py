"""xwamp agent: O/TWAMP protocol, key binder, test engine and CLI."""

__version__ = "0.1.0"
