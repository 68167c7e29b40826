"""What an exercise's test cell uses to grade a student's answer against the library (see minialign.kit.course).

    from minialign.kit.grading import forbid
    expected = reference(case)                 # the library computes the answer first
    with forbid(reference):                    # then the student's function runs with the reference refused
        mine = student_function(case)
    torch.testing.assert_close(mine, expected, atol=..., rtol=...)

An answer that calls the reference (directly, through an alias, or through another library function that calls
it) fails with an AssertionError that says so; an exercise therefore cannot be passed by delegating.
"""
from __future__ import annotations

import inspect
import types


class forbid:
    """Context manager: while active, calling any of `functions` raises AssertionError naming it. A test cell runs
    the student's answer inside it, so an answer that delegates to the library's reference fails. It swaps each
    function's code object, so every alias (a name imported into the notebook, a method reached through its class,
    a call from inside another library function) is caught; everything is restored on exit."""

    def __init__(self, *functions):
        self.targets = []
        for f in functions:
            fn = inspect.unwrap(getattr(f, "__func__", f))
            if not isinstance(fn, types.FunctionType) or fn.__code__.co_freevars:
                raise ValueError(f"functions must be plain Python functions without a closure, got {f!r}")
            self.targets.append(fn)

    def __enter__(self):
        self.saved = [(fn.__code__, fn.__defaults__, fn.__kwdefaults__) for fn in self.targets]
        for fn in self.targets:
            ns = {}
            msg = (f"your answer called the library's reference {fn.__module__}.{fn.__qualname__}; write it yourself "
                   "(its source is printed after this test)")
            exec(f"def refused(*args, **kwargs):\n    raise AssertionError({msg!r})", ns)
            fn.__code__, fn.__defaults__, fn.__kwdefaults__ = ns["refused"].__code__, None, None
        return self

    def __exit__(self, *exc):
        for fn, (code, defaults, kwdefaults) in zip(self.targets, self.saved):
            fn.__code__, fn.__defaults__, fn.__kwdefaults__ = code, defaults, kwdefaults
