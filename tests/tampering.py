"""Test doubles shared by host and real-kernel tests of the key binder."""


class TamperedGreeting:
    """A server key source announcing another SPI or protocol than its SA's
    (the Server-Greeting's Unused octets 0-4, docs/wire-format.md)."""

    def __init__(self, inner, spi_delta: int = 0, proto: int | None = None) -> None:
        self.inner, self.spi_delta, self.proto = inner, spi_delta, proto

    def greeting_extra(self, ctx):
        u = bytearray(self.inner.greeting_extra(ctx))
        u[0:4] = (int.from_bytes(u[0:4], "big") + self.spi_delta).to_bytes(4, "big")
        if self.proto is not None:
            u[4] = self.proto
        return bytes(u)

    def __getattr__(self, name):
        return getattr(self.inner, name)
