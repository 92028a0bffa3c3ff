"""The CLI's stdlib-only gRPC client (HTTP/2 + HPACK) for the fast ``asm run --node`` path."""
