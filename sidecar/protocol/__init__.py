"""Sans-IO PostgreSQL wire protocol: bytes in, events and bytes out. No asyncio, no sockets."""
