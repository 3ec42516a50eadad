"""The stateful model test of the cache (issue 10): a Hypothesis state machine against real Redis.

``test_stateful.py`` is the machine (its docstring says how to run it longer or narrower);
``steps.py`` what its steps draw and how they are recorded; ``calls.py`` the library calls a
step makes in either process; ``oracle.py`` the model's bookkeeping and the promises it checks;
``system.py`` process A's side (private Redis, process B, the whole-process checks); ``world.py``
what both processes build (caches, model origin, fake enqueuer, bus barrier); ``gates.py`` holds
a thread at chosen points of the read and write paths; ``peer.py`` is process B; ``replay.py``
replays a printed step list.
"""
