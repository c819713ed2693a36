"""The domain: users, commands, usage, limits, rates, meters.

Pure: no I/O, no asyncio; time is passed in.
"""
