"""The GPU check's sections, one module each. Every section has
``run(plan, clock, deadline, out)``: it measures what its plan says, stops starting new
measurements past ``deadline`` (:class:`bench.gpu_check.plan.CapReached`), and fills the
dict ``out``, which becomes its part of the report; it raises when a measurement failed,
after recording the ones that did not.

Modules that import triton (``partial_fc.triton_ce``, ``trainer``) are imported inside
``run``: the smoke run sets ``TRITON_INTERPRET`` first, and triton reads it on import."""
