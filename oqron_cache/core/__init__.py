"""Pure logic, no I/O: options, durations, keys and globs, the entry envelope and the read-path
decision, codecs, errors, counters. Every other layer builds on these; they import nothing above.
"""
