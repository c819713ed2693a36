"""The domain: users, commands, usage, limits, admission, rates, meters.

Pure: no I/O, no asyncio; time is passed in.
"""
