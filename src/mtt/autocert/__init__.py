"""Certificates by themselves: ACME (RFC 8555) orders for -acme names.

state.py keeps the account key and certificates in the state directory and
the lock that lets one process order at a time; client.py speaks ACME through
certbot's `acme` library (synchronous, so it runs in a thread); http01.py is
the -acme-http listener; manager.py decides when to order, retries, and hands
certificates and TLS-ALPN-01 challenges to the processes that serve them.
"""
