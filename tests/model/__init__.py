"""The stateful model test of the cache (issue 10): a Hypothesis state machine against real Redis.

``test_stateful.py`` is the machine; ``oracle.py`` the model's bookkeeping and the promises it
checks; ``world.py`` the system under test (caches, private Redis, fake enqueuer); ``gates.py``
holds a thread at chosen points of the read and write paths; ``peer.py`` is the second process.
"""
