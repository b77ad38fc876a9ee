"""rlpipe's built-in plugins other than roles (each registered through an entry point)."""
