"""The Celery adapter: the library's tasks and their bodies, the enqueuer with its time budget,
write-through chains and the standalone worker app (``celery -A oqron_cache.celery.worker``).
"""
