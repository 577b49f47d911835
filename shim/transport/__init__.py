"""The socket edge: the only package that imports hypercorn, wsproto or h11 (the
patches, direct frame writes, pings, the socket pumps and the HTTP stream pump)."""
