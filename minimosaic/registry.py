"""Replaceable functions: the core's one door for faster code, which the core itself never opens.

A core function marked `@replaceable` runs exactly as written, unless a replacement has been registered
under its name ('ops.gelu', 'memories.leaky_average', ...). The optional fast layer (minimosaic.fast)
registers its replacements when `minimosaic.fast.enable()` is called; nothing else does. A replacement
takes the same arguments and returns the same result; for inputs it does not handle (another device,
dropout, a dtype) it returns NotImplemented and the next one, finally the plain function, runs.
"""
import functools

_replacements = {}   # name -> [replacement, ...], tried in order


def replaceable(function):
    """Mark a core function as replaceable under '<module>.<name>' (e.g. 'ops.gelu')."""
    name = f"{function.__module__.rsplit('.', 1)[-1]}.{function.__name__}"

    @functools.wraps(function)
    def dispatch(*args, **kwargs):
        for replacement in _replacements.get(name, ()):
            result = replacement(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return function(*args, **kwargs)

    dispatch.plain = function   # the code as written, whatever is registered
    dispatch.replaceable_name = name
    return dispatch


def register(name, replacement):
    """Try `replacement` before the plain function `name` (after those registered earlier)."""
    _replacements.setdefault(name, []).append(replacement)


def unregister(name, replacement):
    """Stop trying `replacement` for `name` (nothing happens if it is not registered)."""
    found = _replacements.get(name, [])
    if replacement in found:
        found.remove(replacement)
    if not found:
        _replacements.pop(name, None)


def clear():
    """Forget every replacement: the plain functions run again."""
    _replacements.clear()


def registered():
    """{name: [replacement, ...]} currently registered (a copy)."""
    return {name: list(found) for name, found in _replacements.items()}
