"""What the tests and the benchmarks both drive: a `baton serve` process on free ports, the
sandbox's accounts as clients, and the ledger of acknowledged writes.

It is its own package because both sides need it and neither should import the other: a
benchmark is not a test, and a test should not depend on a benchmark's layout. Like `tests/`
and `bench/`, it is not part of the installed `baton` (pyproject.toml lists `proxy` and
`reparent` only); `proxy/` and `reparent/` never import it.
"""
