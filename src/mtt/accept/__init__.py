"""The accept path: listener, first bytes, TLS, the request head, nginx's face, the upgrade."""
