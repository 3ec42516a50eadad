"""The Redis adapter: URLs and clients (single server, Sentinel, Cluster), the L2 store and its
Lua scripts, the circuit-broken connection, and the pub/sub bus. Imports only ``core``.
"""
